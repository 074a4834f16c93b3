"""MedVAR models: architecture only (no file paths, no distributed code, no printing; DESIGN.md §2).

``quant``: the multi-scale residual quantizer; ``vqvae``: the paired image + label-map tokenizer;
``losses``: tokenizer losses and the PatchGAN discriminator.
"""

from medaug.models.quant import MultiScaleQuantizer, QuantizerConfig, default_patch_sides, phi_assignment
from medaug.models.vqvae import VQVAE, VQVAEConfig, label_to_onehot, logits_to_label

__all__ = [
    "MultiScaleQuantizer",
    "QuantizerConfig",
    "VQVAE",
    "VQVAEConfig",
    "default_patch_sides",
    "label_to_onehot",
    "logits_to_label",
    "phi_assignment",
]
