"""Sources: find the volumes of a dataset folder (cheap: file names and small JSON only) and load them.

Discovery turns a folder plus a dataset recipe into :class:`VolumeTask` items, one per image volume
(with its channels and its label source). Loading a task reads the image channels into one
:class:`~medaug.io.Volume` (channels in the recipe's order) and the label map into a second Volume with
source label ids. Layouts (``recipes/README.md``): ``msd``, ``nnunet``, ``totalsegmentator``,
``subjects`` (BraTS-style per-subject folders), ``dicom`` (a DICOM tree, labels as DICOM SEG or a file
beside each series) and ``images`` (no labels).
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medaug.config.recipes import DatasetRecipe
from medaug.errors import ConfigError, ImageReadError, LabelError, MedaugError
from medaug.io.volume import Volume

HIDDEN_PREFIXES = ("._", ".part-", ".")


@dataclass(frozen=True)
class VolumeTask:
    """One image volume to prepare: where its channels and labels are, and who it belongs to."""

    dataset: str
    subject: str
    images: tuple[str, ...]  # one path per channel, or one 4D file / DICOM folder holding all channels
    label: str | None = None  # a label map file, a DICOM SEG, or a folder of per-structure masks
    label_kind: str = "map"  # map | masks | dicom_seg
    patient_group: str = ""
    pinned_split: str | None = None
    frame: int | None = None  # 4D cine: which frame (channels then come from one frame)
    extra_ignore_ids: tuple[int, ...] = ()  # nnU-Net dataset.json "ignore" label
    tag: str = ""  # distinguishes several volumes of one image source (e.g. DICOM series, cine frames)

    @property
    def volume_id(self) -> str:
        key = json.dumps([self.dataset, self.subject, list(self.images), self.label, self.frame, self.tag])
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    @property
    def display(self) -> str:
        return self.images[0] if len(self.images) == 1 else f"{self.subject} ({len(self.images)} files)"


@dataclass
class LoadedVolume:
    image: Volume  # (C, I, J, K), channels in the recipe's order
    label: Volume | None  # (1, I, J, K) source label ids, on its own grid (aligned later by affine)
    label_names: dict[int, str] = field(default_factory=dict)  # source id -> name, for masks/SEG


def discover(root: str | Path, recipe: DatasetRecipe) -> list[VolumeTask]:
    """All volumes of ``root`` read as ``recipe``'s layout, sorted by subject (deterministic)."""
    root = Path(root)
    if not root.exists():
        raise ImageReadError(root, "source folder not found")
    finders = {
        "msd": _discover_msd,
        "nnunet": _discover_nnunet,
        "totalsegmentator": _discover_totalsegmentator,
        "subjects": _discover_subjects,
        "dicom": _discover_dicom,
        "images": _discover_images,
    }
    tasks = finders[recipe.layout](root, recipe)
    if recipe.subject_filter:
        tasks = [task for task in tasks if re.fullmatch(recipe.subject_filter, task.subject)]
    return sorted((_with_grouping(task, recipe) for task in tasks), key=lambda task: (task.subject, task.tag))


def _with_grouping(task: VolumeTask, recipe: DatasetRecipe) -> VolumeTask:
    fields = {"subject": task.subject, "dataset": recipe.name}
    if recipe.subject_regex:
        match = re.search(recipe.subject_regex, task.subject)
        if match:
            fields.update({key: value or "" for key, value in match.groupdict().items()})
        else:
            fields.update({key: task.subject for key in re.compile(recipe.subject_regex).groupindex})
    group = f"{recipe.name}/{recipe.patient_group.format(**fields)}"
    from dataclasses import replace

    return replace(task, patient_group=group, pinned_split=recipe.splits.get(task.subject))


def _visible(path: Path) -> bool:
    return not path.name.startswith(HIDDEN_PREFIXES)


def _strip_suffix(name: str, suffix: str = ".nii.gz") -> str:
    for ending in (suffix, ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm"):
        if name.endswith(ending):
            return name[: -len(ending)]
    return name


def _read_dataset_json(root: Path) -> dict:
    path = root / "dataset.json"
    if not path.is_file():
        raise ImageReadError(root, "no dataset.json; expected an MSD or nnU-Net dataset folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ImageReadError(path, f"invalid JSON ({error.msg} at line {error.lineno})") from None


def _discover_msd(root: Path, recipe: DatasetRecipe) -> list[VolumeTask]:
    """MSD: ``dataset.json`` lists training pairs and test images; 4D files hold the modalities."""
    meta = _read_dataset_json(root)
    modalities = meta.get("modality", {})
    if modalities and len(modalities) != len(recipe.channels):
        raise ConfigError(f"{recipe.name}:channels", f"names {len(recipe.channels)} channels; {root}/dataset.json has {len(modalities)}: {modalities}")
    tasks = []
    for entry in meta.get("training", []):
        image, label = root / entry["image"], root / entry["label"]
        if _visible(image):
            tasks.append(VolumeTask(recipe.name, _strip_suffix(image.name), (str(image),), str(label)))
    for entry in meta.get("validation", []):
        image, label = root / entry["image"], root / entry["label"]
        if _visible(image):
            tasks.append(VolumeTask(recipe.name, _strip_suffix(image.name), (str(image),), str(label)))
    for entry in meta.get("test", []):
        image = root / (entry if isinstance(entry, str) else entry["image"])
        if _visible(image):
            tasks.append(VolumeTask(recipe.name, _strip_suffix(image.name), (str(image),)))
    return tasks


def _discover_nnunet(root: Path, recipe: DatasetRecipe) -> list[VolumeTask]:
    """nnU-Net v2 raw: ``imagesTr/CASE_XXXX{ending}`` per channel, ``labelsTr/CASE{ending}``."""
    meta = _read_dataset_json(root)
    ending = meta.get("file_ending", recipe.file_ending)
    channel_count = len(meta.get("channel_names", {})) or len(recipe.channels)
    if channel_count != len(recipe.channels):
        raise ConfigError(f"{recipe.name}:channels", f"names {len(recipe.channels)} channels; {root}/dataset.json has {channel_count}")
    ignore = meta.get("labels", {}).get("ignore")
    extra = (int(ignore),) if isinstance(ignore, int) else ()
    tasks = []
    for images_dir, labels_dir in (("imagesTr", "labelsTr"), ("imagesTs", None)):
        folder = root / images_dir
        cases = sorted({path.name[: -len(ending) - 5] for path in folder.glob(f"*_0000{ending}") if _visible(path)})
        for case in cases:
            images = tuple(str(folder / f"{case}_{channel:04d}{ending}") for channel in range(channel_count))
            label = root / labels_dir / f"{case}{ending}" if labels_dir else None
            tasks.append(VolumeTask(recipe.name, case, images, str(label) if label else None, extra_ignore_ids=extra))
    return tasks


def _discover_totalsegmentator(root: Path, recipe: DatasetRecipe) -> list[VolumeTask]:
    """One folder per subject with ``ct.nii.gz`` and ``segmentations/<structure>.nii.gz``."""
    subjects = [root] if (root / recipe.image).exists() else sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    tasks = []
    for subject in subjects:
        image = subject / recipe.image
        if not image.exists():
            continue
        masks = subject / recipe.masks
        label = str(masks) if masks.is_dir() else None
        tasks.append(VolumeTask(recipe.name, subject.name, (str(image),), label, label_kind="masks"))
    return tasks


def _glob_one(folder: Path, pattern: str, what: str) -> Path:
    matches = sorted(Path(p) for p in glob.glob(str(folder / pattern)) if _visible(Path(p)))
    if len(matches) != 1:
        found = f"{len(matches)} matches" + (f" ({', '.join(m.name for m in matches[:3])})" if matches else "")
        raise ImageReadError(folder, f"{what} pattern {pattern!r} has {found}; expected exactly one")
    return matches[0]


def _discover_subjects(root: Path, recipe: DatasetRecipe) -> list[VolumeTask]:
    """Per-subject folders (BraTS style): one glob per channel and one for the label map."""
    subjects = [root] if recipe.subjects == "." else sorted(
        Path(p) for p in glob.glob(str(root / recipe.subjects)) if Path(p).is_dir() and _visible(Path(p))
    )
    tasks = []
    kind = "dicom_seg" if recipe.label_format == "dicom_seg" else "map"
    for subject in subjects:
        for frame_name, fill in _frames_of(subject, recipe):
            images = tuple(
                str(_glob_one(subject, recipe.images[channel].format(**fill), f"channel {channel!r}")) for channel in recipe.channels
            )
            label = str(_glob_one(subject, recipe.label.format(**fill), "label")) if recipe.label else None
            tasks.append(VolumeTask(recipe.name, subject.name, images, label, label_kind=kind, tag=frame_name))
    return tasks


def _frames_of(subject: Path, recipe: DatasetRecipe) -> list[tuple[str, dict[str, int]]]:
    """``[(frame name, {"frame": number})]`` for cine recipes (``frames: [ED, ES]`` via ``Info.cfg``),
    else one entry with no fill."""
    if not recipe.frames:
        return [("", {})]
    info = subject / "Info.cfg"
    numbers = {}
    if info.is_file():
        for line in info.read_text().splitlines():
            key, _, value = line.partition(":")
            if value.strip().isdigit():
                numbers[key.strip()] = int(value.strip())
    frames = []
    for name in recipe.frames:
        if name.isdigit():
            frames.append((f"frame{int(name):02d}", {"frame": int(name)}))
        elif name in numbers:
            frames.append((name, {"frame": numbers[name]}))
        else:
            raise ImageReadError(info, f"no '{name}: <frame>' line; expected the frame numbers that recipe key frames names")
    return frames


def _discover_images(root: Path, recipe: DatasetRecipe) -> list[VolumeTask]:
    """Image-only: every file matching ``images[channel]`` (one channel) or the whole folder's images."""
    pattern = next(iter(recipe.images.values()), "*.nii.gz") if recipe.images else "*.nii.gz"
    paths = [root] if root.is_file() else sorted(Path(p) for p in glob.glob(str(root / pattern)) if _visible(Path(p)))
    return [VolumeTask(recipe.name, _strip_suffix(path.name), (str(path),)) for path in paths]


def _discover_dicom(root: Path, recipe: DatasetRecipe) -> list[VolumeTask]:
    """A DICOM tree: one task per series folder; labels are DICOM SEG files referencing the series,
    or ``recipe.label`` (a glob relative to the series folder, e.g. ``../label.nii.gz``)."""
    from medaug.io.dicom import find_series

    found = find_series(root)
    segs = {uid: info for info in found if info.is_seg for uid in info.referenced_series}
    tasks = []
    for series in found:
        if series.skipped is not None:
            continue
        if recipe.series_filter and not re.search(recipe.series_filter, series.description or ""):
            continue
        label, kind = (str(segs[series.series_uid].files[0]), "dicom_seg") if series.series_uid in segs else (None, "map")
        if recipe.label:
            label, kind = str(_glob_one(Path(series.folder), recipe.label, "label")), "map"
        subject = series.patient_id or Path(series.folder).name
        tag = f"{series.series_uid}#{series.index}"
        tasks.append(VolumeTask(recipe.name, subject, (series.folder,), label, label_kind=kind, tag=tag))
    return tasks


def load_task(task: VolumeTask, recipe: DatasetRecipe) -> LoadedVolume:
    """Read a task's image channels (recipe order) and its label source.

    Raises:
        ImageReadError, LabelError, MedaugError: with a one-line reason naming the file.
    """
    image = _load_channels(task, recipe)
    if task.label is None:
        return LoadedVolume(image=image, label=None)
    if task.label_kind == "masks":
        label, names = _load_masks(Path(task.label), recipe)
        return LoadedVolume(image=image, label=label, label_names=names)
    if task.label_kind == "dicom_seg":
        from medaug.io.dicom import read_dicom_seg

        label, names = read_dicom_seg(task.label, reference=image)
        return LoadedVolume(image=image, label=label, label_names=names)
    from medaug.io import read_volume

    label = read_volume(task.label)
    if label.num_channels != 1:
        raise LabelError(task.label, f"label map has {label.num_channels} frames; expected one 3D label map")
    _require_integral(label.array, task.label)
    return LoadedVolume(image=image, label=label, label_names={})


def _load_channels(task: VolumeTask, recipe: DatasetRecipe) -> Volume:
    from medaug.io import read_volume

    if task.tag.count("#") == 1 and Path(task.images[0]).is_dir():  # one volume of a DICOM tree
        from medaug.io.dicom import read_dicom_series

        uid, index = task.tag.split("#")
        volumes = [read_dicom_series(task.images[0], uid, int(index))]
    else:
        volumes = [read_volume(path) for path in task.images]
    if len(volumes) == 1:
        volume = volumes[0]
        if task.frame is not None:
            return _select_frame(volume, task.frame, task.images[0])
        if volume.num_channels != len(recipe.channels):
            raise MedaugError(
                task.images[0],
                f"{volume.num_channels}-frame (4D) volume but the recipe names {len(recipe.channels)} channel(s) "
                f"{recipe.channels}; expected a channel name per frame",
            )
        return volume.with_array(volume.array, channels=list(recipe.channels))
    reference = volumes[0]
    for path, volume in zip(task.images[1:], volumes[1:]):
        if volume.num_channels != 1:
            raise MedaugError(path, f"{volume.num_channels} frames; expected one 3D channel per file")
        if volume.spatial_shape != reference.spatial_shape or not np.allclose(volume.affine, reference.affine, atol=1e-3):
            raise MedaugError(path, f"not on the grid of {task.images[0]}; expected co-registered channels (same shape and affine)")
    array = np.concatenate([volume.array for volume in volumes], axis=0)
    return reference.with_array(array, channels=list(recipe.channels), source_paths=list(task.images))


def _select_frame(volume: Volume, frame: int, path: str) -> Volume:
    if not 0 <= frame < volume.num_channels:
        raise MedaugError(path, f"frame {frame} requested; the volume has {volume.num_channels} frames")
    return volume.with_array(volume.array[frame : frame + 1], frame=frame)


def _require_integral(array: np.ndarray, path: str) -> None:
    if np.issubdtype(array.dtype, np.floating):
        if not np.array_equal(array, np.round(array)):
            raise LabelError(path, "label map has non-integer values; expected integer label ids")
    if array.min() < 0:
        raise LabelError(path, f"label map has negative value {array.min()}; expected ids >= 0")


def _load_masks(folder: Path, recipe: DatasetRecipe) -> tuple[Volume, dict[int, str]]:
    """Combine one binary mask per structure (file stem = name) into one map with local ids 1..n."""
    from medaug.io import read_volume

    paths = sorted(p for p in folder.glob("*") if p.is_file() and _visible(p))
    if not paths:
        raise LabelError(folder, "no mask files; expected one binary mask per structure")
    combined, names = None, {}
    for local_id, path in enumerate(paths, start=1):
        mask = read_volume(path)
        if combined is None:
            combined = mask.with_array(np.zeros(mask.array.shape, dtype=np.uint8))
        elif mask.spatial_shape != combined.spatial_shape or not np.allclose(mask.affine, combined.affine, atol=1e-3):
            raise LabelError(path, f"mask grid differs from {paths[0].name}; expected all masks on one grid")
        stem = _strip_suffix(path.name)
        names[local_id] = recipe.label_files.get(stem, stem)
        combined.array[mask.array > 0] = local_id
    return combined, names
