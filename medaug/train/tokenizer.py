"""The tokenizer training task: its recipe, the :class:`TokenizerTask` the engine runs, and :func:`train_tokenizer`.

One recipe (``recipes/models/*.yaml``) holds every knob, loaded with :func:`load_tokenizer_recipe`:

* ``model``: :class:`~medaug.models.vqvae.VQVAEConfig` fields except ``image_channels`` and
  ``num_structures``, which come from the prepared dataset (the most channels of any domain; the
  structures annotated in the train split, :func:`~medaug.data.structures.read_structure_table`);
* ``losses``: :class:`LossConfig` (L1, SSIM, marginal CE, soft Dice, quantizer loss, hinge GAN after
  ``gan_start_step`` with the adaptive weight; the commitment weight is ``model.quantizer.beta``);
* ``train``: the engine's :class:`~medaug.train.engine.TrainConfig` (steps, batch, precision, optimizers
  by module name ``vqvae`` / ``discriminator``...);
* ``codebook``: :class:`CodebookConfig` (dead-code re-initialization);
* ``sampler``: :class:`~medaug.data.samplers.SamplerConfig`: how train rows are drawn. ``natural`` (the
  dataclass default) shuffles every row once per epoch; ``by: structure`` draws rows with rare structures
  more often (the recipes ship ``power: 0.5``). A tokenizer that rarely sees a structure cannot put it in
  its codes, and MedVAR can only generate what the codes hold: in a BraTS + phantoms run at 64² (prostate
  slices 8 % of the train split, natural order, 1,200 steps) the prostate zones reconstructed with Dice 0
  and no generated prostate mask showed a prostate;
* ``eval``: :class:`~medaug.train.tokenizer_eval.EvalConfig`.

Training step (per batch): VQ-VAE forward; L1 (+ SSIM) over the channels each row's domain has; marginal
cross-entropy + soft Dice over the structures each row annotates (``medaug.models.losses``); the
quantizer's loss; after ``gan_start_step`` the generator hinge loss times ``gan`` × the adaptive weight
‖∇rec‖/‖∇gan‖ at the decoder's last layer; then one discriminator update on real vs reconstructed images.
The discriminator reads image channels only (absent channels zero): a real label map cannot say
"not annotated", so a mask-reading discriminator would punish masks for structures a row leaves out.

Several processes (torchrun, DDP): each reconstruction term is a mean over what a rank's rows hold
(present channel-pixels, labelled pixels, annotated pairs), which differs between ranks; the terms are
rescaled by :func:`global_mean_factors` so that DDP's gradient average equals the gradient of the mean
over the global batch, and dead-code re-initialization all-reduces the usage counts and gathers every
rank's features in global batch order, so W processes train as one process with the same global batch
(tested on 2 gloo processes). The adaptive GAN weight stays per rank, as in VAR and taming.

Data resolution: a recipe whose ``model.image_size`` divides the stored slice size trains on slices
downsampled on the fly (:class:`~medaug.data.structures.StructureSliceDataset`); tests prepare at 64².
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from medaug.config.base import from_dict, recipe_data, to_dict, warn_recipe_changes
from medaug.config.overrides import apply_overrides
from medaug.data.dataset import PreparedSliceDataset
from medaug.data.samplers import SamplerConfig, build_sampler
from medaug.data.structures import (
    INDEX_FILE,
    StructureSliceDataset,
    read_domain_names,
    read_structure_table,
)
from medaug.errors import ConfigError
from medaug.models.losses import (
    DiscriminatorConfig,
    PatchDiscriminator,
    adaptive_gan_weight,
    hinge_d_loss,
    hinge_g_loss,
    marginal_cross_entropy,
    masked_l1,
    masked_ssim_loss,
    soft_dice_loss,
    structure_l1,
    structure_regions,
)
from medaug.models.vqvae import IGNORE_LABEL, VQVAE, VQVAEConfig, label_to_onehot
from medaug.train.checkpoint import sha256_file
from medaug.train.engine import TrainConfig, unwrap
from medaug.train.checkpoint import write_json
from medaug.train.tokenizer_eval import EvalConfig, evaluate_tokenizer, structure_quality

log = logging.getLogger(__name__)

MODELS_RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes" / "models"
FILLED_FROM_DATA = {"model": ("image_channels", "num_structures"), "losses.discriminator": ("in_channels",)}
"""Recipe keys that the prepared dataset decides; a recipe that sets them is refused."""


@dataclass(frozen=True)
class LossConfig:
    """Weights of the tokenizer's loss terms (0 turns a term off).

    l1 / ssim: image terms over present channels. structure_l1: the image L1 averaged per structure region
    (:func:`~medaug.models.losses.structure_l1`: a small lesion weighs as much as the body, so the decoder
    draws it in the image and not only in the mask). mask_ce / mask_dice: marginal cross-entropy and soft
    Dice over annotated structures. quant: the quantizer loss (commitment inside it weighs
    ``model.quantizer.beta``). gan: the discriminator weight (VAR's single-scale trainer: 0.4), times
    the adaptive weight (clamped at ``gan_max_adaptive_weight``) from ``gan_start_step`` on.
    discriminator: the PatchGAN (its ``in_channels`` comes from the data).
    """

    l1: float = 1.0
    ssim: float = 0.0
    structure_l1: float = 0.0
    mask_ce: float = 1.0
    mask_dice: float = 1.0
    quant: float = 1.0
    gan: float = 0.0
    gan_start_step: int = 0
    gan_max_adaptive_weight: float = 1.0e4
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)


@dataclass(frozen=True)
class CodebookConfig:
    """Dead-code re-initialization: every ``reinit_every`` steps (0 = never; also after the first step),
    codes hit fewer than ``reinit_threshold`` times since the last re-init are replaced by random
    pre-quantization residuals of the current batch (all ranks' batches under DDP); not after ``reinit_until``."""

    reinit_every: int = 200
    reinit_threshold: int = 1
    reinit_until: int | None = None


@dataclass(frozen=True)
class TokenizerRecipe:
    """Everything ``medaug train tokenizer`` needs besides the data (module docstring)."""

    model: VQVAEConfig = field(default_factory=VQVAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------- recipe loading


def resolve_model_recipe(path: str | Path) -> Path:
    """A recipe path as given, else ``recipes/models/<name>.yaml`` (``tiny`` → recipes/models/tiny.yaml)."""
    candidates = [Path(path), MODELS_RECIPES_DIR / Path(path), MODELS_RECIPES_DIR / f"{path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(path, f"model recipe not found (also looked in {MODELS_RECIPES_DIR})")


def load_tokenizer_recipe(recipe: str | Path | TokenizerRecipe | dict, overrides: Sequence[str] = ()) -> TokenizerRecipe:
    """A typed recipe from a YAML file (path or name), a dict or a recipe, with ``--set key=value`` overrides.

    Overrides use dotted keys (``train.max_steps=50``, ``model.quantizer.codebook_size=256``); values are
    YAML (``[1, 2, 3]``, ``true``, ``3.0e-4``; ``1e-4`` is read as a number too). Unknown keys, and
    keys the data decides (``FILLED_FROM_DATA``), raise :class:`ConfigError` naming the key.
    """
    data, where = recipe_data(recipe, TokenizerRecipe, lambda typed: _without_data_keys(to_dict(typed)),
                              resolve_model_recipe)
    data = apply_overrides(data, overrides, TokenizerRecipe)
    _refuse_data_keys(data, where)
    return from_dict(TokenizerRecipe, data, where)


def _without_data_keys(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without the keys the prepared dataset fills (a loaded recipe carries their defaults)."""
    for section, keys in FILLED_FROM_DATA.items():
        node: Any = data
        for part in section.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        for key in keys:
            if isinstance(node, dict):
                node.pop(key, None)
    return data


def _refuse_data_keys(data: dict[str, Any], where: str) -> None:
    for section, keys in FILLED_FROM_DATA.items():
        node: Any = data
        for part in section.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        for key in keys:
            if isinstance(node, dict) and key in node:
                raise ConfigError(f"{where}.{section}.{key}", "is filled from the prepared dataset; remove it from the recipe")


# ---------------------------------------------------------------- losses


LOSS_TERMS = ("l1", "ssim", "ce", "dice", "structure_l1")
"""The reconstruction terms, in the order of :func:`loss_counts`."""


def reconstruction_loss(
    image_rec_BCHW: torch.Tensor,
    logits_BKHW: torch.Tensor,
    batch: dict[str, torch.Tensor],
    weights: LossConfig,
    factors_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted image + mask loss of one batch: (scalar, detached terms of ``LOSS_TERMS`` that are on).

    ``batch``: ``image`` (B, C, H, W), ``channel_mask`` (B, C) bool, ``label`` (B, H, W) model-local,
    ``annotated`` (B, S) bool. Absent channels and unannotated structures contribute nothing. Terms with
    weight 0 (and the mask terms of an image-only model) are skipped. ``factors_T``: (4,) multipliers of
    the terms in ``LOSS_TERMS`` order (:func:`global_mean_factors` under DDP); None = 1.
    """
    image_BCHW, mask_BC = batch["image"], batch["channel_mask"]
    image_rec_BCHW = image_rec_BCHW.float()
    computed = {"l1": (weights.l1, lambda: masked_l1(image_rec_BCHW, image_BCHW, mask_BC))}
    if weights.ssim:
        computed["ssim"] = (weights.ssim, lambda: masked_ssim_loss(image_rec_BCHW, image_BCHW, mask_BC))
    if batch["annotated"].shape[1]:
        label_BHW, annotated_BS = batch["label"], batch["annotated"]
        computed["ce"] = (weights.mask_ce, lambda: marginal_cross_entropy(logits_BKHW, label_BHW, annotated_BS))
        computed["dice"] = (weights.mask_dice, lambda: soft_dice_loss(logits_BKHW, label_BHW, annotated_BS))
        if weights.structure_l1:
            computed["structure_l1"] = (weights.structure_l1, lambda: structure_l1(
                image_rec_BCHW, image_BCHW, mask_BC, label_BHW, logits_BKHW.shape[1]))
    total = image_rec_BCHW.new_zeros(())
    terms = {}
    for name, (weight, compute) in computed.items():
        term = compute()
        if factors_T is not None:
            term = term * factors_T[LOSS_TERMS.index(name)]
        total = total + weight * term
        terms[name] = term.detach()
    return total, terms


def loss_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(5,) float32: what each term of ``LOSS_TERMS`` averages over in this batch (present channel-pixels,
    present channels, labelled pixels, annotated (row, structure) pairs, structure regions)."""
    mask_BC, label_BHW = batch["channel_mask"], batch["label"]
    pixels = label_BHW.shape[-2] * label_BHW.shape[-1]
    present = mask_BC.sum()
    regions = structure_regions(mask_BC, label_BHW, batch["annotated"].shape[1] + 1)
    counts = [present * pixels, present, (label_BHW != IGNORE_LABEL).sum(), batch["annotated"].sum(), regions]
    return torch.stack([torch.as_tensor(c, dtype=torch.float32, device=label_BHW.device) for c in counts])


def global_mean_factors(counts_T: torch.Tensor) -> torch.Tensor:
    """Per-term factors that make DDP's average of per-rank means the mean over the global batch.

    A term computed on rank r as sum_r / n_r, times W·n_r / Σ_r n_r, averages over the W ranks (as DDP
    averages gradients) to Σ sum_r / Σ n_r: the one-process value, although ranks hold different mixes of
    channels and labelled pixels. All ones without a process group.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return torch.ones_like(counts_T)
    total_T = counts_T.clone()
    dist.all_reduce(total_T, op=dist.ReduceOp.SUM)
    return torch.where(total_T > 0, counts_T * dist.get_world_size() / total_T.clamp(min=1.0), 0.0)


def discriminator_input(image_BCHW: torch.Tensor, channel_mask_BC: torch.Tensor) -> torch.Tensor:
    """What the discriminator sees: the image with absent channels zeroed, (B, C, H, W) float32."""
    return image_BCHW.float() * channel_mask_BC.to(torch.float32)[:, :, None, None]


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Parameters of ``module`` do not require grad inside the block (the graph built there leaves them out)."""
    flags = [(parameter, parameter.requires_grad) for parameter in module.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield module
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


# ---------------------------------------------------------------- the task


class TokenizerTask:
    """The engine's Task (:class:`medaug.train.engine.Task`) for the paired image + mask tokenizer.

    ``data``: a prepared dataset folder; the model trains on its train split. ``recipe``: the typed recipe.
    Modules: ``vqvae`` (the main model, ``model.safetensors``) and, when ``losses.gan > 0``, ``discriminator``.
    """

    name = "tokenizer"

    def __init__(self, data: str | Path, recipe: TokenizerRecipe):
        self.data = Path(data)
        self.recipe = recipe
        self.domain_names = read_domain_names(self.data)
        self.table = read_structure_table(self.data, "train")
        base = PreparedSliceDataset(self.data, split="train")
        if len(base) == 0:
            raise ConfigError(self.data / INDEX_FILE, "has no train rows; expected a prepared dataset with a train split")
        self.channels = base.channels_out
        self._train = StructureSliceDataset(base, self.table, self.domain_names, recipe.model.image_size)
        self.model_config = replace(recipe.model, image_channels=self.channels, num_structures=self.table.num_structures)
        self.discriminator_config = replace(recipe.losses.discriminator, in_channels=self.channels)
        self.eval_results: dict[str, Any] | None = None
        self._last_batch: dict[str, torch.Tensor] | None = None
        self._last_reinit = 0
        self._lineage: dict[str, Any] | None = None

    # ------------------------------------------------------------ Task protocol
    def build_modules(self) -> dict[str, nn.Module]:
        """{"vqvae": VQVAE} plus {"discriminator": PatchDiscriminator} when the GAN weight is > 0."""
        modules: dict[str, nn.Module] = {"vqvae": VQVAE(self.model_config)}
        if self.recipe.losses.gan > 0:
            modules["discriminator"] = PatchDiscriminator(self.discriminator_config)
        return modules

    def train_dataset(self) -> StructureSliceDataset:
        return self._train

    def train_sampler(self, rank: int, world_size: int, seed: int) -> Any:
        """This rank's order of train rows: the engine's shuffle when ``sampler.by`` is natural, else
        :func:`~medaug.data.samplers.build_sampler` over the rows' domains and present structures."""
        from medaug.train.engine import ResumableSampler

        config = self.recipe.sampler
        if config.by == "natural" or config.power == 0.0:
            if config.epoch_size is not None:
                raise ConfigError("sampler.epoch_size", f"is {config.epoch_size}; with by: natural the tokenizer "
                                  "shuffles every row once per epoch (set it only with by: domain or structure)")
            return ResumableSampler(self._train, world_size, rank, seed)
        return build_sampler(config, self._train.domain_positions(), self._train.present_matrix(), world_size,
                             rank, seed)

    def training_step(self, modules: dict[str, nn.Module], batch: dict[str, torch.Tensor], step: int,
                      update: Callable[[str, torch.Tensor], None]) -> dict[str, torch.Tensor | float]:
        """One VQ-VAE update (and one discriminator update once the GAN is on); returns 0-d metric tensors.

        ``batch`` is on the model's device (the engine moves it); ``step`` is the 0-based step index.
        """
        vqvae = modules["vqvae"]
        image_rec_BCHW, logits_BKHW, quant_loss, stats = vqvae(batch["image"], batch["channel_mask"], batch["label"])
        factors_T = global_mean_factors(loss_counts(batch))
        rec_loss, terms = reconstruction_loss(image_rec_BCHW, logits_BKHW, batch, self.recipe.losses, factors_T)
        loss = rec_loss + self.recipe.losses.quant * quant_loss
        gan_on = self.gan_active(step)
        if gan_on:
            g_loss, gan_weight = self._generator_term(modules, image_rec_BCHW, batch, rec_loss)
            loss = loss + gan_weight * g_loss
            terms.update(g_loss=g_loss.detach(), gan_weight=gan_weight)
        update("vqvae", loss)
        if gan_on:
            terms["d_loss"] = self._discriminator_update(modules, image_rec_BCHW.detach(), batch, update)
        self._last_batch = {key: batch[key] for key in ("image", "channel_mask", "label")}
        terms.update(loss=loss.detach(), quant=quant_loss.detach(), codebook_usage=stats["usage"],
                     codebook_perplexity=stats["perplexity_K"].mean())
        return {**terms, "codebook_reinit": float(self._last_reinit)}

    def after_step(self, modules: dict[str, nn.Module], step: int) -> None:
        """Dead-code re-initialization when due (:class:`CodebookConfig`); identical on every rank."""
        if not self.reinit_due(step) or self._last_batch is None:
            return
        vqvae = unwrap(modules["vqvae"])
        quantizer = vqvae.quantizer
        with torch.no_grad():
            features_BCHW = self.encode_last_batch(vqvae)
        counts_V = _sum_over_ranks(quantizer.usage_counts)
        features_BCHW = _gather_rows(features_BCHW)
        generator = torch.Generator(device=features_BCHW.device).manual_seed(self.recipe.train.seed * 1_000_003 + step)
        self._last_reinit = quantizer.reinit_dead_codes(features_BCHW, counts_V, self.recipe.codebook.reinit_threshold,
                                                        generator)
        log.debug("step %d: re-initialized %d dead codes of %d", step, self._last_reinit, quantizer.config.codebook_size)

    def metadata(self) -> dict[str, Any]:
        """Checkpoint metadata beyond the engine's: model config, domains, structures, data lineage."""
        from medaug import vocab

        records = self.table.to_records()
        if self.eval_results is not None:
            records = structure_quality(records, self.eval_results)
        return {
            "model_config": to_dict(self.model_config),
            "recipe": to_dict(self.recipe),
            "image_channels": self.channels,
            "image_size": self.model_config.image_size,
            "domains": json.loads((self.data / "domains.json").read_text()),
            "structure_table": records,
            "vocabulary": [vocab.structure(name).as_dict() for name in self.table.names],
            "data": self.data_lineage(),
            "evaluation": self.eval_results,
        }

    def evaluate(self, modules: dict[str, nn.Module], run_dir: Path) -> dict[str, Any]:
        """Reconstruction metrics on the val split (else test, else train, with a warning) and
        ``run_dir/reconstructions.png``; the result is kept for :meth:`metadata`."""
        split = choose_eval_split(self.data)
        dataset = StructureSliceDataset(PreparedSliceDataset(self.data, split=split), self.table, self.domain_names,
                                        self.model_config.image_size)
        results = evaluate_tokenizer(unwrap(modules["vqvae"]), dataset, self.recipe.eval,
                                     Path(run_dir) / "reconstructions.png")
        self.eval_results = {"split": split, **results}
        return self.eval_results

    # ------------------------------------------------------------ helpers
    def gan_active(self, step: int) -> bool:
        return self.recipe.losses.gan > 0 and step >= self.recipe.losses.gan_start_step

    def reinit_due(self, step: int) -> bool:
        config = self.recipe.codebook
        if config.reinit_every <= 0 or (config.reinit_until is not None and step > config.reinit_until):
            return False
        return step == 0 or (step + 1) % config.reinit_every == 0

    def encode_last_batch(self, vqvae: VQVAE) -> torch.Tensor:
        """Encoder outputs (B, C, h, h) of the last training batch under the current weights."""
        batch = self._last_batch
        onehot = label_to_onehot(batch["label"], vqvae.config.num_structures) if vqvae.config.num_structures else None
        return vqvae.encode(batch["image"], batch["channel_mask"], onehot).float()

    def data_lineage(self) -> dict[str, Any]:
        """Prepared-dataset hash (sha256 of index.parquet), training patient groups, slice count (computed once)."""
        if self._lineage is None:
            self._lineage = {"prepared": str(self.data.resolve()), "index_sha256": sha256_file(self.data / INDEX_FILE),
                             "train_groups": sorted(set(_train_groups(self.data))), "train_slices": len(self._train)}
        return self._lineage

    def _generator_term(self, modules: dict[str, nn.Module], image_rec_BCHW: torch.Tensor,
                        batch: dict[str, torch.Tensor], rec_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hinge G loss, gan weight × adaptive weight); the discriminator's parameters stay out of the graph."""
        discriminator = unwrap(modules["discriminator"])
        with frozen(discriminator):
            logits_fake = discriminator(discriminator_input(image_rec_BCHW, batch["channel_mask"]))
        g_loss = hinge_g_loss(logits_fake)
        last_layer = unwrap(modules["vqvae"]).last_decoder_layer
        adaptive = adaptive_gan_weight(rec_loss, g_loss, last_layer, self.recipe.losses.gan_max_adaptive_weight)
        return g_loss, self.recipe.losses.gan * adaptive

    def _discriminator_update(self, modules: dict[str, nn.Module], image_rec_BCHW: torch.Tensor,
                              batch: dict[str, torch.Tensor], update: Callable[[str, torch.Tensor], None]) -> torch.Tensor:
        """Hinge loss on real vs reconstructed images in one forward (one DDP reduction)."""
        mask_BC = batch["channel_mask"]
        both_BCHW = torch.cat([discriminator_input(batch["image"], mask_BC), discriminator_input(image_rec_BCHW, mask_BC)])
        logits = modules["discriminator"](both_BCHW)
        real, fake = logits.chunk(2)
        d_loss = hinge_d_loss(real.float(), fake.float())
        update("discriminator", d_loss)
        return d_loss.detach()


def choose_eval_split(prepared: Path) -> str:
    """``val`` if the prepared dataset has val rows, else ``test``, else ``train`` (logged as a warning)."""
    from medaug.data.index import read_index

    splits = read_index(Path(prepared) / INDEX_FILE, columns=["split"]).column("split").to_pylist()
    for split in ("val", "test", "train"):
        if split in splits:
            if split != "val":
                log.warning("%s has no val rows; evaluating the tokenizer on the %s split", prepared, split)
            return split
    raise ConfigError(Path(prepared) / INDEX_FILE, "has no rows to evaluate on")


def _train_groups(prepared: Path) -> list[str]:
    from medaug.data.index import read_index

    index = read_index(Path(prepared) / INDEX_FILE, columns=["split", "patient_group"])
    return [group for split, group in zip(index.column("split").to_pylist(), index.column("patient_group").to_pylist())
            if split == "train"]


def _sum_over_ranks(counts_V: torch.Tensor) -> torch.Tensor:
    """Code hit counts summed over ranks (a copy; the input itself when there is one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return counts_V.clone()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = counts_V.to(device, copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(counts_V.device)


def _gather_rows(features_BCHW: torch.Tensor) -> torch.Tensor:
    """Every rank's features in the order of the global batch, the same tensor on every rank.

    The engine gives rank r of W the global batch rows r, r + W, r + 2W, ...; interleaving the gathered
    per-rank batches restores the one-process order, so a W-process re-initialization picks the same
    rows as a one-process run with the same global batch.
    """
    from medaug.train.distributed import all_gather_objects, get_world_size

    if get_world_size() == 1:
        return features_BCHW
    gathered = all_gather_objects(features_BCHW.cpu())
    if len({tuple(part.shape) for part in gathered}) > 1:
        return torch.cat(gathered).to(features_BCHW.device)
    interleaved = torch.stack(gathered, dim=1)  # (B_r, W, C, h, w)
    return interleaved.flatten(0, 1).to(features_BCHW.device)  # (W·B_r, C, h, w), global row order


# ---------------------------------------------------------------- the run function


RECIPE_FILE = "tokenizer_recipe.json"
METRICS_FILE = "metrics.json"


def train_tokenizer(
    data: str | Path,
    recipe: str | Path | TokenizerRecipe,
    out: str | Path,
    max_steps: int | None = None,
    resume: bool = False,
    overrides: Sequence[str] = (),
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train a tokenizer on ``data``'s train split into run folder ``out``, then evaluate it (rank 0).

    ``recipe``: a YAML path, a name under ``recipes/models`` or a recipe; ``overrides``: ``key=value``
    strings (:func:`load_tokenizer_recipe`); ``max_steps`` overrides ``train.max_steps``. ``resume``
    continues from ``out``'s latest checkpoint. ``progress(step, max_steps, metrics)`` is the engine's
    callback. Writes ``out/tokenizer_recipe.json`` (the resolved recipe), ``out/metrics.json`` and
    ``out/reconstructions.png``, and adds the evaluation and the structure table with reconstruction
    quality to the final checkpoint's meta.json. Returns {run_dir, step, stopped_by, checkpoint,
    train_metrics, evaluation}.
    """
    steps = [f"train.max_steps={max_steps}"] if max_steps is not None else []
    recipe = drop_unused_optimizers(load_tokenizer_recipe(recipe, [*overrides, *steps]))
    task = TokenizerTask(data, recipe)
    return train_then_evaluate(task, recipe.train, to_dict(recipe), Path(out) / RECIPE_FILE, Path(out),
                               evaluate_checkpoint, resume, progress)


def train_then_evaluate(task: Any, config: Any, recipe_record: dict[str, Any], recipe_path: Path, out: Path,
                        evaluate: Callable[[Any, Path, Path], dict[str, Any]], resume: bool,
                        progress: Callable[[int, int, dict[str, float]], None] | None) -> dict[str, Any]:
    """The run of a task that is evaluated once trained (tokenizer, feature encoder): write the recipe (not
    over a finished run's, which the engine refuses), train, then on rank 0 ``evaluate(task, checkpoint, out)``
    into ``out/metrics.json``. Returns {run_dir, step, stopped_by, checkpoint, train_metrics, evaluation}."""
    from medaug.train.checkpoint import latest_checkpoint
    from medaug.train.distributed import is_rank0, on_rank0
    from medaug.train.engine import RESUMABLE_TRAIN_KEYS, train

    fresh = latest_checkpoint(out) is None
    if resume and not fresh:  # a changed default or override alters what the rest of the run learns: say so
        on_rank0(warn_recipe_changes, recipe_path, recipe_record, RESUMABLE_TRAIN_KEYS)
    if resume or fresh:  # else the engine refuses the folder; keep its recipe
        on_rank0(write_json, recipe_path, recipe_record)
    result = train(task, config, out, resume=resume, progress=progress)
    summary: dict[str, Any] = {"run_dir": str(out), "step": result.step, "stopped_by": result.stopped_by,
                               "checkpoint": str(result.checkpoint_path) if result.checkpoint_path else None,
                               "train_metrics": result.metrics, "evaluation": None}
    if is_rank0() and result.checkpoint_path is not None:
        summary["evaluation"] = evaluate(task, result.checkpoint_path, out)
        write_json(out / METRICS_FILE, {"step": result.step, "train": result.metrics, "evaluation": summary["evaluation"]})
    return summary


def drop_unused_optimizers(recipe: TokenizerRecipe) -> TokenizerRecipe:
    """Without a GAN there is no discriminator: its ``train.optim`` entry is dropped with a warning."""
    optim = dict(recipe.train.optim)
    if recipe.losses.gan > 0 or "discriminator" not in optim:
        return recipe
    log.warning("train.optim.discriminator is ignored: losses.gan is 0, so no discriminator is trained")
    del optim["discriminator"]
    return replace(recipe, train=replace(recipe.train, optim=optim))


def evaluate_checkpoint(task: TokenizerTask, checkpoint_path: Path, run_dir: Path) -> dict[str, Any]:
    """Load the checkpoint's main weights, run :meth:`TokenizerTask.evaluate`, and record the results in
    the checkpoint's meta.json (``evaluation``, ``structure_table`` with reconstruction quality)."""
    from medaug.train.checkpoint import load_checkpoint, load_module_weights, update_checkpoint_meta
    from medaug.train.distributed import pick_device

    checkpoint = load_checkpoint(checkpoint_path, expect_kind=task.name, trainer=False)
    vqvae = VQVAE(task.model_config).to(pick_device(0, task.recipe.train.device))
    load_module_weights(vqvae, checkpoint, "model")
    results = task.evaluate({"vqvae": vqvae}, run_dir)
    metadata = task.metadata()
    update_checkpoint_meta(checkpoint.path, {"evaluation": metadata["evaluation"],
                                             "structure_table": metadata["structure_table"]})
    return results


def load_tokenizer(checkpoint_path: str | Path, device: str | torch.device = "cpu") -> tuple[VQVAE, dict[str, Any]]:
    """A trained tokenizer from a checkpoint (or run) folder: (VQVAE in eval mode, meta.json).

    The model config comes from the checkpoint (STYLE rule 2), never from a recipe.
    """
    from medaug.train.checkpoint import load_checkpoint, load_module_weights

    checkpoint = load_checkpoint(Path(checkpoint_path), expect_kind=TokenizerTask.name, trainer=False)
    config = from_dict(VQVAEConfig, checkpoint.meta["model_config"], f"{checkpoint.path}/meta.json:model_config")
    vqvae = VQVAE(config)
    load_module_weights(vqvae, checkpoint, "model")
    return vqvae.to(device).eval(), checkpoint.meta


__all__ = [
    "CodebookConfig",
    "LossConfig",
    "TokenizerRecipe",
    "TokenizerTask",
    "apply_overrides",
    "choose_eval_split",
    "discriminator_input",
    "drop_unused_optimizers",
    "evaluate_checkpoint",
    "global_mean_factors",
    "loss_counts",
    "load_tokenizer",
    "load_tokenizer_recipe",
    "reconstruction_loss",
    "train_tokenizer",
]
