"""medaug: labelled synthetic CT/MRI slices for segmentation training.

The package follows ``DESIGN.md`` §2: ``io`` reads and writes medical images, ``phantoms`` makes
procedural labelled volumes, ``prepare`` harmonizes volumes into a slice index, ``models``/``train``
hold MedVAR, ``synth`` generates, ``eval`` measures. Heavy modules are imported where used.
"""

__version__ = "0.1.0"
