"""``medaug synthesize``: the plan, the batched engine, the exporters and the manifest (DESIGN §1, §3).

* :mod:`medaug.synth.export`: write model-space samples as PNG, NIfTI and nnU-Net raw files; also the real
  slices of a prepared dataset into the same nnU-Net dataset, so real and synthetic train together.
"""
