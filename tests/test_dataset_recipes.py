"""Dataset recipes (recipes/datasets/*.yaml): format, vocabulary names, and the real label files.

The YAML is read with ``yaml.safe_load`` and checked against the format of ``recipes/README.md`` directly,
so these checks do not depend on the recipe loader. The real-data tests read the label files of
``shared/real`` with nibabel / SimpleITK and check that every value present is mapped, and that the mapped
names are the right tissue (HU in CT, contrast in BraTS MR).
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from medaug import vocab

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes" / "datasets"
RECIPE_PATHS = sorted(RECIPE_DIR.glob("*.yaml"))

REQUIRED = {"name", "dataset", "version", "reference", "license", "layout", "channels", "patient_group", "domain"}
OPTIONAL = {
    "description", "labels", "label_files", "unmapped", "subject_regex", "subject_filter", "splits", "frames",
    "lineage", "subjects", "images", "label", "label_format", "image", "masks", "file_ending", "series_filter", "path",
}
DOMAIN_KEYS = {"name", "modality", "channels", "spacing_mm", "size", "plane", "intensity", "min_body_fraction"}
LAYOUTS = {"msd", "nnunet", "totalsegmentator", "subjects", "dicom", "images"}
UNMAPPED = {"background", "ignore", "reject"}
NON_STRUCTURE_TARGETS = {"ignore", "background"}


def load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name}: top level is not a mapping"
    return data


def by_name(name: str) -> dict:
    return load(RECIPE_DIR / f"{name}.yaml")


@pytest.fixture(params=RECIPE_PATHS, ids=lambda p: p.stem)
def recipe(request) -> dict:
    return load(request.param) | {"_file": request.param}


def test_expected_recipes_exist():
    names = {p.stem for p in RECIPE_PATHS}
    expected = {f"msd_task{i:02d}_{t}" for i, t in enumerate(
        ["brain_tumour", "heart", "liver", "hippocampus", "prostate", "lung", "pancreas", "hepatic_vessel", "spleen", "colon"], 1)}
    expected |= {"brats2013", "brats2021", "brats2023_gli", "amos22_ct", "amos22_mr", "acdc", "kits21", "kits23",
                 "totalsegmentator_v2", "totalsegmentator_v2_multilabel", "real_totalsegmentator_ct_sm",
                 "real_totalsegmentator_ct", "real_totalsegmentator_mr", "real_totalsegmentator_ct_dicom",
                 "real_pyradiomics_brain", "real_dcm_qa_nih_mosaic"}
    assert expected <= names


def test_keys_are_known_and_required_ones_present(recipe):
    keys = set(recipe) - {"_file"}
    assert REQUIRED <= keys, f"missing {REQUIRED - keys}"
    assert keys <= REQUIRED | OPTIONAL, f"unknown {keys - REQUIRED - OPTIONAL}"
    assert set(recipe["domain"]) <= DOMAIN_KEYS
    assert recipe["name"] == recipe["_file"].stem
    assert re.fullmatch(r"[a-z0-9_]+", recipe["name"])
    assert recipe["layout"] in LAYOUTS
    assert recipe.get("unmapped", "reject") in UNMAPPED
    for key in ("dataset", "version", "reference", "license"):
        assert isinstance(recipe[key], str) and recipe[key].strip(), key


def test_labels_map_int_ids_to_vocabulary_names(recipe):
    labels = recipe.get("labels") or {}
    reads_label_maps = recipe["layout"] in ("msd", "nnunet") or (recipe["layout"] in ("subjects", "dicom") and recipe.get("label"))
    assert bool(labels) == bool(reads_label_maps), "a recipe lists labels exactly when it reads label maps"
    for source_id, name in labels.items():
        assert isinstance(source_id, int) and not isinstance(source_id, bool) and source_id >= 1, source_id
        assert name in NON_STRUCTURE_TARGETS or name in vocab.VOCABULARY, f"{source_id}: {name!r} not in the vocabulary"
    for stem, name in (recipe.get("label_files") or {}).items():
        assert name in vocab.VOCABULARY, f"label_files.{stem}: {name!r}"


def test_domain_matches_channels(recipe):
    domain = recipe["domain"]
    channels = recipe["channels"]
    assert channels and len(channels) == len(set(channels))
    assert domain["channels"] == channels
    assert set(domain["intensity"]) == set(channels)
    assert domain["modality"] in ("ct", "mr") and domain["name"].startswith(domain["modality"] + "/")
    assert domain["spacing_mm"] > 0 and domain.get("size", 256) % 16 == 0 and domain.get("size", 256) >= 64
    assert domain.get("plane", "auto") in ("auto", "axial", "coronal", "sagittal")
    for channel, mapping in domain["intensity"].items():
        if domain["modality"] == "ct":
            low, high = mapping["window_hu"]
            assert set(mapping) == {"window_hu"} and -1024 <= low < high <= 3000, channel
        else:
            low, high = mapping["percentiles"]
            assert set(mapping) == {"percentiles"} and 0 <= low < high <= 100, channel


def test_layout_keys(recipe):
    if recipe["layout"] == "subjects":
        assert set(recipe["images"]) == set(recipe["channels"])
        assert isinstance(recipe.get("subjects", "*"), str)
    if recipe["layout"] == "images":
        assert len(recipe["images"]) == 1 and "labels" not in recipe
    if recipe["layout"] == "totalsegmentator":
        assert recipe.get("image", "ct.nii.gz") and recipe.get("masks", "segmentations")


def test_grouping_splits_lineage_and_filters(recipe):
    groups = re.compile(recipe["subject_regex"]).groupindex if recipe.get("subject_regex") else {}
    recipe["patient_group"].format(subject="s", dataset="d", **{name: "x" for name in groups})
    assert set((recipe.get("splits") or {}).values()) <= {"train", "val", "test"}
    lineage = recipe.get("lineage", [])
    assert isinstance(lineage, list) and all(isinstance(item, str) and item for item in lineage)
    assert recipe["name"] not in lineage
    if recipe.get("subject_filter"):
        re.compile(recipe["subject_filter"])


def test_names_unique_and_shared_domains_agree():
    recipes = [load(path) for path in RECIPE_PATHS]
    names = [r["name"] for r in recipes]
    assert len(names) == len(set(names))
    domains: dict[str, dict] = {}
    for r in recipes:
        first = domains.setdefault(r["domain"]["name"], r["domain"])
        assert r["domain"] == first, f"{r['name']}: domain {r['domain']['name']} differs from another recipe's entry"


@pytest.mark.parametrize("name", ["totalsegmentator_v2_multilabel", "real_totalsegmentator_ct_sm", "real_totalsegmentator_ct_dicom"])
def test_totalsegmentator_multilabel_tables_are_the_117_v2_classes(name):
    labels = by_name(name)["labels"]
    assert sorted(labels) == list(range(1, 118))
    assert tuple(labels[i] for i in range(1, 118)) == vocab.TOTALSEGMENTATOR_V2
    assert all(vocab.structure(labels[i]).id == i for i in labels)  # TS ids are medaug ids


@pytest.mark.parametrize(
    "name, expected",
    [
        ("msd_task01_brain_tumour", {1: "brain_tumor_edema", 2: "brain_tumor_non_enhancing_core", 3: "brain_tumor_enhancing"}),
        ("brats2013", {1: "brain_tumor_necrosis", 2: "brain_tumor_edema", 3: "brain_tumor_non_enhancing_core", 4: "brain_tumor_enhancing"}),
        ("brats2021", {1: "brain_tumor_non_enhancing_core", 2: "brain_tumor_edema", 4: "brain_tumor_enhancing"}),
        ("brats2023_gli", {1: "brain_tumor_non_enhancing_core", 2: "brain_tumor_edema", 3: "brain_tumor_enhancing"}),
        ("msd_task05_prostate", {1: "prostate_peripheral_zone", 2: "prostate_transition_zone"}),
        ("acdc", {1: "heart_ventricle_right", 2: "heart_myocardium", 3: "heart_ventricle_left"}),
        ("kits21", {1: "kidney", 2: "kidney_tumor", 3: "kidney_cyst"}),
        ("kits23", {1: "kidney", 2: "kidney_tumor", 3: "kidney_cyst"}),
    ],
)
def test_versioned_label_tables(name, expected):
    """BraTS changed its ids between versions (2013: 1-4, 2017-21: 1, 2, 4; 2023: 1-3): each recipe pins one."""
    assert by_name(name)["labels"] == expected


def test_brain_channels_are_shared_names():
    for name in ("msd_task01_brain_tumour", "brats2021", "brats2023_gli"):
        assert by_name(name)["channels"] == ["flair", "t1", "t1c", "t2"]
    assert by_name("brats2013")["channels"] == ["flair", "t1c"]
    assert by_name("msd_task05_prostate")["channels"] == ["t2", "adc"]


def test_amos_filters_split_ct_from_mr():
    ct, mr = by_name("amos22_ct"), by_name("amos22_mr")
    for case_number in (1, 250, 499, 500, 501, 540, 600):
        case = f"amos_{case_number:04d}"
        is_ct = re.fullmatch(ct["subject_filter"], case) is not None
        is_mr = re.fullmatch(mr["subject_filter"], case) is not None
        assert (is_ct, is_mr) == (case_number <= 500, case_number > 500), case
    assert ct["labels"][15] == "prostate_or_uterus"
    assert sorted(mr["labels"]) == list(range(1, 14))  # MRI: bladder and prostate/uterus not annotated
    assert {k: v for k, v in ct["labels"].items() if k <= 13} == mr["labels"]


def test_brats2023_patient_group_joins_time_points():
    recipe = by_name("brats2023_gli")
    groups = [re.search(recipe["subject_regex"], s).groupdict() for s in ("BraTS-GLI-00042-000", "BraTS-GLI-00042-001")]
    assert [recipe["patient_group"].format(subject="x", dataset="d", **g) for g in groups] == ["00042", "00042"]


def test_acdc_frame_globs_pick_the_frame_files():
    recipe = by_name("acdc")
    assert recipe["frames"] == ["ED", "ES"]
    image = recipe["images"]["bssfp"].format(frame=1)
    label = recipe["label"].format(frame=12)
    assert Path("patient001_frame01.nii.gz").match(image) and not Path("patient001_frame01_gt.nii.gz").match(image)
    assert not Path("patient001_4d.nii.gz").match(image)
    assert Path("patient001_frame12_gt.nii.gz").match(label)


# --- the recipes of shared/real against the files -----------------------------------------------------------


def _glob_one(folder: Path, pattern: str) -> Path:
    matches = sorted(glob.glob(str(folder / pattern)))
    assert len(matches) == 1, f"{folder}/{pattern}: {matches}"
    return Path(matches[0])


def _label_values(path: Path) -> set[int]:
    if path.suffix == ".nrrd":
        sitk = pytest.importorskip("SimpleITK")
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    else:
        import nibabel

        array = np.asarray(nibabel.load(path).dataobj)
    assert np.array_equal(array, np.round(array)), f"{path.name}: non-integer labels"
    return {int(v) for v in np.unique(array)} - {0}


@pytest.mark.real
@pytest.mark.parametrize(
    "name, folder, subjects",
    [
        ("brats2013", "brats2013", ["pat0005", "pat0006"]),
        ("real_totalsegmentator_ct_sm", "totalsegmentator", ["."]),
        ("real_pyradiomics_brain", "pyradiomics", ["."]),
    ],
)
def test_real_subject_recipes_find_files_and_map_every_label(real_dir, name, folder, subjects):
    recipe = by_name(name)
    root = real_dir / folder
    found = [p.name for p in root.glob(recipe["subjects"])] if recipe["subjects"] != "." else ["."]
    assert sorted(found) == subjects
    for subject in subjects:
        for pattern in recipe["images"].values():
            _glob_one(root / subject, pattern)
        present = _label_values(_glob_one(root / subject, recipe["label"]))
        assert present and present <= set(recipe["labels"]), f"{subject}: unmapped {present - set(recipe['labels'])}"


@pytest.mark.real
def test_real_image_only_recipes_find_their_file(real_dir):
    for name in ("real_totalsegmentator_ct", "real_totalsegmentator_mr"):
        recipe = by_name(name)
        assert recipe["layout"] == "images"
        _glob_one(real_dir / "totalsegmentator", next(iter(recipe["images"].values())))


@pytest.mark.real
def test_real_dicom_label_sits_beside_the_series_and_is_mapped(real_dir):
    recipe = by_name("real_totalsegmentator_ct_dicom")
    series = real_dir / "totalsegmentator" / "example_ct_dicom"
    label = _glob_one(series, recipe["label"])
    present = _label_values(label)
    assert present <= set(recipe["labels"])
    assert {1, 5, 52} <= present  # spleen, liver, aorta


@pytest.mark.real
def test_real_mosaic_recipe_has_no_labels(real_dir):
    recipe = by_name("real_dcm_qa_nih_mosaic")
    assert recipe["layout"] == "dicom" and "label" not in recipe and "labels" not in recipe
    assert list((real_dir / "dcm_qa_nih").rglob("*.dcm"))


def _median_by_name(image: np.ndarray, label: np.ndarray, labels: dict[int, str]) -> dict[str, float]:
    return {labels[int(v)]: float(np.median(image[label == v])) for v in np.unique(label) if v}


def _largest(label: np.ndarray, labels: dict[int, str]) -> str:
    values, counts = np.unique(label[label > 0], return_counts=True)
    return labels[int(values[np.argmax(counts)])]


@pytest.mark.real
def test_real_ct_sm_names_are_the_right_tissue(real_dir):
    """The TS v2 table read on the real CT: lungs are air, bones are dense, liver and spleen are soft tissue."""
    import nibabel

    recipe = by_name("real_totalsegmentator_ct_sm")
    folder = real_dir / "totalsegmentator"
    image = nibabel.load(folder / recipe["images"]["ct"])
    label = nibabel.load(folder / recipe["label"])
    assert np.allclose(image.affine, label.affine)
    hu = _median_by_name(np.asarray(image.dataobj), np.asarray(label.dataobj), recipe["labels"])
    lungs = [v for k, v in hu.items() if k.startswith("lung_")]
    bones = [v for k, v in hu.items() if re.match(r"(vertebrae|rib)_", k)]
    assert len(lungs) >= 3 and max(lungs) < -500
    assert len(bones) >= 10 and min(bones) > 120
    assert 30 < hu["liver"] < 70 and 20 < hu["spleen"] < 60  # non-contrast (README: liver ~46, spleen ~35 HU)
    assert hu["liver"] > hu["spleen"]
    assert _largest(np.asarray(label.dataobj), recipe["labels"]) == "liver"


@pytest.mark.real
def test_real_ct_dicom_label_aligns_through_affines(real_dir):
    """example_seg_dicom on its DICOM series, mapped voxel -> RAS mm -> voxel (never by array order)."""
    sitk = pytest.importorskip("SimpleITK")
    import nibabel

    recipe = by_name("real_totalsegmentator_ct_dicom")
    series = real_dir / "totalsegmentator" / "example_ct_dicom"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    ct = reader.Execute()
    ct_ijk = sitk.GetArrayFromImage(ct).transpose(2, 1, 0).astype(np.float32)  # (I, J, K)
    ct_affine = np.eye(4)
    ct_affine[:3, :3] = np.array(ct.GetDirection()).reshape(3, 3) * np.array(ct.GetSpacing())
    ct_affine[:3, 3] = ct.GetOrigin()
    ct_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ct_affine  # LPS -> RAS
    seg = nibabel.load(_glob_one(series, recipe["label"]))
    labels_ijk = np.asarray(seg.dataobj)
    voxels = np.indices(labels_ijk.shape).reshape(3, -1)
    mapped = np.linalg.inv(ct_affine) @ seg.affine @ np.vstack([voxels, np.ones(voxels.shape[1])])
    ijk = np.rint(mapped[:3]).astype(int)
    assert ijk.min() >= 0 and np.all(ijk.max(axis=1) < np.array(ct_ijk.shape))
    hu = _median_by_name(ct_ijk[ijk[0], ijk[1], ijk[2]], labels_ijk.reshape(-1), recipe["labels"])
    assert 70 < hu["liver"] < 120 and 60 < hu["spleen"] < 120  # portal-venous contrast
    assert hu["aorta"] > 120 and hu["vertebrae_T12"] > 120
    assert hu["spinal_cord"] < 60
    assert _largest(labels_ijk, recipe["labels"]) == "liver"


@pytest.mark.real
@pytest.mark.parametrize("subject", ["pat0005", "pat0006"])
def test_real_brats2013_names_match_the_contrast(real_dir, subject):
    """Enhancing tumour is the brightest class on T1c, necrosis is dark on T1c, edema is bright on FLAIR."""
    import nibabel

    recipe = by_name("brats2013")
    folder = real_dir / "brats2013" / subject
    label = np.asarray(nibabel.load(folder / recipe["label"]).dataobj)
    t1c = _median_by_name(np.asarray(nibabel.load(folder / recipe["images"]["t1c"]).dataobj), label, recipe["labels"])
    flair = _median_by_name(np.asarray(nibabel.load(folder / recipe["images"]["flair"]).dataobj), label, recipe["labels"])
    brain = np.asarray(nibabel.load(folder / "brainmask.nii.gz").dataobj) > 0.5
    normal_flair = float(np.median(np.asarray(nibabel.load(folder / recipe["images"]["flair"]).dataobj)[brain & (label == 0)]))
    assert t1c["brain_tumor_enhancing"] == max(t1c.values()) and t1c["brain_tumor_enhancing"] > 1.0
    assert t1c["brain_tumor_necrosis"] < t1c["brain_tumor_edema"] and t1c["brain_tumor_necrosis"] < -1.0
    assert flair["brain_tumor_edema"] > normal_flair + 1.0
