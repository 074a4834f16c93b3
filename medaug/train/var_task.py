"""The MedVAR transformer training task: its recipe, :class:`VarTask` on the engine, :func:`train_var`,
:func:`train_all`, the self-contained generator run and :func:`load_generator` (issue 5, DESIGN.md §3-4).

One recipe (``recipes/models/medvar-*.yaml``) holds every knob, loaded with :func:`load_var_recipe`:

* ``model``: :class:`VarModelConfig`, a preset of :func:`~medaug.models.var.var_preset` (tiny, d16, d20,
  d24, d30) with optional architecture overrides; the tokenizer's scales, codebook size and code
  dimension and the data's domain and structure counts are filled in (they are refused in the recipe);
* ``train``: the engine's :class:`~medaug.train.engine.TrainConfig`, optimizer under ``optim.var``;
  ``base_lr`` (optional) sets ``optim.var.lr = base_lr · train.batch_size / 256`` (VAR's rule);
* ``loss``: :class:`VarLossConfig` (label smoothing, per-scale token weights);
* ``conditioning``: :class:`ConditioningConfig` (classifier-free-guidance drop rate, default 0.1; the
  pixels a structure needs to count as present in a row's condition, default 8);
* ``sampler``: :class:`~medaug.data.samplers.SamplerConfig` (natural, by domain, by structure);
* ``tokens``: :class:`~medaug.train.token_cache.TokenCacheConfig` (pre-tokenization, left-right flip);
* ``samples``: :class:`SampleGridConfig` (the grid of samples written at the end);
* ``tokenizer``: the tokenizer recipe that ``medaug train all`` trains first (``train var`` takes a
  trained tokenizer instead and ignores it).

Training step: the batch holds cached tokens (:mod:`medaug.train.token_cache`, so the VQ encoder never
runs per step); the tokenizer's quantizer turns them into the teacher-forcing inputs
(``indices_to_teacher_inputs``, float32, no gradient); condition-dropout flags are drawn for the global
batch from a generator seeded by (seed, step) and each rank keeps its rows (so a resume and a W-process
run draw what one process draws); the transformer's logits give a cross-entropy over all L tokens,
weighted per scale, with label smoothing; per-scale loss and token accuracy are logged.

The run folder is a self-contained generator (DESIGN.md §3 "Checkpoints"): ``RUN/tokenizer/`` is a copy
of the tokenizer checkpoint (checked by content hash), and every VAR checkpoint's meta.json holds the
model config, the tokenizer's sha256 and relative path, the domains (channels, geometry, intensity), the
structure table, the condition bank (:mod:`medaug.train.condition_bank`), the data lineage and the
recipe. :func:`load_generator` needs nothing else. Training ends with ``RUN/samples.png`` (samples per
domain with mask overlays, conditions drawn from the bank) and ``RUN/samples.json`` (seeds, conditions).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medaug.config.base import from_dict, read_yaml, recipe_data, to_dict, warn_recipe_changes
from medaug.data.samplers import BalancedSampler, SamplerConfig, build_sampler
from medaug.data.structures import DOMAINS_FILE, INDEX_FILE, StructureTable
from medaug.errors import CheckpointError, ConfigError
from medaug.models.quant import MultiScaleQuantizer
from medaug.models.var import PRESET_NAMES, VAR, AttnImpl, VARConfig, var_preset
from medaug.models.vqvae import VQVAE
from medaug.train import distributed as dist_utils
from medaug.train.condition_bank import ConditionBank, build_condition_bank
from medaug.train.engine import RESUMABLE_TRAIN_KEYS, TrainConfig
from medaug.train.token_cache import CACHE_DIR, TokenCache, TokenCacheConfig, TokenDataset, prepare_token_cache, tokenizer_sha256
from medaug.config.overrides import apply_overrides
from medaug.train.checkpoint import write_json
from medaug.train.tokenizer import MODELS_RECIPES_DIR, TokenizerRecipe, load_tokenizer, load_tokenizer_recipe

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"
RECIPE_FILE = "var_recipe.json"
METRICS_FILE = "metrics.json"
SAMPLES_PNG = "samples.png"
SAMPLES_JSON = "samples.json"
TOKENIZER_RUN_DIR = "tokenizer_run"
LR_REFERENCE_BATCH = 256


# ---------------------------------------------------------------- recipe


@dataclass(frozen=True)
class VarModelConfig:
    """The transformer: ``preset`` (tiny, d16, d20, d24, d30) and architecture overrides (null = the
    preset's value). Set ``width`` and ``heads`` with ``depth``: the preset's stay otherwise."""

    preset: str = "d16"
    depth: int | None = None
    width: int | None = None
    heads: int | None = None
    mlp_ratio: float | None = None
    drop_path_rate: float | None = None
    attn_impl: AttnImpl | None = None
    norm_eps: float | None = None
    shared_adaln: bool | None = None
    init_std: float | None = None
    init_head: float | None = None
    init_adaln: float | None = None
    init_adaln_gamma: float | None = None
    null_keeps_domain: bool | None = None

    def __post_init__(self) -> None:
        if self.preset not in PRESET_NAMES:
            raise ConfigError("model.preset", f"is {self.preset!r}; allowed values: {', '.join(PRESET_NAMES)}")

    def resolve(self, **filled: Any) -> VARConfig:
        """The full :class:`VARConfig`: preset, then the overrides, then ``filled`` (tokenizer and data fields)."""
        overrides = {item.name: getattr(self, item.name) for item in dataclasses.fields(self)
                     if item.name != "preset" and getattr(self, item.name) is not None}
        return var_preset(self.preset, **overrides, **filled)


@dataclass(frozen=True)
class VarLossConfig:
    """``label_smoothing`` of the cross-entropy; ``scale_weights``: one weight per scale multiplying each of
    its tokens' weight (null: every token weighs the same, as VAR)."""

    label_smoothing: float = 0.0
    scale_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError("loss.label_smoothing", f"is {self.label_smoothing}; expected a value in [0, 1)")
        weights = self.scale_weights
        if weights is not None and (any(w < 0 for w in weights) or sum(weights) <= 0):
            raise ConfigError("loss.scale_weights", f"is {list(weights)}; expected non-negative weights, not all 0")


@dataclass(frozen=True)
class ConditioningConfig:
    """``drop_rate``: fraction of training rows whose condition is replaced by the null condition (CFG).

    ``min_pixels``: a structure is *present* in a training row's condition when it covers at least this
    many pixels of the label map at the model's resolution. DESIGN.md §3 says "contains the structure";
    counting one pixel made a structure's edge slices (a 3-pixel sliver of a tumour) "present" too, so the
    model learned that "present" may mean almost nothing and ``--organ`` drew such conditions: on the demo's
    phantoms 1 in 12 tumour train rows had fewer than 8 pixels, and a generator that followed its
    conditions faithfully showed the tumour on fewer pixels than the quality bar's
    (:mod:`medaug.eval.acceptance`) in about as many samples. Slivers stay in the masks the model learns;
    they only stop counting as a request for the structure.
    """

    drop_rate: float = 0.1
    min_pixels: int = 8

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_rate <= 1.0:
            raise ConfigError("conditioning.drop_rate", f"is {self.drop_rate}; expected a value in [0, 1]")
        if self.min_pixels < 1:
            raise ConfigError("conditioning.min_pixels", f"is {self.min_pixels}; expected an integer >= 1")


@dataclass(frozen=True)
class SampleGridConfig:
    """The grid written after training: ``per_domain`` samples per domain (0 = no grid), sampler settings
    (:func:`medaug.models.sampling.sample_tokens`), ``seed`` (sample i has seed ``seed + i``; conditions
    are drawn from the bank with a generator seeded by ``seed``), ``batch_size`` samples per forward."""

    per_domain: int = 4
    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 16


@dataclass(frozen=True)
class VarRecipe:
    """Everything ``medaug train var`` needs besides the data and the tokenizer (module docstring)."""

    model: VarModelConfig = field(default_factory=VarModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    base_lr: float | None = None
    loss: VarLossConfig = field(default_factory=VarLossConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    tokens: TokenCacheConfig = field(default_factory=TokenCacheConfig)
    samples: SampleGridConfig = field(default_factory=SampleGridConfig)
    tokenizer: str | dict[str, Any] | None = None


def resolve_recipe_path(path: str | Path, relative_to: Path | None = None) -> Path:
    """A recipe path as given (or beside ``relative_to``), else ``recipes/models/<name>[.yaml]``."""
    candidates = [Path(path)]
    if relative_to is not None:
        candidates.append(relative_to / Path(path))
    candidates += [MODELS_RECIPES_DIR / Path(path), MODELS_RECIPES_DIR / f"{path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(path, f"model recipe not found (also looked in {MODELS_RECIPES_DIR})")


def load_var_recipe(recipe: str | Path | VarRecipe | dict, overrides: Sequence[str] = ()) -> VarRecipe:
    """A typed recipe from a YAML file (path or name), a dict or a recipe, ``--set key=value`` overrides
    applied, and ``base_lr`` resolved into ``train.optim.var.lr``.

    Unknown keys raise :class:`ConfigError` naming the key; so does setting both ``base_lr`` and
    ``train.optim.var.lr``.
    """
    data, where = recipe_data(recipe, VarRecipe, to_dict, resolve_recipe_path)
    data = apply_overrides(data, overrides, VarRecipe)
    return resolve_present_threshold(resolve_lr(from_dict(VarRecipe, data, where), data, where), data, where)


def resolve_present_threshold(recipe: VarRecipe, data: dict[str, Any], where: str) -> VarRecipe:
    """The recipe with ``tokens.present_min_pixels`` = ``conditioning.min_pixels`` (the token cache computes
    the conditions, so the recorded recipe says how); a different explicit value is refused."""
    explicit = (data.get("tokens") or {}).get("present_min_pixels")
    threshold = recipe.conditioning.min_pixels
    if explicit is not None and explicit != threshold:
        raise ConfigError(f"{where}.tokens.present_min_pixels", f"is {explicit} but conditioning.min_pixels is "
                                                                f"{threshold}; set conditioning.min_pixels alone")
    return dataclasses.replace(recipe, tokens=dataclasses.replace(recipe.tokens, present_min_pixels=threshold))


def resolve_lr(recipe: VarRecipe, data: dict[str, Any], where: str) -> VarRecipe:
    """With ``base_lr``, a recipe whose ``train.optim.var.lr`` is ``base_lr · batch_size / 256`` and
    ``base_lr`` null (the resolved recipe reloads as it is); without, the recipe unchanged."""
    if recipe.base_lr is None:
        return recipe
    explicit = ((data.get("train") or {}).get("optim") or {}).get("var") or {}
    if "lr" in explicit:
        raise ConfigError(f"{where}.base_lr", "and train.optim.var.lr are both set; expected one of them (base_lr "
                                              f"scales with the global batch: lr = base_lr · batch_size / {LR_REFERENCE_BATCH})")
    if recipe.base_lr <= 0:
        raise ConfigError(f"{where}.base_lr", f"is {recipe.base_lr}; expected a positive number or null")
    from medaug.train.engine import OptimConfig

    optim = dict(recipe.train.optim)
    lr = recipe.base_lr * recipe.train.batch_size / LR_REFERENCE_BATCH
    optim["var"] = replace(optim.get("var", OptimConfig()), lr=lr)
    log.info("lr = base_lr %g x batch %d / %d = %g", recipe.base_lr, recipe.train.batch_size, LR_REFERENCE_BATCH, lr)
    return replace(recipe, base_lr=None, train=replace(recipe.train, optim=optim))


# ---------------------------------------------------------------- loss


def token_weights(config: VARConfig, scale_weights: Sequence[float] | None) -> torch.Tensor:
    """(L,) float32 weights of the token positions, summing to 1: ``w_k`` for each token of scale k."""
    if scale_weights is None:
        scale_weights = [1.0] * config.num_scales
    if len(scale_weights) != config.num_scales:
        raise ConfigError("loss.scale_weights", f"has {len(scale_weights)} weights; expected one per scale "
                                                f"({config.num_scales}: sides {list(config.patch_sides)})")
    weight_L = torch.cat([torch.full((count,), float(w)) for w, count in zip(scale_weights, config.tokens_per_scale)])
    return weight_L / weight_L.sum()


def token_loss(logits_BLV: torch.Tensor, tokens_BL: torch.Tensor, weight_L: torch.Tensor, label_smoothing: float,
               config: VARConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted cross-entropy over all tokens (mean over rows) and detached metrics.

    Metrics: ``loss``, ``acc`` (token accuracy of the argmax over all L tokens), ``scale_loss/k<k>`` and
    ``scale_acc/k<k>`` per scale k (unweighted means over that scale's tokens).
    """
    batch, length, vocab = logits_BLV.shape
    ce_BL = F.cross_entropy(logits_BLV.reshape(-1, vocab).float(), tokens_BL.reshape(-1), reduction="none",
                            label_smoothing=label_smoothing).view(batch, length)
    loss = (ce_BL * weight_L.to(ce_BL.device)).sum(dim=1).mean()
    with torch.no_grad():
        correct_BL = (logits_BLV.argmax(dim=-1) == tokens_BL).float()
        metrics = {"loss": loss.detach(), "acc": correct_BL.mean()}
        for k, (start, count) in enumerate(zip(config.scale_starts, config.tokens_per_scale)):
            metrics[f"scale_loss/k{k}"] = ce_BL[:, start:start + count].mean()
            metrics[f"scale_acc/k{k}"] = correct_BL[:, start:start + count].mean()
    return loss, metrics


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed for the condition-dropout draws of ``step``."""
    state = np.random.SeedSequence([int(seed), int(step), 0xD209]).generate_state(2, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def drop_flags(rate: float, seed: int, step: int, batch: int, rank: int, world_size: int) -> torch.Tensor:
    """(batch,) bool condition-dropout flags of this rank's rows at ``step`` (CPU).

    The flags of the global batch (``batch · world_size`` rows) come from one generator seeded by (seed,
    step); rank r holds global rows r, r + W, ... (the engine's and the sampler's layout).
    """
    generator = torch.Generator().manual_seed(step_seed(seed, step))
    flags_G = torch.rand(batch * world_size, generator=generator) < rate
    return flags_G[rank::world_size]


# ---------------------------------------------------------------- the task


@dataclass(frozen=True)
class GeneratorContext:
    """What a generator checkpoint records besides the model: ``domains`` (domains.json), ``domain_names``
    (sorted: position = domain index), the tokenizer's structure ``table``, ``tokenizer`` (sha256, path
    relative to the run folder, scales...) and ``data`` (prepared dataset lineage)."""

    domains: dict[str, Any]
    domain_names: tuple[str, ...]
    table: StructureTable
    tokenizer: dict[str, Any]
    data: dict[str, Any]


class VarTask:
    """The engine's Task (:class:`medaug.train.engine.Task`) for the next-scale transformer.

    ``cache``: the pre-tokenized train split; ``quantizer``: the tokenizer's quantizer (teacher inputs);
    ``recipe``: the resolved recipe; ``context``: domains, structures, tokenizer and data records.
    Module: ``var`` (the main model, ``model.safetensors``).
    """

    name = "var"

    def __init__(self, cache: TokenCache, quantizer: MultiScaleQuantizer, recipe: VarRecipe, context: GeneratorContext):
        self.cache, self.recipe, self.context = cache, recipe, context
        self.quantizer = quantizer.eval().requires_grad_(False)
        qconfig = quantizer.config
        self.var_config = recipe.model.resolve(patch_sides=tuple(qconfig.patch_sides), codebook_size=qconfig.codebook_size,
                                               latent_dim=qconfig.latent_dim, num_domains=len(context.domain_names),
                                               num_structures=context.table.num_structures)
        self.weight_L = token_weights(self.var_config, recipe.loss.scale_weights)
        self.bank = build_condition_bank(cache.domain_N, cache.present_NS, cache.annotated_NS, context.domain_names,
                                         context.table.names)
        self._dataset = TokenDataset(cache)
        _check_cache(cache, self.var_config, context)

    # ------------------------------------------------------------ Task protocol
    def build_modules(self) -> dict[str, nn.Module]:
        return {"var": VAR(self.var_config)}

    def train_dataset(self) -> TokenDataset:
        return self._dataset

    def train_sampler(self, rank: int, world_size: int, seed: int) -> BalancedSampler:
        """This rank's share of the class-balanced stream (``recipe.sampler``) over the cached rows."""
        return build_sampler(self.recipe.sampler, self.cache.domain_N, self.cache.present_NS, world_size, rank, seed)

    def training_step(self, modules: dict[str, nn.Module], batch: dict[str, torch.Tensor], step: int,
                      update: Callable[[str, torch.Tensor], None]) -> dict[str, torch.Tensor]:
        """One transformer update on a batch of cached tokens (module docstring); returns 0-d metric tensors."""
        tokens_BL = batch["tokens"]
        x_teacher_BLC = self.teacher_inputs(tokens_BL)
        drop_B = self.step_drop_flags(step, tokens_BL.shape[0]).to(tokens_BL.device)
        logits_BLV = modules["var"](x_teacher_BLC, batch["domain"], batch["present"], batch["annotated"], drop_B)
        loss, metrics = token_loss(logits_BLV, tokens_BL, self.weight_L, self.recipe.loss.label_smoothing, self.var_config)
        update("var", loss)
        return {**metrics, "cond_drop": drop_B.float().mean()}

    def metadata(self) -> dict[str, Any]:
        """Checkpoint metadata: model config, tokenizer, domains, structures, condition bank, data lineage."""
        from medaug import vocab

        context = self.context
        return {
            "model_config": to_dict(self.var_config),
            "recipe": to_dict(self.recipe),
            "tokenizer": context.tokenizer,
            "image_size": context.tokenizer["image_size"],
            "image_channels": context.tokenizer["image_channels"],
            "domains": context.domains,
            "domain_names": list(context.domain_names),
            "structure_table": context.table.to_records(),
            "vocabulary": [vocab.structure(name).as_dict() for name in context.table.names],
            "condition_bank": self.bank.to_json(),
            "data": context.data,
            "token_cache": {key: self.cache.info[key] for key in ("key", "rows", "rows_flipped", "flip", "index_sha256")},
        }

    # ------------------------------------------------------------ helpers
    def teacher_inputs(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing inputs (B, L - p_0², latent_dim) float32 of cached tokens, without gradient."""
        if self.quantizer.embedding.weight.device != tokens_BL.device:
            self.quantizer.to(tokens_BL.device)
        with torch.no_grad(), torch.autocast(device_type=tokens_BL.device.type, enabled=False):
            return self.quantizer.indices_to_teacher_inputs(self.quantizer.tokens_to_indices(tokens_BL))

    def step_drop_flags(self, step: int, batch: int) -> torch.Tensor:
        """(batch,) bool condition-dropout flags of this rank's rows (:func:`drop_flags`)."""
        return drop_flags(self.recipe.conditioning.drop_rate, self.recipe.train.seed, step, batch,
                          dist_utils.get_rank(), dist_utils.get_world_size())


def _check_cache(cache: TokenCache, config: VARConfig, context: GeneratorContext) -> None:
    """The cache was made by this tokenizer's scales, structures and domain order."""
    if cache.total_tokens != config.total_tokens or tuple(cache.info["patch_sides"]) != config.patch_sides:
        raise ConfigError(cache.path, f"holds {cache.total_tokens} tokens per row (scales {cache.info['patch_sides']}); "
                                      f"expected {config.total_tokens} (scales {list(config.patch_sides)})")
    if tuple(cache.structures) != context.table.names or tuple(cache.info["domains"]) != context.domain_names:
        raise ConfigError(cache.path, "structures or domains differ from the tokenizer's; expected a cache of this run")


# ---------------------------------------------------------------- the generator run


def copy_tokenizer(source: str | Path, run_dir: str | Path) -> Path:
    """``run_dir/tokenizer``: a copy of tokenizer checkpoint ``source`` (a checkpoint or run folder).

    Every file but ``trainer.pt`` is copied (verified by sha256 first). An existing copy is kept when its
    content hash (:func:`~medaug.train.token_cache.tokenizer_sha256`) is ``source``'s; another tokenizer
    there raises ConfigError (a generator run has one tokenizer).
    """
    from medaug.train.checkpoint import TRAINER_FILE, load_checkpoint

    folder = load_checkpoint(Path(source), expect_kind="tokenizer", trainer=False).path
    target = Path(run_dir) / TOKENIZER_DIR
    sha = tokenizer_sha256(folder)
    if (target / "meta.json").is_file():
        existing = tokenizer_sha256(target)
        if existing != sha:
            raise ConfigError(target, f"holds tokenizer {existing[:12]}..., not {folder} ({sha[:12]}...); expected the "
                                      "run's own tokenizer (use a new run folder for another tokenizer)")
        return target
    temporary = target.with_name(f".part-{TOKENIZER_DIR}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    for item in folder.iterdir():
        if item.is_file() and item.name != TRAINER_FILE:
            shutil.copy2(item, temporary / item.name)
    temporary.rename(target)
    log.info("tokenizer %s copied to %s", folder, target)
    return target


def data_lineage(data: Path, train_slices: int) -> dict[str, Any]:
    """Prepared dataset path, sha256 of its index.parquet, training patient groups, train slice count."""
    from medaug.data.index import read_index
    from medaug.train.checkpoint import sha256_file

    index = read_index(data / INDEX_FILE, columns=["split", "patient_group"])
    groups = {group for split, group in zip(index.column("split").to_pylist(), index.column("patient_group").to_pylist())
              if split == "train"}
    return {"prepared": str(data.resolve()), "index_sha256": sha256_file(data / INDEX_FILE),
            "train_groups": sorted(groups), "train_slices": train_slices}


def read_domains(data: Path, tokenizer_meta: dict[str, Any]) -> dict[str, Any]:
    """The prepared dataset's domains.json; every domain must be one the tokenizer was trained with."""
    path = data / DOMAINS_FILE
    if not path.is_file():
        raise ConfigError(path, "missing; expected the domains.json that medaug prepare writes")
    domains = json.loads(path.read_text())
    unknown = sorted(set(domains) - set(tokenizer_meta.get("domains", {})))
    if unknown:
        raise ConfigError(path, f"has domains {unknown} the tokenizer was not trained on; expected a subset of "
                                f"{sorted(tokenizer_meta.get('domains', {}))}")
    return domains


def tokenizer_record(tokenizer_dir: Path, meta: dict[str, Any], source: Path) -> dict[str, Any]:
    """The ``tokenizer`` entry of a generator checkpoint (path relative to the run folder)."""
    quantizer = meta["model_config"]["quantizer"]
    return {"sha256": tokenizer_sha256(tokenizer_dir), "path": TOKENIZER_DIR, "source": str(source), "step": meta["step"],
            "image_size": meta["model_config"]["image_size"], "image_channels": meta["model_config"]["image_channels"],
            "patch_sides": quantizer["patch_sides"], "codebook_size": quantizer["codebook_size"],
            "latent_dim": quantizer["latent_dim"], "data_index_sha256": (meta.get("data") or {}).get("index_sha256")}


def build_var_task(data: str | Path, tokenizer: str | Path | None, recipe: VarRecipe, run_dir: str | Path,
                   device: torch.device) -> VarTask:
    """Copy the tokenizer into the run (rank 0), build or reuse the token cache (all ranks), build the task.

    ``tokenizer``: a tokenizer checkpoint or run folder; None = the run's own copy (a resumed run).
    """
    data, run_dir = Path(data), Path(run_dir)
    source = Path(tokenizer) if tokenizer is not None else run_dir / TOKENIZER_DIR
    dist_utils.on_rank0(copy_tokenizer, source, run_dir)
    dist_utils.barrier()
    tokenizer_dir = run_dir / TOKENIZER_DIR
    vqvae, tokenizer_meta = load_tokenizer(tokenizer_dir, device)
    table = StructureTable.from_records(tokenizer_meta["structure_table"])
    domains = read_domains(data, tokenizer_meta)
    domain_names = tuple(sorted(domains))
    record = tokenizer_record(tokenizer_dir, tokenizer_meta, source)
    if record["data_index_sha256"] not in (None, _index_sha(data)):
        log.warning("the tokenizer was trained on another prepared dataset (index %s); training the transformer on %s",
                    str(record["data_index_sha256"])[:12], data)
    cache = prepare_token_cache(data, vqvae, table, domain_names, record["sha256"], run_dir / CACHE_DIR, recipe.tokens)
    context = GeneratorContext(domains, domain_names, table, record, data_lineage(data, int(cache.info["rows_original"])))
    return VarTask(cache, vqvae.quantizer, recipe, context)


def _index_sha(data: Path) -> str:
    from medaug.train.checkpoint import sha256_file

    return sha256_file(data / INDEX_FILE)


def load_generator(run_dir: str | Path, device: str | torch.device = "cpu", weights: str = "auto"
                   ) -> tuple[VAR, VQVAE, dict[str, Any]]:
    """A trained generator from its run folder alone: (VAR in eval mode, tokenizer VQVAE in eval mode, meta.json).

    ``run_dir``: a VAR run folder (its latest checkpoint) or a checkpoint folder inside one. The tokenizer is
    the run's copy, checked against the sha256 the checkpoint records. ``weights``: "model", "ema" or
    "auto" (the EMA when the checkpoint has one). The returned meta gains ``loaded_weights``: the
    checkpoint folder, the weights' file stem and their sha256 (what a synthetic manifest records).
    """
    from medaug.train.checkpoint import load_checkpoint, load_module_weights

    checkpoint = load_checkpoint(Path(run_dir), expect_kind=VarTask.name, trainer=False)
    meta = checkpoint.meta
    tokenizer_dir = checkpoint.path.parents[1] / meta["tokenizer"]["path"]
    if not (tokenizer_dir / "meta.json").is_file():
        raise CheckpointError(tokenizer_dir, "missing; expected the run's tokenizer copy beside its checkpoints")
    if tokenizer_sha256(tokenizer_dir) != meta["tokenizer"]["sha256"]:
        raise CheckpointError(tokenizer_dir, f"content hash differs from the {meta['tokenizer']['sha256'][:12]}... "
                                             "the generator was trained with; expected the run's own tokenizer")
    vqvae, _ = load_tokenizer(tokenizer_dir, device)
    var = VAR(from_dict(VARConfig, meta["model_config"], f"{checkpoint.path}/meta.json:model_config"))
    stem = "ema" if weights == "ema" or (weights == "auto" and "ema" in checkpoint.state_dicts) else "model"
    load_module_weights(var, checkpoint, stem)
    meta = {**meta, "loaded_weights": {"checkpoint": str(checkpoint.path), "stem": stem,
                                       "sha256": meta["files"][f"{stem}.safetensors"]}}
    return var.to(device).eval(), vqvae, meta


# ---------------------------------------------------------------- the sample grid


@torch.no_grad()
def sample_conditions(var: VAR, vqvae: VQVAE, domain_B: torch.Tensor, present_BS: torch.Tensor,
                      annotated_BS: torch.Tensor, seeds: Sequence[int], config: SampleGridConfig
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample and decode B rows: (tokens (B, L) int64, image (B, C, H, W) in [-1, 1], label (B, H, W) model-local).

    The label is the argmax over background and the row's annotated structures (as the tokenizer's
    evaluation decodes). Condition tensors may be on the CPU; everything runs on the model's device.
    """
    from medaug.models.sampling import generators_from_seeds, sample_tokens
    from medaug.train.tokenizer_eval import annotated_argmax

    device = var.head.weight.device
    indices = sample_tokens(var, vqvae.quantizer, domain_B.to(device), present_BS.to(device), annotated_BS.to(device),
                            generators=generators_from_seeds(seeds, device), cfg=config.cfg, top_k=config.top_k,
                            top_p=config.top_p, temperature=config.temperature)
    image_BCHW, logits_BKHW = vqvae.decode(vqvae.quantizer.indices_to_features(indices))
    label_BHW = annotated_argmax(logits_BKHW.float().cpu(), annotated_BS.cpu())
    tokens_BL = vqvae.quantizer.indices_to_tokens(indices).cpu()
    return tokens_BL, image_BCHW.float().clamp(-1.0, 1.0).cpu(), label_BHW


def plan_samples(bank: ConditionBank, domain_names: Sequence[str], config: SampleGridConfig) -> list[dict[str, Any]]:
    """Per sample: domain index and name, seed, condition; ``per_domain`` per domain with training rows."""
    generator = torch.Generator().manual_seed(config.seed)
    plan = []
    for d, name in enumerate(domain_names):
        if not bank.domains.get(name):
            continue
        for condition in bank.draw(name, config.per_domain, generator):
            plan.append({"domain_index": d, "domain": name, "seed": config.seed + len(plan), "condition": condition})
    return plan


def write_samples(var: VAR, vqvae: VQVAE, meta: dict[str, Any], config: SampleGridConfig, run_dir: Path) -> dict[str, Any]:
    """Sample the grid of :func:`plan_samples` with a generator (:func:`load_generator`'s triple) and write
    ``run_dir/samples.png`` and ``run_dir/samples.json``; returns what samples.json holds."""
    bank = ConditionBank.from_json(meta["condition_bank"])
    plan = plan_samples(bank, meta["domain_names"], config)
    records, tiles = [], []
    for start in range(0, len(plan), config.batch_size):
        part = plan[start:start + config.batch_size]
        present_BS, annotated_BS = bank.to_multi_hot([item["condition"] for item in part])
        domain_B = torch.tensor([item["domain_index"] for item in part], dtype=torch.long)
        tokens_BL, image_BCHW, label_BHW = sample_conditions(var, vqvae, domain_B, present_BS, annotated_BS,
                                                             [item["seed"] for item in part], config)
        for b, item in enumerate(part):
            records.append(_sample_record(item, bank, tokens_BL[b]))
            tiles.append({"domain": item["domain"], "image": image_BCHW[b].numpy(), "label": label_BHW[b].numpy(),
                          "channels": len(meta["domains"][item["domain"]]["channels"])})
    summary = {"settings": to_dict(config), "samples": records, "png": None}
    if tiles:
        table = StructureTable.from_records(meta["structure_table"])
        summary["png"] = str(write_sample_grid(tiles, table, run_dir / SAMPLES_PNG))
    write_json(run_dir / SAMPLES_JSON, summary)
    return summary


def _sample_record(item: dict[str, Any], bank: ConditionBank, tokens_L: torch.Tensor) -> dict[str, Any]:
    condition = item["condition"]
    digest = hashlib.sha256(tokens_L.to(torch.int64).numpy().tobytes()).hexdigest()
    return {"domain": item["domain"], "seed": item["seed"], "present": bank.names(condition.present),
            "annotated": bank.names(condition.annotated), "tokens_sha256": digest}


def write_sample_grid(tiles: list[dict[str, Any]], table: StructureTable, path: Path) -> Path:
    """One row per domain (its name as caption), per sample its channels side by side, masks overlaid
    in vocabulary colours. ``tiles``: dicts with domain, image (C, H, W), label (H, W) model-local, channels."""
    from PIL import Image, ImageDraw

    from medaug.io.png import write_png
    from medaug.prepare.inspect import overlay_rgb
    from medaug.train.tokenizer_eval import TILE_MIN_PIXELS

    to_vocab = table.local_to_vocab_lut()
    rows: dict[str, list[dict[str, Any]]] = {}
    for tile in tiles:
        rows.setdefault(tile["domain"], []).append(tile)
    side = tiles[0]["image"].shape[-1]
    zoom = max(1, -(-TILE_MIN_PIXELS // side))
    size, caption = side * zoom, 14
    columns = max(sum(tile["channels"] for tile in row) for row in rows.values())
    canvas = Image.new("RGB", (size * columns, (size + caption) * len(rows)), "black")
    draw = ImageDraw.Draw(canvas)
    for r, (domain, row) in enumerate(rows.items()):
        top = r * (size + caption)
        draw.text((2, top), f"{domain}  samples (masks overlaid)", fill=(255, 255, 0))
        column = 0
        for tile in row:
            label_HW = to_vocab[tile["label"].clip(0, 255)]
            for c in range(tile["channels"]):
                picture = overlay_rgb(tile["image"][c], label_HW).repeat(zoom, axis=0).repeat(zoom, axis=1)
                canvas.paste(Image.fromarray(picture), (column * size, top + caption))
                column += 1
    return write_png(np.asarray(canvas), path)


def sample_checkpoint(checkpoint_path: Path, config: SampleGridConfig, run_dir: Path, device: torch.device) -> dict[str, Any]:
    """The end-of-training grid from the saved checkpoint (through :func:`load_generator`, so the run folder
    is proven self-contained); the summary also goes into the checkpoint's meta.json (``samples``)."""
    from medaug.train.checkpoint import update_checkpoint_meta

    if config.per_domain <= 0:
        return {"settings": to_dict(config), "samples": [], "png": None}
    var, vqvae, meta = load_generator(checkpoint_path, device, weights="auto")
    summary = write_samples(var, vqvae, meta, config, run_dir)
    update_checkpoint_meta(checkpoint_path, {"samples": summary})
    return summary


# ---------------------------------------------------------------- run functions


def train_var(
    data: str | Path,
    tokenizer: str | Path | None,
    recipe: str | Path | VarRecipe | dict,
    out: str | Path,
    max_steps: int | None = None,
    resume: bool = False,
    overrides: Sequence[str] = (),
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train the transformer on ``data``'s train split with tokenizer ``tokenizer`` into run folder ``out``.

    ``tokenizer``: a tokenizer run or checkpoint folder (None: the run's own copy, for ``resume``).
    ``recipe``: a YAML path, a name under ``recipes/models`` (``medvar-tiny``), a dict or a recipe;
    ``overrides``: ``key=value`` strings; ``max_steps`` overrides ``train.max_steps``. Works in one process
    and under torchrun. Writes ``out/var_recipe.json``, ``out/tokenizer/``, ``out/token_cache/<key>/``,
    checkpoints, ``out/metrics.json``, ``out/samples.png`` and ``out/samples.json``. Returns {run_dir,
    step, stopped_by, checkpoint, train_metrics, token_cache, samples}.
    """
    from medaug.train.checkpoint import latest_checkpoint
    from medaug.train.engine import train

    steps = [f"train.max_steps={max_steps}"] if max_steps is not None else []
    recipe = load_var_recipe(recipe, [*overrides, *steps])
    out = Path(out)
    fresh = latest_checkpoint(out) is None
    if not fresh and not resume:
        raise ConfigError(out, "holds checkpoints of an earlier run; expected resume=True (--resume) or a new run folder")
    info = dist_utils.setup(recipe.train.device)
    try:
        if not fresh:  # e.g. a new default since the run started rebuilds its token cache: say so
            dist_utils.on_rank0(warn_recipe_changes, out / RECIPE_FILE, to_dict(recipe),
                                (*RESUMABLE_TRAIN_KEYS, "samples"))
        task = build_var_task(data, tokenizer, recipe, out, info.device)
        dist_utils.on_rank0(write_json, out / RECIPE_FILE, to_dict(recipe))
        result = train(task, recipe.train, out, resume=resume, progress=progress)
        summary: dict[str, Any] = {"run_dir": str(out), "step": result.step, "stopped_by": result.stopped_by,
                                   "checkpoint": str(result.checkpoint_path) if result.checkpoint_path else None,
                                   "train_metrics": result.metrics, "token_cache": _cache_summary(task.cache),
                                   "samples": None}
        if dist_utils.is_rank0() and result.checkpoint_path is not None:
            summary["samples"] = sample_checkpoint(result.checkpoint_path, recipe.samples, out, info.device)
            write_json(out / METRICS_FILE, {"step": result.step, "train": result.metrics})
        return summary
    finally:
        dist_utils.teardown(info)


def _cache_summary(cache: TokenCache) -> dict[str, Any]:
    return {"path": str(cache.path), "built": cache.built, "rows": int(cache.info["rows"]),
            "rows_flipped": int(cache.info["rows_flipped"])}


@dataclass(frozen=True)
class AllRecipes:
    """What ``medaug train all`` runs: the tokenizer recipe as given (``tokenizer_source``: a path or a
    mapping, plus ``tokenizer_overrides``; ``tokenizer``: its typed, checked form) and the VAR recipe."""

    tokenizer_source: Path | dict[str, Any]
    tokenizer_overrides: tuple[str, ...]
    tokenizer: TokenizerRecipe
    var: VarRecipe


def load_all_recipes(recipe: str | Path | dict, overrides: Sequence[str] = ()) -> AllRecipes:
    """The two recipes of ``medaug train all`` from one file (or dict), ``--set`` keys prefixed by stage.

    Either ``{tokenizer: <recipe>, var: <recipe>}`` (each a name under recipes/models, a path relative to
    the file or the working folder, or an inline mapping), or a VAR recipe whose ``tokenizer`` key names
    the tokenizer recipe. Overrides: ``tokenizer.train.max_steps=5``, ``var.train.max_steps=5``. Both
    recipes are loaded and checked here, so a bad key fails before anything trains.
    """
    if isinstance(recipe, dict):
        data, base = copy.deepcopy(recipe), None
    else:
        path = resolve_recipe_path(recipe)
        data, base = read_yaml(path), path.parent
    if set(data) == {"tokenizer", "var"}:
        tokenizer_source, var_source = data["tokenizer"], data["var"]
    else:
        tokenizer_source, var_source = data.get("tokenizer"), data
    if tokenizer_source is None:
        raise ConfigError(f"{recipe}.tokenizer", "is missing; expected the tokenizer recipe to train first "
                                                 "(a name such as tiny, a path, or a mapping)")
    stage_overrides = _split_overrides(overrides)
    tokenizer_source = _recipe_source(tokenizer_source, base)
    tokenizer_recipe = _in_stage("tokenizer", load_tokenizer_recipe, tokenizer_source, stage_overrides["tokenizer"])
    var_recipe = _in_stage("var", load_var_recipe, _recipe_source(var_source, base), stage_overrides["var"])
    return AllRecipes(tokenizer_source, tuple(stage_overrides["tokenizer"]), tokenizer_recipe, var_recipe)


def _in_stage(stage: str, load: Callable[..., Any], source: Any, overrides: Sequence[str]) -> Any:
    """``load(source, overrides)``; a ConfigError names the key as the user wrote it (``--set var.train...``)."""
    try:
        return load(source, overrides)
    except ConfigError as error:
        prefix = "--set "
        where = error.where.replace(prefix, f"{prefix}{stage}.", 1) if error.where.startswith(prefix) else error.where
        raise ConfigError(where, error.reason) from None


def _recipe_source(source: Any, base: Path | None) -> Any:
    if isinstance(source, dict):
        return source
    return resolve_recipe_path(source, base)


def _split_overrides(overrides: Sequence[str]) -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {"tokenizer": [], "var": []}
    for text in overrides:
        stage, _, rest = text.partition(".")
        if stage not in stages or not rest:
            raise ConfigError(f"--set {text}", "expected a key starting with tokenizer. or var., "
                                               "e.g. tokenizer.train.max_steps=50")
        stages[stage].append(rest)
    return stages


def train_all(
    data: str | Path,
    recipe: str | Path | dict,
    out: str | Path,
    resume: bool = False,
    overrides: Sequence[str] = (),
    progress: Callable[[str, int, int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """The tokenizer into ``out/tokenizer_run``, then the transformer into ``out`` with it (one recipe file,
    :func:`load_all_recipes`). ``progress(stage, step, max_steps, metrics)``. Returns {run_dir, tokenizer, var}."""
    from medaug.train.tokenizer import train_tokenizer

    recipes = load_all_recipes(recipe, overrides)
    out = Path(out)
    info = dist_utils.setup(recipes.var.train.device)  # one process group for both stages under torchrun
    try:
        tokenizer_run = out / TOKENIZER_RUN_DIR
        tokenizer_summary = train_tokenizer(data, recipes.tokenizer_source, tokenizer_run, resume=resume,
                                            overrides=recipes.tokenizer_overrides,
                                            progress=_stage_progress(progress, "tokenizer"))
        var_summary = train_var(data, tokenizer_run, recipes.var, out, resume=resume,
                                progress=_stage_progress(progress, "var"))
    finally:
        dist_utils.teardown(info)
    return {"run_dir": str(out), "tokenizer": tokenizer_summary, "var": var_summary}


def _stage_progress(progress: Callable[..., None] | None, stage: str) -> Callable[[int, int, dict[str, float]], None] | None:
    if progress is None:
        return None
    return lambda step, total, metrics: progress(stage, step, total, metrics)


__all__ = [
    "AllRecipes",
    "ConditioningConfig",
    "GeneratorContext",
    "SampleGridConfig",
    "VarLossConfig",
    "VarModelConfig",
    "VarRecipe",
    "VarTask",
    "build_var_task",
    "copy_tokenizer",
    "drop_flags",
    "load_all_recipes",
    "load_generator",
    "load_var_recipe",
    "plan_samples",
    "sample_checkpoint",
    "sample_conditions",
    "token_loss",
    "token_weights",
    "train_all",
    "train_var",
    "write_sample_grid",
    "write_samples",
]
