"""``medaug prepare``: sources → harmonize → slices → index + shards (DESIGN §1, §3).

* :mod:`medaug.prepare.sources`: find the volumes of a dataset folder and load them.
* :mod:`medaug.prepare.harmonize`: RAS, slicing plane, resampling, intensity, crop/pad, labels.
* :mod:`medaug.prepare.pipeline`: the resumable batch job and its finalization (splits, index files).
"""
