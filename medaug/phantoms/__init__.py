"""Procedural CT/MR phantoms with label maps, for the demo and the tests (DESIGN §2 ``phantoms/``).

Three domains, each a pure function of a seed (numpy ``default_rng(seed)``):

* ``ct_abdomen`` (recipe domain ``ct/abdomen``, channel ``ct`` in HU): body, subcutaneous fat, muscle,
  liver, spleen, kidneys, aorta, vertebrae (:mod:`medaug.phantoms.ct_abdomen`);
* ``mr_prostate`` (``mr/prostate``, channels ``t2``, ``adc``): bladder, prostate peripheral and
  transition zones, rectum (:mod:`medaug.phantoms.mr_prostate`);
* ``mr_brain`` (``mr/brain``, channels ``flair``, ``t1c``): skull, CSF, grey and white matter, tumour
  edema, enhancing rim and necrosis (:mod:`medaug.phantoms.mr_brain`).

``make_phantom(domain, seed, shape)`` returns a :class:`Phantom` (image and label Volumes on one RAS
grid, the label table, channel names); ``write_phantoms(out_dir, ...)`` writes NIfTI and/or DICOM
subjects in the layout of ``recipes/datasets/phantom_*.yaml`` (see :mod:`medaug.phantoms.write`).
"""

from medaug.phantoms.base import GENERATOR_VERSION, DomainSpec, Phantom
from medaug.phantoms.make import (
    DOMAINS,
    SIZES,
    SPECS,
    make_phantom,
    resolve_domain,
    resolve_shape,
    subject_seed,
)
from medaug.phantoms.write import (
    FORMATS,
    SubjectResult,
    resolve_formats,
    subject_folder,
    write_phantoms,
)

__all__ = [
    "DOMAINS",
    "FORMATS",
    "GENERATOR_VERSION",
    "SIZES",
    "SPECS",
    "DomainSpec",
    "Phantom",
    "SubjectResult",
    "make_phantom",
    "resolve_domain",
    "resolve_formats",
    "resolve_shape",
    "subject_folder",
    "subject_seed",
    "write_phantoms",
]
