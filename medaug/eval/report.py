"""The evaluation report (issue 10 item 7): ``metrics.json``, ``report.md`` and ``report.html`` in one folder.

``metrics.json`` holds every number (:func:`medaug.eval.evaluate.evaluate_metrics`'s result; non-finite
values become null). The two documents are rendered from one list of blocks (headings, paragraphs,
tables, images), so they hold the same content, and every number in them is written by
:func:`format_number` from the value in ``metrics.json``. Each distribution figure sits in a table whose
title names its backbone; unavailable backbones are listed with the reason. Figures (PNG, beside the
documents; the HTML embeds them so it can be sent alone):

* ``distribution_<backbone>.png``: per metric, the value per group (overall, domains) with its bootstrap
  interval and the real-vs-real floor as a black tick (matplotlib);
* ``memorization.png``: nearest-training NCC and feature distance, synthetic against real val;
* ``fidelity.png``: per structure and channel, median and IQR inside the masks, real against synthetic;
* ``grid_<domain>.png``: real (top) and synthetic (bottom) slices of each domain, masks overlaid;
* ``closest_pairs.png``: the synthetic samples closest to a training slice, beside that slice.
"""

from __future__ import annotations

import base64
import html
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medaug.eval.metrics import DISTRIBUTION_METRICS

if TYPE_CHECKING:
    import pandas as pd

    from medaug.data.dataset import PreparedSliceDataset

log = logging.getLogger(__name__)

METRICS_JSON = "metrics.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
METRIC_TITLES = {"fid": "FID", "kid": "KID", "cmmd": "CMMD", "precision": "precision", "recall": "recall",
                 "density": "density", "coverage": "coverage"}
# the names the literature gives FID on these backbones
FID_NAMES = {"inception-fid": "FID", "radimagenet-resnet50": "RadFID"}
TILE_SIDE = 128  # grid tiles are enlarged (nearest) to at least this side


def format_number(value: Any) -> str:
    """How every number appears in the documents: 4 significant digits, ``-`` for none."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    if not math.isfinite(value):
        return "-"
    return f"{value:.4g}"


def metric_title(metric: str, backbone: str) -> str:
    """``RadFID``, ``FID``, ``KID``... with the backbone named: ``FID [medaug]``."""
    title = FID_NAMES.get(backbone, "FID") if metric == "fid" else METRIC_TITLES[metric]
    return f"{title} [{backbone}]"


def json_safe(value: Any) -> Any:
    """``value`` with NumPy scalars as Python numbers, tuples as lists and NaN/inf as None."""
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


# ---------------------------------------------------------------------------------------------- the document


@dataclass(frozen=True)
class Block:
    """One piece of the report: ``kind`` "h1" | "h2" | "h3" | "p" | "table" | "image"; ``text`` (heading,
    paragraph, table title or image caption), ``columns``/``rows`` for a table, ``path`` for an image."""

    kind: str
    text: str = ""
    columns: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    path: Path | None = None


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Block:
    cells = tuple(tuple(cell if isinstance(cell, str) else format_number(cell) for cell in row) for row in rows)
    return Block("table", title, tuple(columns), cells)


def render_markdown(blocks: Sequence[Block], root: Path) -> str:
    """GitHub-flavoured Markdown; images link to their files relative to ``root``."""
    lines: list[str] = []
    for block in blocks:
        if block.kind in ("h1", "h2", "h3"):
            lines += ["#" * int(block.kind[1]) + " " + block.text, ""]
        elif block.kind == "p":
            lines += [block.text, ""]
        elif block.kind == "table":
            lines += [f"**{block.text}**", "", "| " + " | ".join(block.columns) + " |",
                      "|" + "---|" * len(block.columns)]
            lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in block.rows]
            lines.append("")
        elif block.kind == "image" and block.path is not None:
            alt = block.text.replace("[", "(").replace("]", ")")
            lines += [f"![{alt}]({block.path.relative_to(root).as_posix()})", f"*{block.text}*", ""]
    return "\n".join(lines)


_STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
          "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
          "text-align:right}th{background:#f0f0f0}td:first-child{text-align:left}img{max-width:100%}"
          "caption{font-weight:bold;text-align:left;padding:4px 0}")


def render_html(blocks: Sequence[Block], title: str) -> str:
    """One self-contained HTML page (images embedded as base64 PNG)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body>"]
    for block in blocks:
        if block.kind in ("h1", "h2", "h3", "p"):
            parts.append(f"<{block.kind}>{html.escape(block.text)}</{block.kind}>")
        elif block.kind == "table":
            head = "".join(f"<th>{html.escape(column)}</th>" for column in block.columns)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
                           for row in block.rows)
            parts.append(f"<table><caption>{html.escape(block.text)}</caption><tr>{head}</tr>{body}</table>")
        elif block.kind == "image" and block.path is not None:
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(block.text)}'>"
                         f"<figcaption>{html.escape(block.text)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- sections


def header_blocks(result: dict[str, Any]) -> list[Block]:
    counts = result.get("counts", {})
    lineage = result["lineage"]
    blocks = [Block("h1", "medaug evaluation report"),
              Block("p", f"Real: {result['real']} (split {result['split']}, {counts.get('real')} slices). "
                         f"Synthetic: {result['synthetic']} ({counts.get('synthetic')} slices). "
                         f"Created {result['created_at']}."),
              Block("h2", "Lineage"),
              Block("p", f"Status: {lineage['status'].upper()}. {lineage['message']}")]
    if lineage.get("generator"):
        blocks.append(Block("p", f"Generator: {lineage['generator']}."))
    if lineage.get("overlapping_groups"):
        blocks.append(Block("p", "Overlapping patient groups: " + ", ".join(lineage["overlapping_groups"])))
    return blocks


def backbone_blocks(result: dict[str, Any]) -> list[Block]:
    rows = []
    for name, record in result["backbones"].items():
        evaluation = record.get("evaluation") or {}
        detail = (record.get("preprocessing") or "") if record["status"] == "available" else record.get("reason", "")
        rows.append((name, record["status"], record.get("dim"), record.get("weights") or "-",
                     evaluation.get("structure_auroc_macro"), evaluation.get("domain_accuracy"), detail))
    columns = ("backbone", "status", "features", "weights", "held-out structure AUROC", "domain accuracy", "details")
    return [Block("h2", "Feature backbones"),
            Block("p", "Every distribution figure below names the backbone whose features it was computed in; an "
                       "unavailable backbone was not supplied or could not be loaded, and nothing replaces it."),
            table("Backbones", columns, rows)]


def _metric_cell(entry: dict[str, Any] | None) -> str:
    """``value [low, high] (floor x)`` of one metric of one group."""
    if not entry or entry.get("value") is None:
        return "-"
    text = format_number(entry["value"])
    if entry.get("std") is not None:
        text += f" ± {format_number(entry['std'])}"
    if entry.get("ci"):
        text += f" [{format_number(entry['ci'][0])}, {format_number(entry['ci'][1])}]"
    if entry.get("floor") is not None:
        text += f" (floor {format_number(entry['floor'])}, matched {format_number(entry.get('matched'))})"
    return text


def _group_rows(groups: dict[str, Any], prefix: str = "") -> list[tuple[str, ...]]:
    rows = []
    for name, scored in groups.items():
        cells = [f"{prefix}{name}", format_number(scored.get("n_real")), format_number(scored.get("n_synthetic"))]
        if "skipped" in scored:
            cells += [scored["skipped"]] + ["-"] * (len(DISTRIBUTION_METRICS) - 1)
        else:
            cells += [_metric_cell(scored.get(metric)) for metric in DISTRIBUTION_METRICS]
        rows.append(tuple(cells))
    return rows


def distribution_blocks(result: dict[str, Any], figures: dict[str, Path]) -> list[Block]:
    blocks = [Block("h2", "Distribution metrics"),
              Block("p", "Each cell: value [95% bootstrap interval] (floor: the metric between two disjoint real "
                         "subsets A and B of floor_n rows each (metrics.json); matched: A against floor_n synthetic "
                         "rows, the figure to compare with the floor, since FID and KID grow for smaller samples). "
                         "KID: mean ± std over subsets [central range of the subsets]. FID, KID, CMMD: lower is "
                         "better; precision, recall, density, coverage: higher.")]
    if not result["distribution"]:
        return blocks + [Block("p", "No backbone was available: no distribution metric was computed.")]
    for backbone, scored in result["distribution"].items():
        columns = ("group", "n real", "n synthetic", *(metric_title(m, backbone) for m in DISTRIBUTION_METRICS))
        rows = _group_rows({"overall": scored["overall"]}) + _group_rows(scored["domains"], "domain ")
        blocks += [Block("h3", f"Backbone {backbone}"), table(f"Overall and per domain [backbone {backbone}]", columns, rows)]
        if scored.get("structures"):
            blocks.append(table(f"Per structure [backbone {backbone}]", columns, _group_rows(scored["structures"])))
        if backbone in figures:
            blocks.append(Block("image", f"Distribution metrics per group [backbone {backbone}]", path=figures[backbone]))
    return blocks


def efficiency_blocks(result: dict[str, Any]) -> list[Block]:
    record = result["efficiency"]
    blocks = [Block("h2", "Efficiency (MedVAR)")]
    if record["status"] != "available":
        return blocks + [Block("p", f"Unavailable: {record['reason']}.")]
    rows = [(name, entry["quality"], record["seconds_per_image"], record["gamma"], entry["value"])
            for name, entry in record["backbones"].items()]
    return blocks + [Block("p", "Score = Q · ln(1 + P)^γ with Q the overall FID of the backbone (its own units) and P "
                                "wall-clock seconds per image; lower is better."),
                     table("Efficiency per backbone", ("backbone", "Q = FID", "P (s/image)", "γ", "score"), rows)]


def _quantile(summary: dict[str, Any], metric: str, which: str, key: str = "p50") -> Any:
    return ((summary.get(metric) or {}).get(which) or {}).get(key)


def memorization_blocks(result: dict[str, Any], figures: dict[str, Path]) -> list[Block]:
    record = result["memorization"]
    blocks = [Block("h2", "Memorization")]
    if record.get("status") != "available":
        return blocks + [Block("p", f"Unavailable: {record.get('reason')}.")]
    rule = record["rule"]
    backbone = record.get("backbone") or "none"
    blocks.append(Block("p", f"Nearest real training slice ({record.get('reference')}) of every synthetic sample, in "
                             f"pixels ({rule['size']}² downsampled; NCC and SSIM) and in features [backbone {backbone}]. "
                             f"Near copy: NCC >= max({format_number(rule['ncc_min'])}, val q{format_number(rule['val_quantile'])}) "
                             f"and SSIM >= max({format_number(rule['ssim_min'])}, val q{format_number(rule['val_quantile'])})."))
    rows = []
    for name, summary in [("overall", record["overall"]), *record["domains"].items()]:
        thresholds = summary.get("thresholds") or {}
        rows.append((name, summary["n_synthetic"], summary["n_flagged"], summary["fraction_flagged"],
                     thresholds.get("ncc"), thresholds.get("ssim"), _quantile(summary, "ncc", "synthetic"),
                     _quantile(summary, "ncc", "val"), _quantile(summary, "ssim", "synthetic"), _quantile(summary, "ssim", "val"),
                     _quantile(summary, "feature_distance", "synthetic"), _quantile(summary, "feature_distance", "val"),
                     summary.get("closer_than_val_p05")))
    columns = ("group", "n synthetic", "flagged", "fraction flagged", "NCC bar", "SSIM bar", "NCC median (synthetic)",
               "NCC median (val)", "SSIM median (synthetic)", "SSIM median (val)",
               f"feature distance median (synthetic) [{backbone}]", f"feature distance median (val) [{backbone}]",
               f"closer than val p05 [{backbone}]")
    blocks.append(table("Nearest training slices", columns, rows))
    pairs = [(p["slice_id"], p["domain"], p["pixel_nearest"], p["ncc"], p["ssim"], p.get("feature_distance"), p["flagged"])
             for p in record["closest_pairs"]]
    blocks.append(table("Closest pairs", ("synthetic", "domain", "nearest training slice", "NCC", "SSIM",
                                          f"feature distance [{backbone}]", "near copy"), pairs))
    for key, caption in (("closest_pairs", "Closest pairs: synthetic (left), nearest training slice (right)"),
                         ("memorization", "Nearest-training similarity: synthetic against real val")):
        if key in figures:
            blocks.append(Block("image", caption, path=figures[key]))
    return blocks


def fidelity_blocks(result: dict[str, Any], figures: dict[str, Path]) -> list[Block]:
    record = result["fidelity"]
    rows = []
    for domain, structures in record["domains"].items():
        for structure, channels in structures.items():
            for channel, entry in channels.items():
                real, synthetic = entry["real"], entry["synthetic"]
                rows.append((domain, structure, channel, entry["units"] or "-", real["median"], real["q25"], real["q75"],
                             synthetic["median"], synthetic["q25"], synthetic["q75"], entry["median_difference"],
                             entry["iqr_ratio"], entry["median_in_real_iqr"]))
    columns = ("domain", "structure", "channel", "units", "real median", "real q25", "real q75", "synthetic median",
               "synthetic q25", "synthetic q75", "median difference", "IQR ratio", "median in real IQR")
    blocks = [Block("h2", "Intensity fidelity"),
              Block("p", "Intensities inside each structure's mask through each row's intensity mapping: CT in HU, "
                         f"MR in a.u. (MR scale: {record['mr_scale']})."),
              table("Intensity inside masks", columns, rows)]
    if "fidelity" in figures:
        blocks.append(Block("image", "Median and IQR inside masks: real against synthetic", path=figures["fidelity"]))
    return blocks


def grid_blocks(grids: dict[str, Path]) -> list[Block]:
    blocks = [Block("h2", "Real and synthetic slices")]
    return blocks + [Block("image", f"{domain}: real (top) and synthetic (bottom), masks overlaid", path=path)
                     for domain, path in grids.items()]


# ---------------------------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_distribution(scored: dict[str, Any], backbone: str, path: Path) -> Path | None:
    """One panel per metric: value per group (overall, domains) with interval bars and the floor as a tick."""
    groups = {"overall": scored["overall"], **scored["domains"]}
    groups = {name: entry for name, entry in groups.items() if "skipped" not in entry}
    if not groups:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(DISTRIBUTION_METRICS), figsize=(3.0 * len(DISTRIBUTION_METRICS), 3.2))
    positions = np.arange(len(groups))
    for axis, metric in zip(axes, DISTRIBUTION_METRICS):
        entries = [groups[name][metric] for name in groups]
        values = np.array([np.nan if e["value"] is None else e["value"] for e in entries], dtype=float)
        low = np.array([e["ci"][0] if e.get("ci") else v for e, v in zip(entries, values)], dtype=float)
        high = np.array([e["ci"][1] if e.get("ci") else v for e, v in zip(entries, values)], dtype=float)
        axis.bar(positions, values, color="#4a7ab8")
        axis.errorbar(positions, values, yerr=[np.clip(values - low, 0, None), np.clip(high - values, 0, None)],
                      fmt="none", ecolor="#222", capsize=3)
        floors = [np.nan if e["floor"] is None else e["floor"] for e in entries]
        axis.scatter(positions, floors, marker="_", s=300, color="black", zorder=3, label="real-vs-real floor")
        axis.set_title(metric_title(metric, backbone), fontsize=9)
        axis.set_xticks(positions, list(groups), rotation=45, ha="right", fontsize=7)
    axes[0].legend(fontsize=7)
    return _save(figure, plt, path)


def _save(figure: Any, plt: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_memorization(records: pd.DataFrame, backbone: str | None, path: Path) -> Path | None:
    """Histograms of nearest-training NCC (and feature distance) of synthetic samples against real val slices."""
    if records is None or records.empty:
        return None
    plt = _pyplot()
    metrics = [("ncc", "nearest-training NCC (pixels)")]
    if "feature_distance" in records:
        metrics.append(("feature_distance", f"nearest-training distance [{backbone}]"))
    figure, axes = plt.subplots(1, len(metrics), figsize=(5.0 * len(metrics), 3.2), squeeze=False)
    for axis, (column, title) in zip(axes[0], metrics):
        for which, colour in (("val", "#999999"), ("synthetic", "#c0392b")):
            values = records.loc[records["set"] == which, column].to_numpy(dtype=float)
            if values.size:
                axis.hist(values, bins=30, alpha=0.6, color=colour, density=True, label=f"{which} ({values.size})")
        axis.set_title(title, fontsize=9)
        axis.legend(fontsize=7)
    return _save(figure, plt, path)


def plot_fidelity(fidelity: dict[str, Any], path: Path) -> Path | None:
    """Per (domain, channel) panel: median with IQR bars per structure, real against synthetic."""
    panels: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {}
    for domain, structures in fidelity["domains"].items():
        for structure, channels in structures.items():
            for channel, entry in channels.items():
                panels.setdefault((domain, channel), []).append((structure, entry))
    if not panels:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(len(panels), 1, figsize=(9.0, 2.8 * len(panels)), squeeze=False)
    for axis, ((domain, channel), entries) in zip(axes[:, 0], panels.items()):
        positions = np.arange(len(entries))
        for offset, which, colour in ((-0.15, "real", "#555555"), (0.15, "synthetic", "#c0392b")):
            stats = [entry[which] for _, entry in entries]
            median = np.array([np.nan if s["median"] is None else s["median"] for s in stats], dtype=float)
            low = np.array([np.nan if s["q25"] is None else s["q25"] for s in stats], dtype=float)
            high = np.array([np.nan if s["q75"] is None else s["q75"] for s in stats], dtype=float)
            axis.errorbar(positions + offset, median, yerr=[median - low, high - median], fmt="o", color=colour,
                          capsize=3, label=which)
        axis.set_xticks(positions, [name for name, _ in entries], rotation=30, ha="right", fontsize=7)
        axis.set_title(f"{domain} {channel} ({entries[0][1]['units']})", fontsize=9)
        axis.legend(fontsize=7)
    return _save(figure, plt, path)


def _picked(dataset: PreparedSliceDataset, domain: str, count: int) -> list[int]:
    """Up to ``count`` row positions of ``domain``, spread over the rows, labelled ones preferred."""
    from medaug.eval.memorization import row_column

    rows = np.flatnonzero(row_column(dataset, "domain") == domain)
    present = dataset.rows.column("structures_present").to_pylist()
    labelled = np.array([r for r in rows if present[r]], dtype=np.int64)
    pool = labelled if labelled.size >= count else rows
    if pool.size == 0:
        return []
    return sorted({int(pool[i]) for i in np.linspace(0, pool.size - 1, num=min(count, pool.size)).round().astype(int)})


def write_domain_grids(real: PreparedSliceDataset, synthetic: PreparedSliceDataset, out: Path, per_domain: int) -> dict[str, Path]:
    """Per domain present in both sets, ``grid_<domain>.png``: real slices on top, synthetic below (first
    channel, masks in vocabulary colours; tiles of one size even when the two sets' slice sizes differ)."""
    from PIL import Image, ImageDraw

    from medaug.eval.memorization import row_column, tile_rgb, tile_side
    from medaug.io.png import write_png

    grids: dict[str, Path] = {}
    domains = sorted(set(row_column(real, "domain")) & set(row_column(synthetic, "domain")))
    side, caption = tile_side([real, synthetic], TILE_SIDE), 14
    for domain in domains if per_domain > 0 else []:
        canvas = Image.new("RGB", (side * per_domain, 2 * (side + caption)), "black")
        draw = ImageDraw.Draw(canvas)
        for r, (label, dataset) in enumerate((("real", real), ("synthetic", synthetic))):
            top = r * (side + caption)
            draw.text((2, top), f"{domain} {label}", fill=(255, 255, 0))
            for column, position in enumerate(_picked(dataset, domain, per_domain)):
                canvas.paste(Image.fromarray(tile_rgb(dataset, position, side)), (column * side, top + caption))
        grids[domain] = write_png(np.asarray(canvas), out / f"grid_{domain.replace('/', '_')}.png")
    return grids


def write_figures(result: dict[str, Any], out: Path, datasets: dict[str, PreparedSliceDataset] | None,
                  memorization_records: pd.DataFrame | None, memorization_inputs: Any,
                  grid_per_domain: int) -> tuple[dict[str, Path], dict[str, Path]]:
    """All plots and images of the report: ({figure key: path}, {domain: grid path})."""
    from medaug.eval.memorization import write_closest_pairs

    figures: dict[str, Path] = {}
    for backbone, scored in result["distribution"].items():
        path = plot_distribution(scored, backbone, out / f"distribution_{backbone}.png")
        if path is not None:
            figures[backbone] = path
    optional = {"memorization": plot_memorization(memorization_records, result["memorization"].get("backbone"),
                                                  out / "memorization.png"),
                "fidelity": plot_fidelity(result["fidelity"], out / "fidelity.png")}
    if memorization_inputs is not None and memorization_records is not None:
        optional["closest_pairs"] = write_closest_pairs(memorization_records, memorization_inputs,
                                                        out / "closest_pairs.png", result["memorization"]["rule"]["pairs"])
    figures.update({key: path for key, path in optional.items() if path is not None})
    grids = write_domain_grids(datasets["real"], datasets["synthetic"], out, grid_per_domain) if datasets else {}
    return figures, grids


# ---------------------------------------------------------------------------------------------- writing


def report_blocks(result: dict[str, Any], figures: dict[str, Path], grids: dict[str, Path]) -> list[Block]:
    """The whole report as blocks, in reading order."""
    return [*header_blocks(result), *backbone_blocks(result), *distribution_blocks(result, figures),
            *efficiency_blocks(result), *memorization_blocks(result, figures), *fidelity_blocks(result, figures),
            *grid_blocks(grids)]


def write_text(path: Path, text: str) -> Path:
    from medaug.io.atomic import atomic_output

    with atomic_output(path) as temporary:
        Path(temporary).write_text(text, encoding="utf-8")
    return path


def write_report(result: dict[str, Any], out: str | Path, datasets: dict[str, PreparedSliceDataset] | None = None,
                 memorization_records: pd.DataFrame | None = None, memorization_inputs: Any = None,
                 grid_per_domain: int = 6, with_figures: bool = True) -> dict[str, str]:
    """Write ``metrics.json``, ``report.md``, ``report.html`` and (``with_figures``) the plots and images into
    ``out``; ``result`` gains ``files`` (names relative to ``out``), which is also returned. ``datasets``
    ({"real", "synthetic"}) feed the image grids; the memorization records and inputs feed its plot and the
    closest-pairs image."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures, grids = (write_figures(result, out, datasets, memorization_records, memorization_inputs, grid_per_domain)
                      if with_figures else ({}, {}))
    files = {"metrics": METRICS_JSON, "markdown": REPORT_MD, "html": REPORT_HTML}
    files.update({f"figure:{key}": path.name for key, path in figures.items()})
    files.update({f"grid:{domain}": path.name for domain, path in grids.items()})
    result["files"] = files
    safe = json_safe(result)
    result.clear()
    result.update(safe)
    write_report_files(out, METRICS_JSON, result, report_blocks(result, figures, grids), "medaug evaluation report")
    return files


def write_report_files(out: Path, json_name: str, result: dict[str, Any], blocks: Sequence[Block], title: str) -> None:
    """``out/json_name`` (strict JSON), ``report.md`` and ``report.html`` from ``blocks``, each written atomically."""
    import json

    write_text(out / json_name, json.dumps(result, indent=2, allow_nan=False) + "\n")
    write_text(out / REPORT_MD, render_markdown(blocks, out))
    write_text(out / REPORT_HTML, render_html(blocks, title))
    log.info("%s written to %s", title, out)


__all__ = [
    "write_report_files",
    "Block",
    "METRICS_JSON",
    "REPORT_HTML",
    "REPORT_MD",
    "format_number",
    "json_safe",
    "metric_title",
    "plot_distribution",
    "plot_fidelity",
    "plot_memorization",
    "render_html",
    "render_markdown",
    "report_blocks",
    "write_domain_grids",
    "write_report",
]
