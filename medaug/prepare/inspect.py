"""``medaug inspect``: a prepared dataset's summary and a montage of slices with their masks overlaid,
so a person can see that harmonization did the right thing (orientation, window, label alignment)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medaug.prepare.pipeline import PrepareSummary, _fill_summary, read_rejections

OVERLAY_ALPHA = 0.45


def summarize_prepared(prepared: str | Path) -> PrepareSummary:
    """Counts per domain, split and structure, and the rejected inputs, read from the dataset files."""
    from medaug.data.index import read_index

    prepared = Path(prepared)
    frame = read_index(prepared / "index.parquet")
    frame = frame.to_pandas() if hasattr(frame, "to_pandas") else frame
    summary = PrepareSummary(out=str(prepared))
    _fill_summary(summary, frame, read_rejections(prepared))
    return summary


def pick_slices(frame, per_domain: int) -> dict[str, list[int]]:
    """Per domain, up to ``per_domain`` row numbers, spread over volumes, preferring labelled slices."""
    picked = {}
    for domain, rows in frame.groupby("domain", sort=True):
        labelled = rows[[len(present) > 0 for present in rows["structures_present"]]]
        pool = labelled if len(labelled) >= per_domain else rows
        order = np.linspace(0, len(pool) - 1, num=min(per_domain, len(pool))).round().astype(int)
        picked[str(domain)] = [int(index) for index in pool.index[order]]
    return picked


def overlay_rgb(image_HW: np.ndarray, label_HW: np.ndarray | None) -> np.ndarray:
    """An (H, W, 3) uint8 picture: model-space image [-1, 1] as gray, structures in vocabulary colours."""
    from medaug import vocab

    gray = np.clip((image_HW.astype(np.float32) + 1.0) * 127.5, 0, 255)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    if label_HW is not None:
        for vocab_id in np.unique(label_HW):
            if vocab_id in (vocab.BACKGROUND, vocab.IGNORE):
                continue
            colour = np.array(vocab.by_id(int(vocab_id)).color, dtype=np.float32)
            where = label_HW == vocab_id
            rgb[where] = (1 - OVERLAY_ALPHA) * rgb[where] + OVERLAY_ALPHA * colour
    return rgb.astype(np.uint8)


def draw_montage(prepared: str | Path, out_png: str | Path, per_domain: int = 6) -> Path:
    """Write a PNG grid: one row per domain, the first channel of each picked slice with its mask."""
    from PIL import Image, ImageDraw

    from medaug.data.index import read_index
    from medaug.data.shards import ShardStore
    from medaug.io.png import write_png

    prepared = Path(prepared)
    frame = read_index(prepared / "index.parquet")
    frame = frame.to_pandas() if hasattr(frame, "to_pandas") else frame
    store = ShardStore(prepared)
    picked = pick_slices(frame, per_domain)
    size = int(frame["height"].max()) if len(frame) else 64
    canvas = Image.new("RGB", (size * per_domain, (size + 14) * max(1, len(picked))), "black")
    draw = ImageDraw.Draw(canvas)
    for row_number, (domain, rows) in enumerate(picked.items()):
        top = row_number * (size + 14)
        draw.text((2, top), domain, fill=(255, 255, 0))
        for column, index in enumerate(rows):
            record = frame.loc[index]
            image_CHW, label_HW = store.read(record["shard"], int(record["shard_row"]))
            tile = Image.fromarray(overlay_rgb(np.asarray(image_CHW[0]), None if label_HW is None else np.asarray(label_HW)))
            canvas.paste(tile, (column * size, top + 14))
    return write_png(np.asarray(canvas), out_png)
