"""The synthesis plan: which sample gets which domain, condition and seed (DESIGN §3 "Conditioning").

A request names targets (``--organ/--structure``, resolved through the vocabulary's hierarchy to the
structures the generator knows: ``prostate`` → ``prostate_peripheral_zone`` + ``prostate_transition_zone``),
domains, a count and a balance. Every conditional sample's condition (present + annotated structures) is
drawn from the generator's condition bank, i.e. from real training rows of its domain that contain one of
its target's structures, in proportion to how often the training split had it.

Balance:

* ``structure`` (default): each target gets an equal share of ``n``; a target's share is split evenly over
  the domains where it occurs. With no target this is the same as ``domain``.
* ``domain``: each domain (requested, or every domain where a target occurs) gets an equal share; inside a
  domain its targets share evenly.
* ``none``: conditions are drawn from the pooled bank of the domains in proportion to their training counts
  (the training distribution, restricted to rows containing a target).

``--unconditional`` samples use the null condition; the plan spreads them evenly over domains. With VAR's
null condition (no domain) that domain only picks the export layout (channels, spacing, intensity units); a
generator trained with ``model.null_keeps_domain`` also draws them in that domain.

Redraws: a sample whose generated mask does not show its target (on at least the generator's
``conditioning.min_pixels`` pixels, the rule that made the target "present" in its training conditions) is
drawn again with a new seed (:func:`draw_seed`), up to ``redraws`` times (default 2, as a user asking for
prostate slices wants each one to hold a prostate; MONAI's MAISI likewise regenerates samples that fail its
checks). The manifest records each sample's ``draws`` and the seed of the kept draw; the run's adherence
reports the first-draw rate beside the delivered one, so the generator's own rate stays visible.

Determinism: the plan depends only on the request and the bank. After drawing, samples are put in a
random order (seeded), so that every batch, and the finished part of an interrupted run, mixes all targets.
Sample ``i``'s sampler seed is :func:`sample_seed` ``(seed, i)``: independent of the batch size and of the
other samples.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import torch

from medaug import vocab
from medaug.errors import ConfigError
from medaug.train.condition_bank import Condition, ConditionBank

Balance = Literal["structure", "domain", "none"]
BALANCES: tuple[str, ...] = ("structure", "domain", "none")
POOR_RECONSTRUCTION_DICE = 0.5  # below this tokenizer reconstruction Dice a target draws a warning
MAX_REDRAWS = 10


@dataclass(frozen=True)
class SamplingSettings:
    """The sampler's settings (``medaug.models.sampling``): guidance at the last scale, filters, temperature."""

    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ConfigError("--top-k", f"is {self.top_k}; expected >= 0 (0 keeps every token)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("--top-p", f"is {self.top_p}; expected a value in (0, 1]")
        if not self.temperature > 0.0:
            raise ConfigError("--temperature", f"is {self.temperature}; expected > 0")
        if self.cfg < 0.0:
            raise ConfigError("--cfg", f"is {self.cfg}; expected >= 0 (0 turns guidance off)")


@dataclass(frozen=True)
class PlanRequest:
    """What the user asked for (``medaug synthesize`` options)."""

    n: int
    targets: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    balance: Balance = "structure"
    seed: int = 0
    unconditional: bool = False
    batch_size: int = 16
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    redraws: int = 2

    def __post_init__(self) -> None:
        if not 0 <= self.redraws <= MAX_REDRAWS:
            raise ConfigError("--redraws", f"is {self.redraws}; expected 0..{MAX_REDRAWS} (0: keep every first draw)")
        if self.n < 1:
            raise ConfigError("--n", f"is {self.n}; expected at least 1 sample")
        if self.batch_size < 1:
            raise ConfigError("--batch-size", f"is {self.batch_size}; expected at least 1")
        if self.balance not in BALANCES:
            raise ConfigError("--balance", f"is {self.balance!r}; expected one of {', '.join(BALANCES)}")
        if self.unconditional and self.targets:
            raise ConfigError("--unconditional", "uses the null condition; expected no --organ/--structure with it")
        if not 0 <= self.seed < 2**63:
            raise ConfigError("--seed", f"is {self.seed}; expected 0 <= seed < 2**63")


@dataclass(frozen=True)
class PlannedSample:
    """One sample of the plan. ``present``/``annotated``: model-local structure indices (1..S)."""

    index: int
    domain: str
    domain_index: int
    seed: int
    target: str | None = None
    target_structures: tuple[str, ...] = ()
    present: tuple[int, ...] = ()
    annotated: tuple[int, ...] = ()
    unconditional: bool = False


@dataclass(frozen=True)
class Plan:
    """The whole plan, in sample order, with the resolved targets and the warnings for the user."""

    request: PlanRequest
    samples: tuple[PlannedSample, ...]
    targets: dict[str, tuple[str, ...]]
    structures: tuple[str, ...]  # the generator's structures (model-local order)
    warnings: tuple[str, ...] = ()

    @property
    def num_batches(self) -> int:
        return -(-len(self.samples) // self.request.batch_size)

    def batch(self, batch_index: int) -> tuple[PlannedSample, ...]:
        size = self.request.batch_size
        return self.samples[batch_index * size:(batch_index + 1) * size]

    def names(self, indices: Sequence[int]) -> list[str]:
        return [self.structures[s - 1] for s in indices]

    def counts(self) -> dict[str, dict[str, int]]:
        """Planned samples per domain and per target (``(none)`` for samples without one)."""
        return {"domain": dict(sorted(Counter(s.domain for s in self.samples).items())),
                "target": dict(Counter(s.target or "(none)" for s in self.samples))}

    def to_table(self) -> pa.Table:
        """``plan.parquet``: one row per sample (names, not indices, so it reads without the generator)."""
        size = self.request.batch_size
        return pa.table({
            "sample_index": pa.array([s.index for s in self.samples], pa.int64()),
            "domain": pa.array([s.domain for s in self.samples], pa.string()),
            "target": pa.array([s.target for s in self.samples], pa.string()),
            "target_structures": pa.array([list(s.target_structures) for s in self.samples], pa.list_(pa.string())),
            "condition_present": pa.array([self.names(s.present) for s in self.samples], pa.list_(pa.string())),
            "condition_annotated": pa.array([self.names(s.annotated) for s in self.samples], pa.list_(pa.string())),
            "unconditional": pa.array([s.unconditional for s in self.samples], pa.bool_()),
            "seed": pa.array([s.seed for s in self.samples], pa.int64()),
            "batch_index": pa.array([s.index // size for s in self.samples], pa.int32()),
            "batch_position": pa.array([s.index % size for s in self.samples], pa.int32()),
        })


def sample_seed(seed: int, index: int) -> int:
    """Sample ``index``'s sampler seed: 63 bits of sha256 of (``seed``, ``index``)."""
    digest = hashlib.sha256(f"medaug-sample:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def draw_seed(first: int, draw: int) -> int:
    """The sampler seed of a sample's ``draw``-th draw (1 = the first, whose seed is ``first``, the plan's seed;
    later draws replace a sample whose mask missed its target, see :mod:`medaug.synth.run`)."""
    if draw == 1:
        return first
    digest = hashlib.sha256(f"medaug-redraw:{first}:{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def valid_target_names(structures: Sequence[str]) -> list[str]:
    """Names ``--organ`` accepts for a generator with ``structures``: each one and every ancestor."""
    names = set(structures)
    for name in structures:
        names.update(vocab.ancestors(name))
    return sorted(names)


def resolve_targets(names: Sequence[str], structures: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Each requested name → the generator's structures it covers (itself and its descendants).

    ConfigError naming ``--organ`` and listing the valid names for a name the vocabulary does not know or
    that covers none of the generator's structures.
    """
    known = set(structures)
    resolved: dict[str, tuple[str, ...]] = {}
    for name in names:
        covered = tuple(s for s in vocab.resolve(name) if s in known) if name in vocab.VOCABULARY else ()
        if not covered:
            valid = ", ".join(valid_target_names(structures))
            raise ConfigError(f"--organ {name}", f"is not a structure this generator knows; expected one of: {valid}")
        resolved[name] = covered
    return resolved


def check_domains(domains: Sequence[str], domain_names: Sequence[str]) -> tuple[str, ...]:
    """The requested domains (default: all), each one checked against the generator's."""
    unknown = [name for name in domains if name not in domain_names]
    if unknown:
        raise ConfigError(f"--domain {unknown[0]}", f"is not a domain of this generator; expected one of: "
                          f"{', '.join(domain_names)}")
    return tuple(dict.fromkeys(domains)) or tuple(domain_names)


def split_evenly(n: int, parts: int) -> list[int]:
    """``n`` as ``parts`` counts differing by at most one (the first ones larger)."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _has_any(bank: ConditionBank, domain: str, structures: Sequence[str]) -> bool:
    wanted = {bank.structures.index(name) + 1 for name in structures}
    return any(wanted.intersection(c.present) for c in bank.domains.get(domain, ()))


# A group of draws: (domain, target or None, count).
_Group = tuple[str, str | None, int]


def _groups(request: PlanRequest, bank: ConditionBank, domains: Sequence[str],
            targets: Mapping[str, tuple[str, ...]]) -> list[_Group]:
    """How many samples each (domain, target) pair gets under ``request.balance`` (not for ``none``)."""
    trained = [d for d in domains if bank.domains.get(d)]
    if not targets:
        if not trained:
            raise ConfigError("--domain", f"{list(domains)} have no training rows in this generator")
        return [(d, None, count) for d, count in zip(trained, split_evenly(request.n, len(trained)))]
    where = {t: [d for d in trained if _has_any(bank, d, s)] for t, s in targets.items()}
    for target, found in where.items():
        if not found:
            raise ConfigError(f"--organ {target}", f"is present in no training row of domains {list(domains)}")
    groups: list[_Group] = []
    if request.balance == "structure":
        for target, share in zip(targets, split_evenly(request.n, len(targets))):
            groups += [(d, target, c) for d, c in zip(where[target], split_evenly(share, len(where[target])))]
        return groups
    used = [d for d in trained if any(d in found for found in where.values())]
    for d, share in zip(used, split_evenly(request.n, len(used))):
        here = [t for t in targets if d in where[t]]
        groups += [(d, t, c) for t, c in zip(here, split_evenly(share, len(here)))]
    return groups


def _draw_groups(groups: Sequence[_Group], bank: ConditionBank, targets: Mapping[str, tuple[str, ...]],
                 generator: torch.Generator) -> list[tuple[str, str | None, Condition | None]]:
    draws: list[tuple[str, str | None, Condition | None]] = []
    for domain, target, count in groups:
        if count:
            conditions = bank.draw(domain, count, generator, targets.get(target, ()))
            draws += [(domain, target, condition) for condition in conditions]
    return draws


def _draw_pooled(request: PlanRequest, bank: ConditionBank, domains: Sequence[str],
                 targets: Mapping[str, tuple[str, ...]], generator: torch.Generator
                 ) -> list[tuple[str, str | None, Condition | None]]:
    """``balance=none``: draw (domain, condition) pairs from the pooled bank in proportion to counts."""
    wanted = {t: {bank.structures.index(name) + 1 for name in s} for t, s in targets.items()}
    pool: list[tuple[str, str | None, Condition]] = []
    for domain in domains:
        for condition in bank.domains.get(domain, ()):
            hit = next((t for t, w in wanted.items() if w.intersection(condition.present)), None)
            if hit is not None or not targets:
                pool.append((domain, hit, condition))
    if not pool:
        raise ConfigError("--organ", f"{list(targets)} are present in no training row of domains {list(domains)}")
    weights = torch.tensor([condition.count for _, _, condition in pool], dtype=torch.float64)
    picks = torch.multinomial(weights, request.n, replacement=True, generator=generator)
    return [pool[i] for i in picks.tolist()]


def quality_warnings(targets: Mapping[str, tuple[str, ...]], quality: Mapping[str, float | None]) -> list[str]:
    """One warning per target structure whose tokenizer reconstruction Dice is low or was never measured."""
    warnings = []
    for target, structures in targets.items():
        for name in structures:
            dice = quality.get(name)
            if dice is None:
                warnings.append(f"{name} (for {target}): the tokenizer's reconstruction of it was never measured "
                                "(no validation slice had it); its masks may be unreliable")
            elif dice < POOR_RECONSTRUCTION_DICE:
                warnings.append(f"{name} (for {target}): the tokenizer reconstructs it poorly (Dice {dice:.2f} < "
                                f"{POOR_RECONSTRUCTION_DICE}); its generated masks will be unreliable")
    return warnings


def make_plan(request: PlanRequest, bank: ConditionBank, domain_names: Sequence[str],
              quality: Mapping[str, float | None] | None = None) -> Plan:
    """The plan of ``request`` for a generator with ``bank`` and ``domain_names`` (module docstring).

    ``quality``: tokenizer reconstruction Dice per structure name (None = not measured), for warnings.
    """
    domains = check_domains(request.domains, domain_names)
    targets = resolve_targets(request.targets, bank.structures)
    generator = torch.Generator().manual_seed(request.seed)
    if request.balance == "none" and not request.unconditional:
        draws = _draw_pooled(request, bank, domains, targets, generator)
    else:
        groups = _groups(request, bank, domains, targets)
        draws = ([(d, None, None) for d, _, count in groups for _ in range(count)] if request.unconditional
                 else _draw_groups(groups, bank, targets, generator))
    order = torch.randperm(len(draws), generator=generator).tolist()
    samples = tuple(_planned(i, draws[j], domain_names, targets, request) for i, j in enumerate(order))
    warnings = quality_warnings(targets, quality or {}) if quality is not None else []
    return Plan(request, samples, targets, tuple(bank.structures), tuple(warnings))


def _planned(index: int, draw: tuple[str, str | None, Condition | None], domain_names: Sequence[str],
             targets: Mapping[str, tuple[str, ...]], request: PlanRequest) -> PlannedSample:
    domain, target, condition = draw
    return PlannedSample(
        index=index, domain=domain, domain_index=list(domain_names).index(domain),
        seed=sample_seed(request.seed, index), target=target, target_structures=targets.get(target, ()),
        present=condition.present if condition else (), annotated=condition.annotated if condition else (),
        unconditional=request.unconditional)


def plan_summary(plan: Plan) -> dict[str, Any]:
    """JSON-ready: request, resolved targets, counts, warnings."""
    request = plan.request
    return {"n": request.n, "targets": {t: list(s) for t, s in plan.targets.items()},
            "domains": list(request.domains), "balance": request.balance, "seed": request.seed,
            "unconditional": request.unconditional, "batch_size": request.batch_size,
            "redraws": request.redraws, "batches": plan.num_batches, "counts": plan.counts(), "warnings": list(plan.warnings)}


__all__ = [
    "BALANCES",
    "MAX_REDRAWS",
    "Plan",
    "PlanRequest",
    "PlannedSample",
    "SamplingSettings",
    "check_domains",
    "draw_seed",
    "make_plan",
    "plan_summary",
    "quality_warnings",
    "resolve_targets",
    "sample_seed",
    "split_evenly",
    "valid_target_names",
]
