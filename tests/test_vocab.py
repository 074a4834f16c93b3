"""The structure vocabulary: ids, names, hierarchy, laterality and DICOM codes (medaug/vocab.py)."""

from __future__ import annotations

import json
import re

import pytest

from medaug import vocab
from medaug.errors import LabelError

# TotalSegmentator v2 class_map["total"] (totalsegmentator/map_to_binary.py), ids 1..117 in order; copied
# here independently of medaug/vocab.py so that a typo or a shifted id in the table fails this test.
TS_V2_TOTAL = (
    "spleen kidney_right kidney_left gallbladder liver stomach pancreas adrenal_gland_right adrenal_gland_left "
    "lung_upper_lobe_left lung_lower_lobe_left lung_upper_lobe_right lung_middle_lobe_right lung_lower_lobe_right "
    "esophagus trachea thyroid_gland small_bowel duodenum colon urinary_bladder prostate kidney_cyst_left "
    "kidney_cyst_right sacrum vertebrae_S1 vertebrae_L5 vertebrae_L4 vertebrae_L3 vertebrae_L2 vertebrae_L1 "
    "vertebrae_T12 vertebrae_T11 vertebrae_T10 vertebrae_T9 vertebrae_T8 vertebrae_T7 vertebrae_T6 vertebrae_T5 "
    "vertebrae_T4 vertebrae_T3 vertebrae_T2 vertebrae_T1 vertebrae_C7 vertebrae_C6 vertebrae_C5 vertebrae_C4 "
    "vertebrae_C3 vertebrae_C2 vertebrae_C1 heart aorta pulmonary_vein brachiocephalic_trunk "
    "subclavian_artery_right subclavian_artery_left common_carotid_artery_right common_carotid_artery_left "
    "brachiocephalic_vein_left brachiocephalic_vein_right atrial_appendage_left superior_vena_cava "
    "inferior_vena_cava portal_vein_and_splenic_vein iliac_artery_left iliac_artery_right iliac_vena_left "
    "iliac_vena_right humerus_left humerus_right scapula_left scapula_right clavicula_left clavicula_right "
    "femur_left femur_right hip_left hip_right spinal_cord gluteus_maximus_left gluteus_maximus_right "
    "gluteus_medius_left gluteus_medius_right gluteus_minimus_left gluteus_minimus_right autochthon_left "
    "autochthon_right iliopsoas_left iliopsoas_right brain skull "
    + " ".join(f"rib_left_{i}" for i in range(1, 13))
    + " "
    + " ".join(f"rib_right_{i}" for i in range(1, 13))
    + " sternum costal_cartilages"
).split()

# Ids released after the TotalSegmentator block. Ids are append-only: these must never change; new
# structures get new ids after the last one.
RELEASED_IDS = {
    118: "body", 119: "subcutaneous_fat", 120: "torso_fat", 121: "skeletal_muscle", 122: "kidney",
    123: "adrenal_gland", 124: "lung", 125: "lung_left", 126: "lung_right", 127: "vertebrae",
    128: "vertebrae_cervical", 129: "vertebrae_thoracic", 130: "vertebrae_lumbar", 131: "ribs",
    132: "iliac_artery", 133: "iliac_vena", 134: "humerus", 135: "scapula", 136: "clavicula", 137: "femur",
    138: "hip", 139: "gluteus_maximus", 140: "gluteus_medius", 141: "gluteus_minimus", 142: "autochthon",
    143: "iliopsoas", 144: "heart_atrium_left", 145: "heart_atrium_right", 146: "heart_ventricle_left",
    147: "heart_ventricle_right", 148: "heart_myocardium", 149: "pulmonary_artery",
    150: "prostate_peripheral_zone", 151: "prostate_transition_zone", 152: "prostate_or_uterus", 153: "rectum",
    154: "uterus", 155: "csf", 156: "brain_grey_matter", 157: "brain_white_matter", 158: "hippocampus",
    159: "hippocampus_anterior", 160: "hippocampus_posterior", 161: "brain_tumor", 162: "brain_tumor_edema",
    163: "brain_tumor_enhancing", 164: "brain_tumor_non_enhancing_core", 165: "brain_tumor_necrosis",
    166: "liver_tumor", 167: "liver_vessels", 168: "kidney_tumor", 169: "kidney_cyst", 170: "pancreas_tumor",
    171: "lung_tumor", 172: "colon_tumor",
}

STRUCTURES = list(vocab.VOCABULARY.values())


def test_special_values_and_id_range():
    assert (vocab.BACKGROUND, vocab.IGNORE) == (0, 255)
    ids = [s.id for s in STRUCTURES]
    assert len(ids) == len(set(ids))
    assert min(ids) == 1 and max(ids) <= 254
    assert sorted(ids) == list(range(1, len(ids) + 1))  # append-only numbering leaves no holes


def test_names_unique_snake_case_and_keyed_by_name():
    names = [s.name for s in STRUCTURES]
    assert len(names) == len(set(names))
    for key, item in vocab.VOCABULARY.items():
        assert key == item.name
        # TotalSegmentator style: lower-case words joined by "_", level codes such as L1 / S1 / T12 allowed
        assert re.fullmatch(r"[a-z][a-z0-9]*(_([a-z0-9]+|[CTLS][0-9]{1,2}))*", key), key


def test_first_117_ids_are_totalsegmentator_v2():
    assert len(TS_V2_TOTAL) == 117
    assert vocab.TOTALSEGMENTATOR_V2 == tuple(TS_V2_TOTAL)
    for ts_id, name in enumerate(TS_V2_TOTAL, start=1):
        assert vocab.by_id(ts_id).name == name
        assert vocab.structure(name).id == ts_id


@pytest.mark.parametrize("structure_id, name", sorted(RELEASED_IDS.items()), ids=lambda v: str(v))
def test_released_ids_never_change(structure_id, name):
    assert vocab.by_id(structure_id).name == name


def test_required_structures_exist():
    needed = {
        "body", "subcutaneous_fat", "skeletal_muscle", "vertebrae", "urinary_bladder", "prostate",
        "prostate_peripheral_zone", "prostate_transition_zone", "rectum", "skull", "csf", "brain",
        "brain_grey_matter", "brain_white_matter", "brain_tumor", "brain_tumor_edema", "brain_tumor_enhancing",
        "brain_tumor_necrosis", "liver_tumor", "kidney_tumor", "kidney_cyst", "hippocampus_anterior",
        "hippocampus_posterior", "heart_atrium_left", "heart_ventricle_left", "heart_ventricle_right",
        "heart_myocardium", "spleen", "inferior_vena_cava", "esophagus", "duodenum",
    }
    assert needed <= set(vocab.VOCABULARY)


def test_parents_exist_and_hierarchy_has_no_cycles():
    for item in STRUCTURES:
        seen = {item.name}
        parent = item.parent
        while parent is not None:
            assert parent in vocab.VOCABULARY, f"{item.name}: parent {parent} missing"
            assert parent not in seen, f"cycle through {parent}"
            seen.add(parent)
            parent = vocab.VOCABULARY[parent].parent


def test_children_are_the_structures_naming_the_parent():
    for item in STRUCTURES:
        expected = sorted((s for s in STRUCTURES if s.parent == item.name), key=lambda s: s.id)
        assert vocab.children(item.name) == [s.name for s in expected]


def test_resolve_prostate_is_prostate_and_both_zones():
    assert vocab.resolve("prostate") == ["prostate", "prostate_peripheral_zone", "prostate_transition_zone"]


def test_descendants_are_transitive():
    # kidney > kidney_left > kidney_cyst_left: two levels down
    assert "kidney_cyst_left" in vocab.descendants("kidney")
    assert "kidney_cyst_left" not in vocab.children("kidney")
    # brain_tumor > brain_tumor_non_enhancing_core > brain_tumor_necrosis
    assert set(vocab.resolve("brain_tumor")) == {
        "brain_tumor", "brain_tumor_edema", "brain_tumor_enhancing", "brain_tumor_non_enhancing_core",
        "brain_tumor_necrosis",
    }
    vertebrae = vocab.descendants("vertebrae")
    assert {f"vertebrae_{level}" for level in ("C1", "T12", "L5", "S1")} <= set(vertebrae)
    assert len([name for name in vertebrae if re.fullmatch(r"vertebrae_[CTLS]\d+", name)]) == 25
    assert vocab.descendants("spleen") == []
    assert vocab.ancestors("kidney_cyst_left") == ["kidney_left", "kidney"]


def test_lesions_are_children_of_their_organ():
    for lesion, organ in [("liver_tumor", "liver"), ("kidney_tumor", "kidney"), ("pancreas_tumor", "pancreas"),
                          ("lung_tumor", "lung"), ("colon_tumor", "colon"), ("brain_tumor", "brain")]:
        assert organ in vocab.ancestors(lesion)
        assert vocab.structure(lesion).category == ("49755003", "SCT", "Morphologically Abnormal Structure")


def test_lateral_pairs_are_symmetric_with_opposite_sides():
    paired = [s for s in STRUCTURES if s.lateral_pair]
    assert len(paired) == 66  # 20 TotalSegmentator pairs, 24 ribs, both lungs
    for item in paired:
        mirror = vocab.structure(item.lateral_pair)
        assert mirror.lateral_pair == item.name
        assert {item.laterality, mirror.laterality} == {"left", "right"}
        assert item.name.replace("left", "X").replace("right", "X") == mirror.name.replace("left", "X").replace("right", "X")


def test_laterality_follows_the_name_except_heart_chambers():
    for item in STRUCTURES:
        side = {"left", "right"} & set(item.name.split("_"))
        if item.laterality is not None:
            assert side == {item.laterality}, item.name
    unsided = {s.name for s in STRUCTURES if s.laterality is None and {"left", "right"} & set(s.name.split("_"))}
    # the heart's left/right chambers are not mirror images of each other: no laterality, no flip swap
    assert unsided == {"heart_atrium_left", "heart_atrium_right", "heart_ventricle_left", "heart_ventricle_right"}


def test_lateral_swap_and_lookup_table():
    assert vocab.lateral_swap("kidney_left") == "kidney_right"
    assert vocab.lateral_swap("rib_right_7") == "rib_left_7"
    assert vocab.lateral_swap("liver") == "liver"
    assert vocab.lateral_swap("heart_atrium_left") == "heart_atrium_left"
    lut = vocab.lateral_swap_lut()
    assert len(lut) == 256 and lut[0] == 0 and lut[255] == 255
    assert all(lut[lut[i]] == i for i in range(256))  # a flip twice is the identity
    assert lut[vocab.structure("kidney_cyst_left").id] == vocab.structure("kidney_cyst_right").id
    assert lut[vocab.structure("spleen").id] == vocab.structure("spleen").id


def test_unknown_name_lists_close_matches():
    with pytest.raises(KeyError) as caught:
        vocab.structure("prostat")
    assert isinstance(caught.value, LabelError)
    message = str(caught.value)
    assert "prostate" in message and "\n" not in message and not message.startswith("'")
    with pytest.raises(KeyError, match="kidney_left"):
        vocab.resolve("Kidney_Left")


def test_name_to_id_inverts_by_id():
    table = vocab.name_to_id()
    assert len(table) == len(STRUCTURES)
    assert all(vocab.by_id(structure_id).name == name for name, structure_id in table.items())
    table["changed"] = 1
    assert "changed" not in vocab.name_to_id()


def test_by_id_rejects_background_ignore_and_unknown():
    assert vocab.by_id(5).name == "liver"
    for bad in (0, 255, 999):
        with pytest.raises(KeyError, match=str(bad)):
            vocab.by_id(bad)


SCHEME_VALUE = {"SCT": r"[1-9][0-9]{5,17}", "NCIt": r"C[0-9]+", "DCM": r"[0-9]{3,}"}


def _codes(item):
    return [c for c in (item.category, item.type, item.modifier, item.region) if c is not None]


def test_codes_are_well_formed():
    for item in STRUCTURES:
        for code in _codes(item):
            value, scheme, meaning = code
            assert scheme in SCHEME_VALUE, (item.name, code)
            assert re.fullmatch(SCHEME_VALUE[scheme], value), (item.name, code)
            assert meaning.strip() == meaning and meaning, (item.name, code)
        sides = {("7771000", "SCT", "Left"): "left", ("24028007", "SCT", "Right"): "right"}
        if item.modifier in sides:
            assert sides[item.modifier] == item.laterality, item.name
        elif item.laterality is not None:  # the side is part of the type code itself
            assert item.laterality in item.type[2].lower(), (item.name, item.type)


def test_codes_identify_one_structure():
    keys = [(s.category, s.type, s.modifier, s.region) for s in STRUCTURES]
    assert len(keys) == len(set(keys))


@pytest.fixture(scope="module")
def pydicom_meanings() -> dict[tuple[str, str], set[str]]:
    """(scheme, value) -> meanings, built from pydicom's public DICOM PS3.16 code dictionary."""
    codes = pytest.importorskip("pydicom.sr.codedict").codes
    meanings: dict[tuple[str, str], set[str]] = {}
    for scheme in ("SCT", "NCIt", "DCM"):
        collection = getattr(codes, scheme)
        for keyword in dir(collection):
            code = getattr(collection, keyword, None)
            if hasattr(code, "value"):
                meanings.setdefault((scheme, code.value), set()).add(code.meaning)
    return meanings


def test_categories_are_from_cid_7150():
    codes = pytest.importorskip("pydicom.sr.codedict").codes
    members = [getattr(codes.cid7150, k) for k in dir(codes.cid7150) if k[0].isupper()]
    cid7150 = {(c.value, c.scheme_designator, c.meaning) for c in members}
    assert len(cid7150) >= 8
    for item in STRUCTURES:
        assert item.category in cid7150, (item.name, item.category)


@pytest.mark.parametrize(
    "name, scheme, keyword",
    [
        ("liver", "SCT", "Liver"),
        ("spleen", "SCT", "Spleen"),
        ("kidney_left", "SCT", "Kidney"),
        ("kidney", "SCT", "Kidney"),
        ("pancreas", "SCT", "Pancreas"),
        ("prostate", "SCT", "Prostate"),
        ("prostate_peripheral_zone", "SCT", "PeripheralZoneOfTheProstate"),
        ("prostate_transition_zone", "SCT", "TransitionZoneOfTheProstate"),
        ("brain", "SCT", "Brain"),
        ("heart", "SCT", "Heart"),
        ("heart_atrium_left", "SCT", "LeftAtrium"),
        ("aorta", "SCT", "Aorta"),
        ("inferior_vena_cava", "SCT", "InferiorVenaCava"),
        ("hippocampus", "SCT", "Hippocampus"),
        ("csf", "SCT", "CerebrospinalFluid"),
        ("subclavian_artery_left", "SCT", "SubclavianArtery"),
        ("vertebrae_L1", "SCT", "L1Vertebra"),
        ("brain_tumor_enhancing", "NCIt", "EnhancingLesion"),
        ("brain_tumor_edema", "SCT", "Edema"),
    ],
)
def test_type_codes_match_pydicom(name, scheme, keyword):
    codes = pytest.importorskip("pydicom.sr.codedict").codes
    code = getattr(getattr(codes, scheme), keyword)
    assert vocab.structure(name).type == (code.value, code.scheme_designator, code.meaning)


def test_laterality_and_category_codes_match_pydicom():
    codes = pytest.importorskip("pydicom.sr.codedict").codes
    left, right = codes.SCT.Left, codes.SCT.Right
    assert vocab.structure("kidney_left").modifier == (left.value, "SCT", left.meaning)
    assert vocab.structure("kidney_right").modifier == (right.value, "SCT", right.meaning)
    anatomical = codes.SCT.AnatomicalStructure
    assert vocab.structure("liver").category == (anatomical.value, "SCT", anatomical.meaning)


def test_every_code_known_to_pydicom_has_its_meaning(pydicom_meanings):
    """A value/meaning pair that disagrees with DICOM PS3.16 is a typo in the table."""
    known = 0
    for item in STRUCTURES:
        for value, scheme, meaning in _codes(item):
            if (scheme, value) in pydicom_meanings:
                known += 1
                assert meaning in pydicom_meanings[(scheme, value)], (item.name, value, meaning)
    assert known > 350  # most codes are cross-checked, not just a few


def test_colors_are_rgb():
    for item in STRUCTURES:
        assert len(item.color) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in item.color), item.name


def test_vocabulary_table_is_json_in_id_order():
    table = vocab.vocabulary_table()
    assert [row["id"] for row in table] == sorted(s.id for s in STRUCTURES)
    restored = json.loads(json.dumps(table))
    liver = next(row for row in restored if row["name"] == "liver")
    assert liver["id"] == 5 and liver["parent"] is None
    assert liver["type"] == {"value": "10200004", "scheme": "SCT", "meaning": "Liver"}
    cyst = next(row for row in restored if row["name"] == "kidney_cyst_left")
    assert cyst["lateral_pair"] == "kidney_cyst_right" and cyst["region"]["meaning"] == "Kidney"
    assert cyst["color"] == list(vocab.structure("kidney_cyst_left").color)
