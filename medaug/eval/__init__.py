"""Evaluation of synthetic slices against real prepared data (``medaug evaluate``, DESIGN.md §1, issues 10-11).

Modules (imported where used, so ``import medaug.eval`` stays light):

* ``nets``: feature networks in plain torch: Inception-v3 in the FID convention (pytorch-fid's names),
  ResNet-50 with torchvision's names (RadImageNet), and medaug's own slice encoder;
* ``features``: backbones loaded from local files only (``inception-fid``, ``radimagenet-resnet50``,
  ``clip``, ``medaug``), their input conventions, and feature extraction over a prepared dataset;
* ``metrics``: distribution metrics on feature sets (FID, KID, CMMD, precision/recall, density/coverage,
  bootstrap intervals, the real-vs-real floor, the efficiency score);
* ``memorization``: nearest real training slices of synthetic samples, in features and pixels;
* ``fidelity``: intensities inside generated masks against real ones, per structure;
* ``lineage``: the guard against real evaluation data from the generator's training patients;
* ``evaluate``: the ``medaug evaluate metrics`` stage; ``report``: metrics.json, report.md, report.html;
* ``segmentation``: the MONAI UNet, its seeded training loop, Dice/HD95 scoring and mask fidelity;
* ``downstream``: ``medaug evaluate downstream`` (real / real+synthetic / synthetic arms, seeds, real-data
  fractions, report);
* ``acceptance``: the quality bar a generator must clear (target presence, mask agreement, distances to the
  real floor and to noise, near copies), run by ``medaug demo`` and a slow test (issue 11).

medaug's own encoder is trained by ``medaug train features`` (``medaug.train.features_task``).
"""
