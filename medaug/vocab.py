"""The structure vocabulary: one table of the anatomical structures and lesions medaug knows (DESIGN §3 "Labels").

Every label map that medaug writes uses these ids (uint8): ``BACKGROUND = 0``, ``IGNORE = 255`` (pixels
that losses and metrics skip), structures 1..254. Dataset recipes (``recipes/datasets/*.yaml``) map each
source dataset's own label ids to the names below.

Ids are **append-only**: an id, once released, keeps its name and meaning forever, and is never
renumbered or reused, because prepared datasets, checkpoints and synthetic label maps store ids. New
structures take the next free id at the end of the table; a structure that turns out to be wrong is
documented as deprecated, never removed.

* Ids 1..117 are the TotalSegmentator v2 ``total`` classes with TotalSegmentator's own ids and names
  (``class_map["total"]`` in ``totalsegmentator/map_to_binary.py``), so a TotalSegmentator v2 multilabel
  map is already a medaug label map. ``TOTALSEGMENTATOR_V2`` lists them in id order.
* Ids 118.. are the structures other datasets and the phantoms need: parents that group TotalSegmentator
  classes (``kidney``, ``lung``, ``vertebrae``, ...), body and tissue classes, heart chambers, prostate zones,
  brain tissues, and lesions.

``parent`` is containment: a structure lies inside its parent, and a lesion is a child of its organ
(``liver`` ⊃ ``liver_tumor``; ``kidney_left`` ⊃ ``kidney_cyst_left``). ``resolve("prostate")`` therefore
selects the prostate and its zones, which is what ``--organ prostate`` means. A source that labels only
the parent (KiTS ``kidney``) is mapped to the parent; one that labels the parts is mapped to the parts.

DICOM SEG codes are (code value, coding scheme designator, code meaning) triples: ``category``
(SegmentedPropertyCategoryCodeSequence, DICOM PS3.16 CID 7150: SCT 91723000 "Anatomical Structure",
SCT 49755003 "Morphologically Abnormal Structure", SCT 85756007 "Tissue", SCT 91720002 "Body
Substance"), ``type`` (SegmentedPropertyTypeCodeSequence, e.g. SCT 10200004 "Liver"), ``modifier``
(SCT 7771000 "Left", SCT 24028007 "Right", or another qualifier such as "Anterior") and ``region``
(AnatomicRegionSequence: where a lesion or a generic tissue lies, e.g. "Neoplasm" in "Liver"). When a
structure has a ``region``, a laterality ``modifier`` qualifies the region (AnatomicRegionModifierSequence:
a cyst of the left kidney); otherwise it qualifies the type (SegmentedPropertyTypeModifierCodeSequence).
The (category, type, modifier, region) tuple is unique per structure, so a DICOM SEG maps back to one name.

Sources of the codes and colours: the type codes and display colours of the TotalSegmentator classes
follow TotalSegmentator's ``resources/totalsegmentator_snomed_mapping.csv`` (Apache-2.0), with the code
meanings and the category "Anatomical Structure" (SCT 91723000; the CSV uses the retired SCT 123037004)
taken from DICOM PS3.16 as pydicom's ``pydicom.sr.codedict`` ships it, and two fixes: the subclavian
arteries use SCT 36765005 "Subclavian artery" (the CSV's 29700009 is the *right* subclavian artery) and
``gluteus_minimus`` uses SCT 75297007. The other codes come from ``pydicom.sr.codedict.codes``.

Laterality is the body side of a structure (the ``left``/``right`` token of its name, coded as the Left/Right
modifier unless the type code is already sided, as in "Middle lobe of right lung"); ``lateral_pair`` names
its mirror image, which a left-right flip must swap it with (``lateral_swap``, ``lateral_swap_lut``). Heart
chambers are named left/right but are not mirror images of each other, so they have no laterality.

Import is instant and needs only the standard library: the table is plain tuples.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, Mapping, NamedTuple

from medaug.errors import LabelError

BACKGROUND = 0
IGNORE = 255
MAX_ID = 254

Code = tuple[str, str, str]  # (code value, coding scheme designator, code meaning)
Laterality = Literal["left", "right"]
Color = tuple[int, int, int]  # RGB, 0..255

_AS: Code = ("91723000", "SCT", "Anatomical Structure")
_MAS: Code = ("49755003", "SCT", "Morphologically Abnormal Structure")
_TISSUE: Code = ("85756007", "SCT", "Tissue")
_BODY_SUBSTANCE: Code = ("91720002", "SCT", "Body Substance")
_LEFT: Code = ("7771000", "SCT", "Left")
_RIGHT: Code = ("24028007", "SCT", "Right")


@dataclass(frozen=True)
class Structure:
    """One structure of the vocabulary.

    Attributes:
        name: snake_case name in TotalSegmentator v2 style (``kidney_left``, ``vertebrae_L1``).
        id: label value in medaug uint8 label maps, 1..254; append-only (see module docstring).
        parent: name of the structure that contains it, or None at the top.
        laterality: body side ("left"/"right"), or None for midline and unsided structures.
        lateral_pair: name of the mirror-image structure (``kidney_right`` for ``kidney_left``), or None.
        category, type, modifier, region: DICOM SEG codes, each (value, scheme designator, meaning).
        color: recommended display colour, RGB 0..255.
        description: what the label covers where the name alone is not enough.
    """

    name: str
    id: int
    parent: str | None
    laterality: Laterality | None
    lateral_pair: str | None
    category: Code
    type: Code
    modifier: Code | None
    region: Code | None
    color: Color
    description: str = ""

    def as_dict(self) -> dict:
        """JSON-ready dict (codes as {value, scheme, meaning}); one row of ``vocab.json``."""
        return {
            "id": self.id,
            "name": self.name,
            "parent": self.parent,
            "laterality": self.laterality,
            "lateral_pair": self.lateral_pair,
            "category": _code_dict(self.category),
            "type": _code_dict(self.type),
            "modifier": _code_dict(self.modifier),
            "region": _code_dict(self.region),
            "color": list(self.color),
            "description": self.description,
        }


class UnknownStructureError(LabelError, KeyError):
    """A name or id that is not in the vocabulary; the message lists close matches."""

    def __str__(self) -> str:  # KeyError would quote the message
        return f"{self.where}: {self.reason}"


def _code_dict(code: Code | None) -> dict | None:
    if code is None:
        return None
    value, scheme, meaning = code
    return {"value": value, "scheme": scheme, "meaning": meaning}


class _Row(NamedTuple):
    """One row of the table; ``_build`` adds laterality and the lateral pair."""

    id: int
    name: str
    parent: str | None
    category: Code
    type: Code
    modifier: Code | None
    region: Code | None
    color: Color
    description: str = ""


# id, name, parent, category, type, modifier, region, color[, description]. Append new rows at the end.
_ROWS: tuple[_Row, ...] = (
    # 1..117: TotalSegmentator v2 "total", TotalSegmentator's ids and names
    _Row(1, "spleen", None, _AS, ("78961009", "SCT", "Spleen"), None, None, (50, 170, 60)),
    _Row(2, "kidney_right", "kidney", _AS, ("64033007", "SCT", "Kidney"), _RIGHT, None, (34, 102, 136)),
    _Row(3, "kidney_left", "kidney", _AS, ("64033007", "SCT", "Kidney"), _LEFT, None, (46, 138, 184)),
    _Row(4, "gallbladder", None, _AS, ("28231008", "SCT", "Gallbladder"), None, None, (54, 216, 119)),
    _Row(5, "liver", None, _AS, ("10200004", "SCT", "Liver"), None, None, (40, 140, 40)),
    _Row(6, "stomach", None, _AS, ("69695003", "SCT", "Stomach"), None, None, (180, 70, 160)),
    _Row(7, "pancreas", None, _AS, ("15776009", "SCT", "Pancreas"), None, None, (60, 150, 80)),
    _Row(8, "adrenal_gland_right", "adrenal_gland", _AS, ("23451007", "SCT", "Adrenal gland"), _RIGHT, None, (178, 128, 26)),
    _Row(9, "adrenal_gland_left", "adrenal_gland", _AS, ("23451007", "SCT", "Adrenal gland"), _LEFT, None, (241, 172, 34)),
    _Row(10, "lung_upper_lobe_left", "lung_left", _AS, ("45653009", "SCT", "Upper lobe of lung"), _LEFT, None, (71, 232, 244)),
    _Row(11, "lung_lower_lobe_left", "lung_left", _AS, ("90572001", "SCT", "Lower lobe of lung"), _LEFT, None, (34, 195, 207)),
    _Row(12, "lung_upper_lobe_right", "lung_right", _AS, ("45653009", "SCT", "Upper lobe of lung"), _RIGHT, None, (100, 218, 227)),
    _Row(13, "lung_middle_lobe_right", "lung_right", _AS, ("72481006", "SCT", "Middle lobe of right lung"), None, None, (63, 181, 190)),
    _Row(14, "lung_lower_lobe_right", "lung_right", _AS, ("90572001", "SCT", "Lower lobe of lung"), _RIGHT, None, (26, 144, 153)),
    _Row(15, "esophagus", None, _AS, ("32849002", "SCT", "Esophagus"), None, None, (190, 90, 170)),
    _Row(16, "trachea", None, _AS, ("44567001", "SCT", "Trachea"), None, None, (0, 180, 200)),
    _Row(17, "thyroid_gland", None, _AS, ("69748006", "SCT", "Thyroid"), None, None, (250, 210, 60)),
    _Row(18, "small_bowel", None, _AS, ("30315005", "SCT", "Small intestine"), None, None, (160, 60, 180)),
    _Row(19, "duodenum", None, _AS, ("38848004", "SCT", "Duodenum"), None, None, (170, 80, 190)),
    _Row(20, "colon", None, _AS, ("71854001", "SCT", "Colon"), None, None, (150, 40, 170)),
    _Row(21, "urinary_bladder", None, _AS, ("89837001", "SCT", "Bladder"), None, None, (54, 94, 216)),
    _Row(22, "prostate", None, _AS, ("41216001", "SCT", "Prostate"), None, None, (91, 253, 156)),
    _Row(23, "kidney_cyst_left", "kidney_left", _MAS, ("367643001", "SCT", "Cyst"), _LEFT, ("64033007", "SCT", "Kidney"), (83, 175, 221)),
    _Row(24, "kidney_cyst_right", "kidney_right", _MAS, ("367643001", "SCT", "Cyst"), _RIGHT, ("64033007", "SCT", "Kidney"), (71, 139, 173)),
    _Row(25, "sacrum", None, _AS, ("54735007", "SCT", "Sacrum"), None, None, (100, 216, 54)),
    _Row(26, "vertebrae_S1", "vertebrae", _AS, ("65985001", "SCT", "S1 vertebra"), None, None, (205, 180, 145)),
    _Row(27, "vertebrae_L5", "vertebrae_lumbar", _AS, ("49668003", "SCT", "L5 vertebra"), None, None, (137, 112, 77)),
    _Row(28, "vertebrae_L4", "vertebrae_lumbar", _AS, ("11994002", "SCT", "L4 vertebra"), None, None, (100, 75, 40)),
    _Row(29, "vertebrae_L3", "vertebrae_lumbar", _AS, ("36470004", "SCT", "L3 vertebra"), None, None, (63, 38, 3)),
    _Row(30, "vertebrae_L2", "vertebrae_lumbar", _AS, ("14293000", "SCT", "L2 vertebra"), None, None, (26, 1, 222)),
    _Row(31, "vertebrae_L1", "vertebrae_lumbar", _AS, ("66794005", "SCT", "L1 vertebra"), None, None, (245, 220, 185)),
    _Row(32, "vertebrae_T12", "vertebrae_thoracic", _AS, ("23215003", "SCT", "T12 vertebra"), None, None, (69, 44, 9)),
    _Row(33, "vertebrae_T11", "vertebrae_thoracic", _AS, ("12989004", "SCT", "T11 vertebra"), None, None, (32, 7, 228)),
    _Row(34, "vertebrae_T10", "vertebrae_thoracic", _AS, ("7610001", "SCT", "T10 vertebra"), None, None, (251, 226, 191)),
    _Row(35, "vertebrae_T9", "vertebrae_thoracic", _AS, ("82687006", "SCT", "T9 vertebra"), None, None, (214, 189, 154)),
    _Row(36, "vertebrae_T8", "vertebrae_thoracic", _AS, ("11068009", "SCT", "T8 vertebra"), None, None, (177, 152, 117)),
    _Row(37, "vertebrae_T7", "vertebrae_thoracic", _AS, ("62487009", "SCT", "T7 vertebra"), None, None, (140, 115, 80)),
    _Row(38, "vertebrae_T6", "vertebrae_thoracic", _AS, ("45296009", "SCT", "T6 vertebra"), None, None, (103, 78, 43)),
    _Row(39, "vertebrae_T5", "vertebrae_thoracic", _AS, ("56401006", "SCT", "T5 vertebra"), None, None, (66, 41, 6)),
    _Row(40, "vertebrae_T4", "vertebrae_thoracic", _AS, ("73071006", "SCT", "T4 vertebra"), None, None, (29, 4, 225)),
    _Row(41, "vertebrae_T3", "vertebrae_thoracic", _AS, ("1626008", "SCT", "T3 vertebra"), None, None, (248, 223, 188)),
    _Row(42, "vertebrae_T2", "vertebrae_thoracic", _AS, ("53733008", "SCT", "T2 vertebra"), None, None, (211, 186, 151)),
    _Row(43, "vertebrae_T1", "vertebrae_thoracic", _AS, ("64864005", "SCT", "T1 vertebra"), None, None, (174, 149, 114)),
    _Row(44, "vertebrae_C7", "vertebrae_cervical", _AS, ("87391001", "SCT", "C7 vertebra"), None, None, (208, 183, 148)),
    _Row(45, "vertebrae_C6", "vertebrae_cervical", _AS, ("36054005", "SCT", "C6 vertebra"), None, None, (171, 146, 111)),
    _Row(46, "vertebrae_C5", "vertebrae_cervical", _AS, ("36978003", "SCT", "C5 vertebra"), None, None, (134, 109, 74)),
    _Row(47, "vertebrae_C4", "vertebrae_cervical", _AS, ("5329002", "SCT", "C4 vertebra"), None, None, (97, 72, 37)),
    _Row(48, "vertebrae_C3", "vertebrae_cervical", _AS, ("113205007", "SCT", "C3 vertebra"), None, None, (60, 35, 0)),
    _Row(49, "vertebrae_C2", "vertebrae_cervical", _AS, ("39976000", "SCT", "C2 vertebra"), None, None, (23, 254, 219)),
    _Row(50, "vertebrae_C1", "vertebrae_cervical", _AS, ("14806007", "SCT", "C1 vertebra"), None, None, (242, 217, 182)),
    _Row(51, "heart", None, _AS, ("80891009", "SCT", "Heart"), None, None, (180, 0, 40)),
    _Row(52, "aorta", None, _AS, ("15825003", "SCT", "Aorta"), None, None, (216, 108, 54)),
    _Row(53, "pulmonary_vein", None, _AS, ("122972007", "SCT", "Pulmonary vein"), None, None, (37, 107, 237)),
    _Row(54, "brachiocephalic_trunk", None, _AS, ("12691009", "SCT", "Innominate artery"), None, None, (190, 10, 10)),
    _Row(55, "subclavian_artery_right", None, _AS, ("36765005", "SCT", "Subclavian artery"), _RIGHT, None, (162, 26, 26)),
    _Row(56, "subclavian_artery_left", None, _AS, ("36765005", "SCT", "Subclavian artery"), _LEFT, None, (218, 34, 34)),
    _Row(57, "common_carotid_artery_right", None, _AS, ("32062004", "SCT", "Common carotid artery"), _RIGHT, None, (170, 17, 17)),
    _Row(58, "common_carotid_artery_left", None, _AS, ("32062004", "SCT", "Common carotid artery"), _LEFT, None, (230, 23, 23)),
    _Row(59, "brachiocephalic_vein_left", None, _AS, ("8887007", "SCT", "Innominate vein"), _LEFT, None, (0, 92, 241)),
    _Row(60, "brachiocephalic_vein_right", None, _AS, ("8887007", "SCT", "Innominate vein"), _RIGHT, None, (0, 68, 178)),
    _Row(61, "atrial_appendage_left", "heart_atrium_left", _AS, ("68786006", "SCT", "Auricular appendage"), _LEFT, None, (68, 248, 62)),
    _Row(62, "superior_vena_cava", None, _AS, ("48345005", "SCT", "Superior vena cava"), None, None, (74, 144, 18)),
    _Row(63, "inferior_vena_cava", None, _AS, ("64131007", "SCT", "Inferior vena cava"), None, None, (0, 70, 200)),
    _Row(64, "portal_vein_and_splenic_vein", None, _AS, ("110765007", "SCT", "Portal vein and splenic vein"), None, None, (0, 90, 220)),
    _Row(65, "iliac_artery_left", "iliac_artery", _AS, ("73634005", "SCT", "Common iliac artery"), _LEFT, None, (218, 0, 0)),
    _Row(66, "iliac_artery_right", "iliac_artery", _AS, ("73634005", "SCT", "Common iliac artery"), _RIGHT, None, (162, 0, 0)),
    _Row(67, "iliac_vena_left", "iliac_vena", _AS, ("46027005", "SCT", "Common iliac vein"), _LEFT, None, (0, 92, 230)),
    _Row(68, "iliac_vena_right", "iliac_vena", _AS, ("46027005", "SCT", "Common iliac vein"), _RIGHT, None, (0, 68, 170)),
    _Row(69, "humerus_left", "humerus", _AS, ("85050009", "SCT", "Humerus"), _LEFT, None, (71, 62, 248)),
    _Row(70, "humerus_right", "humerus", _AS, ("85050009", "SCT", "Humerus"), _RIGHT, None, (115, 46, 184)),
    _Row(71, "scapula_left", "scapula", _AS, ("79601000", "SCT", "Scapula"), _LEFT, None, (253, 230, 195)),
    _Row(72, "scapula_right", "scapula", _AS, ("79601000", "SCT", "Scapula"), _RIGHT, None, (187, 170, 144)),
    _Row(73, "clavicula_left", "clavicula", _AS, ("51299004", "SCT", "Clavicle"), _LEFT, None, (255, 236, 201)),
    _Row(74, "clavicula_right", "clavicula", _AS, ("51299004", "SCT", "Clavicle"), _RIGHT, None, (191, 174, 149)),
    _Row(75, "femur_left", "femur", _AS, ("71341001", "SCT", "Femur"), _LEFT, None, (248, 212, 62)),
    _Row(76, "femur_right", "femur", _AS, ("71341001", "SCT", "Femur"), _RIGHT, None, (46, 184, 60)),
    _Row(77, "hip_left", "hip", _AS, ("29836001", "SCT", "Hip"), _LEFT, None, (230, 248, 62)),
    _Row(78, "hip_right", "hip", _AS, ("29836001", "SCT", "Hip"), _RIGHT, None, (184, 46, 184)),
    _Row(79, "spinal_cord", None, _AS, ("2748008", "SCT", "Spinal cord"), None, None, (255, 215, 0)),
    _Row(80, "gluteus_maximus_left", "gluteus_maximus", _AS, ("181674001", "SCT", "Gluteus maximus muscle"), _LEFT, None, (253, 115, 34)),
    _Row(81, "gluteus_maximus_right", "gluteus_maximus", _AS, ("181674001", "SCT", "Gluteus maximus muscle"), _RIGHT, None, (187, 85, 26)),
    _Row(82, "gluteus_medius_left", "gluteus_medius", _AS, ("78333006", "SCT", "Gluteus medius muscle"), _LEFT, None, (255, 126, 46)),
    _Row(83, "gluteus_medius_right", "gluteus_medius", _AS, ("78333006", "SCT", "Gluteus medius muscle"), _RIGHT, None, (196, 94, 34)),
    _Row(84, "gluteus_minimus_left", "gluteus_minimus", _AS, ("75297007", "SCT", "Gluteus minimus muscle"), _LEFT, None, (255, 138, 57)),
    _Row(85, "gluteus_minimus_right", "gluteus_minimus", _AS, ("75297007", "SCT", "Gluteus minimus muscle"), _RIGHT, None, (204, 102, 42)),
    _Row(86, "autochthon_left", "autochthon", _AS, ("244849004", "SCT", "Deep muscle of back"), _LEFT, None, (241, 126, 57)),
    _Row(87, "autochthon_right", "autochthon", _AS, ("244849004", "SCT", "Deep muscle of back"), _RIGHT, None, (178, 94, 42)),
    _Row(88, "iliopsoas_left", "iliopsoas", _AS, ("68455001", "SCT", "Iliopsoas muscle"), _LEFT, None, (230, 115, 46)),
    _Row(89, "iliopsoas_right", "iliopsoas", _AS, ("68455001", "SCT", "Iliopsoas muscle"), _RIGHT, None, (170, 85, 34)),
    _Row(90, "brain", None, _AS, ("12738006", "SCT", "Brain"), None, None, (216, 54, 149)),
    _Row(91, "skull", None, _AS, ("89546000", "SCT", "Skull"), None, None, (245, 225, 200)),
    _Row(92, "rib_left_1", "ribs", _AS, ("48535007", "SCT", "First rib"), _LEFT, None, (214, 54, 216)),
    _Row(93, "rib_left_2", "ribs", _AS, ("78247007", "SCT", "Second rib"), _LEFT, None, (181, 54, 216)),
    _Row(94, "rib_left_3", "ribs", _AS, ("25888004", "SCT", "Third rib"), _LEFT, None, (216, 54, 162)),
    _Row(95, "rib_left_4", "ribs", _AS, ("25523003", "SCT", "Fourth rib"), _LEFT, None, (54, 121, 216)),
    _Row(96, "rib_left_5", "ribs", _AS, ("15339008", "SCT", "Fifth rib"), _LEFT, None, (54, 216, 146)),
    _Row(97, "rib_left_6", "ribs", _AS, ("59558009", "SCT", "Sixth rib"), _LEFT, None, (121, 216, 54)),
    _Row(98, "rib_left_7", "ribs", _AS, ("24915002", "SCT", "Seventh rib"), _LEFT, None, (149, 54, 216)),
    _Row(99, "rib_left_8", "ribs", _AS, ("5953002", "SCT", "Eighth rib"), _LEFT, None, (216, 81, 54)),
    _Row(100, "rib_left_9", "ribs", _AS, ("22565002", "SCT", "Ninth rib"), _LEFT, None, (216, 54, 167)),
    _Row(101, "rib_left_10", "ribs", _AS, ("77644006", "SCT", "Tenth rib"), _LEFT, None, (54, 146, 216)),
    _Row(102, "rib_left_11", "ribs", _AS, ("58830002", "SCT", "Eleventh rib"), _LEFT, None, (158, 253, 91)),
    _Row(103, "rib_left_12", "ribs", _AS, ("43993008", "SCT", "Twelfth rib"), _LEFT, None, (216, 54, 86)),
    _Row(104, "rib_right_1", "ribs", _AS, ("48535007", "SCT", "First rib"), _RIGHT, None, (91, 158, 253)),
    _Row(105, "rib_right_2", "ribs", _AS, ("78247007", "SCT", "Second rib"), _RIGHT, None, (211, 216, 54)),
    _Row(106, "rib_right_3", "ribs", _AS, ("25888004", "SCT", "Third rib"), _RIGHT, None, (216, 54, 59)),
    _Row(107, "rib_right_4", "ribs", _AS, ("25523003", "SCT", "Fourth rib"), _RIGHT, None, (216, 54, 67)),
    _Row(108, "rib_right_5", "ribs", _AS, ("15339008", "SCT", "Fifth rib"), _RIGHT, None, (157, 216, 54)),
    _Row(109, "rib_right_6", "ribs", _AS, ("59558009", "SCT", "Sixth rib"), _RIGHT, None, (216, 54, 189)),
    _Row(110, "rib_right_7", "ribs", _AS, ("24915002", "SCT", "Seventh rib"), _RIGHT, None, (216, 54, 132)),
    _Row(111, "rib_right_8", "ribs", _AS, ("5953002", "SCT", "Eighth rib"), _RIGHT, None, (216, 203, 54)),
    _Row(112, "rib_right_9", "ribs", _AS, ("22565002", "SCT", "Ninth rib"), _RIGHT, None, (216, 197, 54)),
    _Row(113, "rib_right_10", "ribs", _AS, ("77644006", "SCT", "Tenth rib"), _RIGHT, None, (216, 159, 54)),
    _Row(114, "rib_right_11", "ribs", _AS, ("58830002", "SCT", "Eleventh rib"), _RIGHT, None, (54, 135, 216)),
    _Row(115, "rib_right_12", "ribs", _AS, ("43993008", "SCT", "Twelfth rib"), _RIGHT, None, (181, 216, 54)),
    _Row(116, "sternum", None, _AS, ("56873002", "SCT", "Sternum"), None, None, (215, 195, 165)),
    _Row(117, "costal_cartilages", None, _AS, ("50016007", "SCT", "Costal Cartilage"), None, None, (250, 220, 190)),
    # 118..: groups of TotalSegmentator classes, tissues, and what the other datasets and the phantoms label
    _Row(118, "body", None, _AS, ("38266002", "SCT", "Entire body"), None, None, (177, 122, 101),
         "Body outline: everything inside the skin (phantoms, body masks)."),
    _Row(119, "subcutaneous_fat", None, _TISSUE, ("67769002", "SCT", "Subcutaneous fatty tissue"), None, None, (255, 242, 178),
         "TotalSegmentator 'tissue_types' task."),
    _Row(120, "torso_fat", None, _TISSUE, ("55603005", "SCT", "Fat"), None, ("22943007", "SCT", "Trunk"), (250, 235, 160),
         "TotalSegmentator 'tissue_types' task: fat inside the torso (not subcutaneous)."),
    _Row(121, "skeletal_muscle", None, _AS, ("127954009", "SCT", "Skeletal muscle"), None, None, (230, 130, 40),
         "TotalSegmentator 'tissue_types' task."),
    _Row(122, "kidney", None, _AS, ("64033007", "SCT", "Kidney"), None, None, (40, 120, 160),
         "Both kidneys, or a kidney whose side is not given (KiTS 'kidney')."),
    _Row(123, "adrenal_gland", None, _AS, ("23451007", "SCT", "Adrenal gland"), None, None, (210, 150, 30)),
    _Row(124, "lung", None, _AS, ("39607008", "SCT", "Lung"), None, None, (197, 165, 145)),
    _Row(125, "lung_left", "lung", _AS, ("39607008", "SCT", "Lung"), _LEFT, None, (185, 150, 130)),
    _Row(126, "lung_right", "lung", _AS, ("39607008", "SCT", "Lung"), _RIGHT, None, (210, 180, 160)),
    _Row(127, "vertebrae", None, _AS, ("51282000", "SCT", "Vertebra"), None, None, (241, 214, 145),
         "All vertebrae (TotalSegmentator MR 'vertebrae')."),
    _Row(128, "vertebrae_cervical", "vertebrae", _AS, ("51282000", "SCT", "Vertebra"), None, ("122494005", "SCT", "Cervical spine"), (180, 155, 120)),
    _Row(129, "vertebrae_thoracic", "vertebrae", _AS, ("51282000", "SCT", "Vertebra"), None, ("122495006", "SCT", "Thoracic spine"), (143, 118, 83)),
    _Row(130, "vertebrae_lumbar", "vertebrae", _AS, ("51282000", "SCT", "Vertebra"), None, ("122496007", "SCT", "Lumbar spine"), (106, 81, 46)),
    _Row(131, "ribs", None, _AS, ("113197003", "SCT", "Rib"), None, None, (230, 210, 180)),
    _Row(132, "iliac_artery", None, _AS, ("73634005", "SCT", "Common iliac artery"), None, None, (190, 0, 0)),
    _Row(133, "iliac_vena", None, _AS, ("46027005", "SCT", "Common iliac vein"), None, None, (0, 80, 200)),
    _Row(134, "humerus", None, _AS, ("85050009", "SCT", "Humerus"), None, None, (216, 111, 54)),
    _Row(135, "scapula", None, _AS, ("79601000", "SCT", "Scapula"), None, None, (220, 200, 170)),
    _Row(136, "clavicula", None, _AS, ("51299004", "SCT", "Clavicle"), None, None, (225, 205, 175)),
    _Row(137, "femur", None, _AS, ("71341001", "SCT", "Femur"), None, None, (216, 54, 56)),
    _Row(138, "hip", None, _AS, ("29836001", "SCT", "Hip"), None, None, (216, 184, 54)),
    _Row(139, "gluteus_maximus", None, _AS, ("181674001", "SCT", "Gluteus maximus muscle"), None, None, (220, 100, 30)),
    _Row(140, "gluteus_medius", None, _AS, ("78333006", "SCT", "Gluteus medius muscle"), None, None, (230, 110, 40)),
    _Row(141, "gluteus_minimus", None, _AS, ("75297007", "SCT", "Gluteus minimus muscle"), None, None, (240, 120, 50)),
    _Row(142, "autochthon", None, _AS, ("244849004", "SCT", "Deep muscle of back"), None, None, (210, 110, 50)),
    _Row(143, "iliopsoas", None, _AS, ("68455001", "SCT", "Iliopsoas muscle"), None, None, (200, 100, 40)),
    _Row(144, "heart_atrium_left", "heart", _AS, ("82471001", "SCT", "Left atrium"), None, None, (184, 0, 69),
         "Left atrial cavity (blood pool)."),
    _Row(145, "heart_atrium_right", "heart", _AS, ("73829009", "SCT", "Right atrium"), None, None, (136, 0, 51),
         "Right atrial cavity (blood pool)."),
    _Row(146, "heart_ventricle_left", "heart", _AS, ("87878005", "SCT", "Left ventricle"), None, None, (161, 0, 92),
         "Left ventricular cavity (blood pool; ACDC 'LV')."),
    _Row(147, "heart_ventricle_right", "heart", _AS, ("53085002", "SCT", "Right ventricle"), None, None, (119, 0, 68),
         "Right ventricular cavity (blood pool; ACDC 'RV')."),
    _Row(148, "heart_myocardium", "heart", _AS, ("49848007", "SCT", "Left Ventricle Myocardium"), None, None, (200, 0, 20),
         "Left-ventricular myocardium (ACDC 'MYO', TotalSegmentator heartchambers)."),
    _Row(149, "pulmonary_artery", None, _AS, ("81040000", "SCT", "Pulmonary artery"), None, None, (180, 0, 0),
         "TotalSegmentator v1 / heartchambers_highres."),
    _Row(150, "prostate_peripheral_zone", "prostate", _AS, ("279706003", "SCT", "Peripheral zone of the prostate"), None, None, (255, 188, 160),
         "MSD Task05 'PZ'."),
    _Row(151, "prostate_transition_zone", "prostate", _AS, ("399384005", "SCT", "Transition zone of the prostate"), None, None, (200, 120, 100),
         "MSD Task05 'TZ' (transition and central zone)."),
    _Row(152, "prostate_or_uterus", None, _AS, ("91772007", "SCT", "Organ"), None, ("816092008", "SCT", "Pelvis"), (215, 150, 140),
         "AMOS 'prostate/uterus': one label for the prostate in men and the uterus in women."),
    _Row(153, "rectum", None, _AS, ("34402009", "SCT", "Rectum"), None, None, (216, 132, 105)),
    _Row(154, "uterus", None, _AS, ("35039007", "SCT", "Uterus"), None, None, (227, 155, 150)),
    _Row(155, "csf", None, _BODY_SUBSTANCE, ("65216001", "SCT", "Cerebrospinal Fluid"), None, None, (85, 188, 255),
         "Intracranial cerebrospinal fluid (ventricles and subarachnoid space)."),
    _Row(156, "brain_grey_matter", "brain", _AS, ("389081007", "SCT", "Gray Matter"), None, None, (130, 130, 130)),
    _Row(157, "brain_white_matter", "brain", _AS, ("389080008", "SCT", "White Matter"), None, None, (245, 245, 225)),
    _Row(158, "hippocampus", "brain", _AS, ("5366008", "SCT", "Hippocampus"), None, None, (220, 216, 20)),
    _Row(159, "hippocampus_anterior", "hippocampus", _AS, ("5366008", "SCT", "Hippocampus"), ("255549009", "SCT", "Anterior"), None, (240, 230, 60),
         "Hippocampal head (MSD Task04 'Anterior')."),
    _Row(160, "hippocampus_posterior", "hippocampus", _AS, ("5366008", "SCT", "Hippocampus"), ("255551008", "SCT", "Posterior"), None, (180, 170, 10),
         "Hippocampal body and tail (MSD Task04 'Posterior')."),
    _Row(161, "brain_tumor", "brain", _MAS, ("108369006", "SCT", "Neoplasm"), None, ("12738006", "SCT", "Brain"), (255, 110, 110),
         "Whole brain tumour (BraTS 'WT'); label it only where parts are not given."),
    _Row(162, "brain_tumor_edema", "brain_tumor", _MAS, ("79654002", "SCT", "Edema"), None, ("12738006", "SCT", "Brain"), (0, 200, 0),
         "Peritumoural edema / FLAIR hyperintensity (BraTS 'ED', 2023 'SNFH')."),
    _Row(163, "brain_tumor_enhancing", "brain_tumor", _MAS, ("C113842", "NCIt", "Enhancing Lesion"), None, ("12738006", "SCT", "Brain"), (255, 255, 0),
         "Gd-enhancing tumour (BraTS 'ET')."),
    _Row(164, "brain_tumor_non_enhancing_core", "brain_tumor", _MAS, ("C81175", "NCIt", "Non-Enhancing Lesion"), None, ("12738006", "SCT", "Brain"), (255, 0, 0),
         "Necrotic and non-enhancing tumour core (BraTS 2017-2021 'NCR/NET', BraTS 2023 'NETC', MSD Task01 'non-enhancing tumor'); BraTS 2013 'non-enhancing tumour'."),
    _Row(165, "brain_tumor_necrosis", "brain_tumor_non_enhancing_core", _MAS, ("6574001", "SCT", "Necrosis"), None, ("12738006", "SCT", "Brain"), (140, 0, 0),
         "Necrosis (BraTS 2013 label 1)."),
    _Row(166, "liver_tumor", "liver", _MAS, ("108369006", "SCT", "Neoplasm"), None, ("10200004", "SCT", "Liver"), (255, 0, 200),
         "Liver tumours, primary or secondary (LiTS / MSD Task03 'cancer', MSD Task08 'Tumour')."),
    _Row(167, "liver_vessels", "liver", _AS, ("59820001", "SCT", "Blood Vessel"), None, ("10200004", "SCT", "Liver"), (60, 160, 60),
         "Hepatic vessels (MSD Task08 'Vessel'; TotalSegmentator 'liver_vessels')."),
    _Row(168, "kidney_tumor", "kidney", _MAS, ("108369006", "SCT", "Neoplasm"), None, ("64033007", "SCT", "Kidney"), (255, 60, 60),
         "Renal tumour (KiTS 'tumor')."),
    _Row(169, "kidney_cyst", "kidney", _MAS, ("367643001", "SCT", "Cyst"), None, ("64033007", "SCT", "Kidney"), (100, 190, 230),
         "Renal cyst, side not given (KiTS 'cyst')."),
    _Row(170, "pancreas_tumor", "pancreas", _MAS, ("108369006", "SCT", "Neoplasm"), None, ("15776009", "SCT", "Pancreas"), (200, 40, 120),
         "Pancreatic tumour or cyst (MSD Task07 'cancer')."),
    _Row(171, "lung_tumor", "lung", _MAS, ("108369006", "SCT", "Neoplasm"), None, ("39607008", "SCT", "Lung"), (230, 60, 60),
         "Lung tumour (MSD Task06 'cancer': non-small-cell lung cancer)."),
    _Row(172, "colon_tumor", "colon", _MAS, ("108369006", "SCT", "Neoplasm"), None, ("71854001", "SCT", "Colon"), (190, 40, 80),
         "Primary colon cancer (MSD Task10 'colon cancer primaries')."),
)


# Named left/right but not mirror images of each other: a left-right flip must not swap them.
_NOT_LATERAL = frozenset({"heart_atrium_left", "heart_atrium_right", "heart_ventricle_left", "heart_ventricle_right"})


def _laterality(name: str) -> Laterality | None:
    """Body side from the name's ``left``/``right`` token (``rib_left_3``, ``lung_middle_lobe_right``)."""
    tokens = set(name.split("_"))
    if name in _NOT_LATERAL:
        return None
    if "left" in tokens:
        return "left"
    if "right" in tokens:
        return "right"
    return None


def _mirror_name(name: str) -> str:
    """``rib_left_3`` -> ``rib_right_3``: swap the left/right token of a name."""
    swap = {"left": "right", "right": "left"}
    return "_".join(swap.get(token, token) for token in name.split("_"))


def _build(rows: tuple[_Row, ...]) -> dict[str, Structure]:
    """Structures from the rows, with laterality and mirror-image pairs from the names."""
    sides = {row.name: _laterality(row.name) for row in rows}
    table = {}
    for row in rows:
        mirror = _mirror_name(row.name)
        paired = sides[row.name] is not None and sides.get(mirror) not in (None, sides[row.name])
        table[row.name] = Structure(
            name=row.name,
            id=row.id,
            parent=row.parent,
            laterality=sides[row.name],
            lateral_pair=mirror if paired else None,
            category=row.category,
            type=row.type,
            modifier=row.modifier,
            region=row.region,
            color=row.color,
            description=row.description,
        )
    return table


VOCABULARY: Mapping[str, Structure] = MappingProxyType(_build(_ROWS))
_BY_ID: Mapping[int, Structure] = MappingProxyType({s.id: s for s in VOCABULARY.values()})
_CHILDREN: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {name: tuple(s.name for s in VOCABULARY.values() if s.parent == name) for name in VOCABULARY}
)

# The TotalSegmentator v2 "total" task: its class names in id order (TotalSegmentator id = medaug id).
TOTALSEGMENTATOR_V2: tuple[str, ...] = tuple(_BY_ID[i].name for i in range(1, 118))


def structure(name: str) -> Structure:
    """The structure called ``name``.

    Raises:
        UnknownStructureError: (a KeyError) naming the closest vocabulary names.
    """
    try:
        return VOCABULARY[name]
    except (KeyError, TypeError):
        raise UnknownStructureError("vocabulary", f"unknown structure {name!r}; {_suggest(str(name))}") from None


def _suggest(name: str) -> str:
    lowered = {key.lower(): key for key in VOCABULARY}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=5, cutoff=0.6)
    if close:
        return "close matches: " + ", ".join(lowered[key] for key in close)
    return "expected a name from medaug/vocab.py (see vocabulary_table())"


def by_id(id: int) -> Structure:
    """The structure with label value ``id`` (1..254); 0 (background) and 255 (ignore) are not structures."""
    try:
        return _BY_ID[int(id)]
    except (KeyError, TypeError, ValueError):
        special = {BACKGROUND: " (0 is background)", IGNORE: " (255 is ignore)"}.get(id, "")
        raise UnknownStructureError("vocabulary", f"no structure has id {id!r}{special}; expected 1..{max(_BY_ID)}") from None


def name_to_id() -> dict[str, int]:
    """Every structure name mapped to its label id (a fresh dict; callers may extend it)."""
    return {name: item.id for name, item in VOCABULARY.items()}


def children(name: str) -> list[str]:
    """Names of the direct children of ``name``, in id order."""
    structure(name)
    return list(_CHILDREN[name])


def descendants(name: str) -> list[str]:
    """Names of all structures below ``name`` (children, their children, ...), in id order."""
    found: set[str] = set()
    stack = children(name)
    while stack:
        child = stack.pop()
        found.add(child)
        stack.extend(_CHILDREN[child])
    return sorted(found, key=lambda n: VOCABULARY[n].id)


def ancestors(name: str) -> list[str]:
    """Names of the structures containing ``name``, nearest first."""
    chain = []
    parent = structure(name).parent
    while parent is not None:
        chain.append(parent)
        parent = VOCABULARY[parent].parent
    return chain


def resolve(name: str) -> list[str]:
    """The structure and everything below it: what ``--organ name`` selects (``prostate`` → prostate + zones)."""
    return [structure(name).name, *descendants(name)]


def lateral_swap(name: str) -> str:
    """The mirror-image structure of ``name`` (``kidney_left`` → ``kidney_right``); ``name`` itself if unpaired."""
    return structure(name).lateral_pair or name


def lateral_swap_lut() -> tuple[int, ...]:
    """256-entry lookup table, label id → id after a left-right flip (``lut[label_map]`` swaps pairs)."""
    lut = list(range(256))
    for item in VOCABULARY.values():
        if item.lateral_pair is not None:
            lut[item.id] = VOCABULARY[item.lateral_pair].id
    return tuple(lut)


def vocabulary_table() -> list[dict]:
    """Every structure as a JSON-ready dict, in id order (the content of ``vocab.json``)."""
    return [item.as_dict() for item in sorted(VOCABULARY.values(), key=lambda s: s.id)]
