"""The report: metrics.json, report.md and report.html hold the same numbers; backbones are named."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from medaug.eval.metrics import DISTRIBUTION_METRICS
from medaug.eval.report import format_number, json_safe
from tests.eval.conftest import light_config


def distribution_numbers(metrics: dict) -> list[tuple[str, float]]:
    """(where, value) of every distribution figure in metrics.json."""
    numbers = []
    for backbone, scored in metrics["distribution"].items():
        groups = {"overall": scored["overall"], **scored["domains"], **scored["structures"]}
        for group, entry in groups.items():
            if "skipped" in entry:
                continue
            for metric in DISTRIBUTION_METRICS:
                record = entry[metric]
                values = [record["value"], record["floor"], record["matched"], *(record["ci"] or [])]
                numbers += [(f"{backbone}/{group}/{metric}", v) for v in values if v is not None]
    return numbers


def other_numbers(metrics: dict) -> list[tuple[str, float]]:
    numbers = []
    memorization = metrics["memorization"]
    for name, summary in [("overall", memorization["overall"]), *memorization["domains"].items()]:
        numbers += [(f"memorization/{name}/fraction", summary["fraction_flagged"]),
                    (f"memorization/{name}/ncc", summary["ncc"]["synthetic"]["p50"]),
                    (f"memorization/{name}/distance", summary["feature_distance"]["val"]["p50"])]
    for domain, structures in metrics["fidelity"]["domains"].items():
        for structure, channels in structures.items():
            for channel, entry in channels.items():
                numbers += [(f"fidelity/{domain}/{structure}/{channel}", v) for v in
                            (entry["real"]["median"], entry["synthetic"]["q75"], entry["median_difference"]) if v is not None]
    for backbone, entry in metrics["efficiency"]["backbones"].items():
        numbers.append((f"efficiency/{backbone}", entry["value"]))
    return numbers


@pytest.fixture(scope="module")
def documents(evaluated):
    result, out = evaluated
    return (json.loads((out / "metrics.json").read_text()), (out / "report.md").read_text(),
            (out / "report.html").read_text())


def test_metrics_json_is_what_evaluate_returned(evaluated, documents):
    result, _ = evaluated
    assert documents[0] == json.loads(json.dumps(result))


def test_report_holds_the_numbers_of_metrics_json(documents):
    metrics, markdown, page = documents
    numbers = distribution_numbers(metrics) + other_numbers(metrics)
    assert len(numbers) > 200
    for where, value in numbers:
        text = format_number(value)
        assert text in markdown, (where, text)
        assert text in page, (where, text)
    assert len(metrics["distribution"]["medaug"]["structures"]) >= 10


def test_every_number_names_its_backbone(documents):
    metrics, markdown, page = documents
    for metric in ("FID", "KID", "CMMD", "precision", "recall", "density", "coverage"):
        assert f"{metric} [medaug]" in markdown and f"{metric} [medaug]" in page
    for name in ("inception-fid", "radimagenet-resnet50", "clip"):
        assert metrics["backbones"][name]["status"] == "unavailable"
        assert re.search(rf"\| {name} \| unavailable \|", markdown), name
    assert metrics["backbones"]["medaug"]["status"] == "available"
    assert metrics["backbones"]["medaug"]["evaluation"]["structure_auroc_macro"] is not None
    assert metrics["memorization"]["backbone"] == "medaug"


def test_efficiency_and_memorization_numbers(documents, planted_copies):
    metrics, markdown, _ = documents
    efficiency = metrics["efficiency"]
    fid = metrics["distribution"]["medaug"]["overall"]["fid"]["value"]
    assert efficiency["backbones"]["medaug"]["value"] == pytest.approx(fid * math.log(1.25))
    assert metrics["memorization"]["overall"]["n_flagged"] == len(planted_copies)
    flagged = {pair["slice_id"] for pair in metrics["memorization"]["closest_pairs"] if pair["flagged"]}
    assert flagged == set(planted_copies)


def test_figures_exist_and_are_linked(documents, evaluated):
    metrics, markdown, page = documents
    _, out = evaluated
    linked = re.findall(r"!\[[^\][]*\]\(([^()\s]+)\)", markdown)
    assert sorted(linked) == sorted(name for key, name in metrics["files"].items() if key.startswith(("figure:", "grid:")))
    assert {"grid:ct/abdomen", "grid:mr/brain", "grid:mr/prostate", "figure:closest_pairs", "figure:medaug",
            "figure:memorization", "figure:fidelity"} <= set(metrics["files"])
    for name in linked:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert page.count("<img src='data:image/png;base64,") == len(linked)


def test_report_without_backbones_lists_all_as_unavailable(eval_data, synthetic_fresh, tmp_path):
    from medaug.eval.evaluate import evaluate_metrics

    result = evaluate_metrics(eval_data["real"], synthetic_fresh, {}, tmp_path, config=light_config(grid_per_domain=0))
    markdown = (tmp_path / "report.md").read_text()
    assert result["distribution"] == {} and "No backbone was available" in markdown
    assert all(record["status"] == "unavailable" for record in result["backbones"].values())
    assert result["memorization"]["backbone"] is None and result["memorization"]["overall"]["n_flagged"] == 0
    assert result["efficiency"]["status"] == "unavailable"
    assert format_number(result["memorization"]["overall"]["ncc"]["val"]["p50"]) in markdown


def test_format_number_and_json_safe():
    assert [format_number(v) for v in (None, True, 3, 0.000123456, 12345.678, float("nan"))] == \
        ["-", "yes", "3", "0.0001235", "1.235e+04", "-"]
    assert json_safe({"a": (np.float32(1.5), float("inf")), "b": np.int64(2)}) == {"a": [1.5, None], "b": 2}
