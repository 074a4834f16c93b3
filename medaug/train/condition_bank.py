"""The condition bank of a generator run (DESIGN.md §3 "Conditioning", "Checkpoints").

A generator is conditioned on (domain, structures present, structures annotated). Synthesis draws every
condition from real training rows, so that each one is a condition the model has seen: the bank holds,
per domain, the distinct train-split (present, annotated) pairs with how many rows had them.

JSON form (in the generator checkpoint's ``meta.json``, key ``condition_bank``), compact because a large
CT dataset has tens of thousands of distinct present-sets:

.. code-block:: json

    {"format": "medaug-condition-bank", "version": 1,
     "structures": ["liver", "spleen", ...],            # model-local order: index s is structures[s - 1]
     "domains": {"ct/abdomen": {"rows": 120,
                                "annotated_sets": [[1, 2, 3]],                 # model-local indices
                                "conditions": [[count, annotated_set, [present indices]], ...]}}}

Structure indices are model-local (1..S, as the structure table's ``index``); conditions are sorted by
decreasing count, then by their present indices, so the same rows give the same JSON.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medaug.errors import ConfigError

BANK_FORMAT = "medaug-condition-bank"
BANK_VERSION = 1


@dataclass(frozen=True)
class Condition:
    """One distinct condition of a domain: present and annotated structures (model-local 1..S), row count."""

    present: tuple[int, ...]
    annotated: tuple[int, ...]
    count: int


@dataclass(frozen=True)
class ConditionBank:
    """Per domain name, its distinct train conditions; ``structures`` names the model-local indices."""

    structures: tuple[str, ...]
    domains: dict[str, tuple[Condition, ...]]

    @property
    def num_structures(self) -> int:
        return len(self.structures)

    def rows(self, domain: str) -> int:
        """Training rows behind ``domain``'s conditions."""
        return sum(condition.count for condition in self._conditions(domain))

    def _conditions(self, domain: str) -> tuple[Condition, ...]:
        if domain not in self.domains:
            raise ConfigError(f"condition bank domain {domain!r}", f"unknown; expected one of {sorted(self.domains)}")
        return self.domains[domain]

    def draw(self, domain: str, n: int, generator: torch.Generator, containing: Sequence[str] = ()) -> list[Condition]:
        """``n`` conditions of ``domain`` drawn with replacement in proportion to their counts.

        ``containing``: structure names of which each drawn condition must have at least one present
        (``--organ``); ConfigError when no condition of the domain has any.
        """
        candidates = self._conditions(domain)
        if containing:
            wanted = {self.structures.index(name) + 1 for name in containing if name in self.structures}
            candidates = tuple(c for c in candidates if wanted.intersection(c.present))
            if not candidates:
                raise ConfigError(f"structures {list(containing)}", f"present in no training row of {domain!r}")
        counts = torch.tensor([c.count for c in candidates], dtype=torch.float64)
        picks = torch.multinomial(counts, n, replacement=True, generator=generator)
        return [candidates[i] for i in picks.tolist()]

    def to_multi_hot(self, conditions: Sequence[Condition]) -> tuple[torch.Tensor, torch.Tensor]:
        """(present (B, S) bool, annotated (B, S) bool) of ``conditions`` in model-local order."""
        present_BS = torch.zeros(len(conditions), self.num_structures, dtype=torch.bool)
        annotated_BS = torch.zeros_like(present_BS)
        for b, condition in enumerate(conditions):
            present_BS[b, [s - 1 for s in condition.present]] = True
            annotated_BS[b, [s - 1 for s in condition.annotated]] = True
        return present_BS, annotated_BS

    def names(self, indices: Sequence[int]) -> list[str]:
        """Structure names of model-local ``indices``."""
        return [self.structures[s - 1] for s in indices]

    # ---------------------------------------------------------------- JSON
    def to_json(self) -> dict[str, Any]:
        """The compact JSON form (module docstring)."""
        domains = {name: _domain_to_json(conditions) for name, conditions in sorted(self.domains.items())}
        return {"format": BANK_FORMAT, "version": BANK_VERSION, "structures": list(self.structures), "domains": domains}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "condition_bank") -> ConditionBank:
        """The bank stored by :meth:`to_json`; ConfigError naming ``where`` when it is not one."""
        if not isinstance(data, dict) or data.get("format") != BANK_FORMAT or data.get("version") != BANK_VERSION:
            raise ConfigError(where, f"is not a {BANK_FORMAT} version {BANK_VERSION} object")
        structures = tuple(data["structures"])
        domains = {name: _domain_from_json(entry, len(structures), f"{where}.domains.{name}")
                   for name, entry in data["domains"].items()}
        return cls(structures, domains)


def _domain_to_json(conditions: Sequence[Condition]) -> dict[str, Any]:
    annotated_sets = sorted({condition.annotated for condition in conditions})
    lookup = {annotated: i for i, annotated in enumerate(annotated_sets)}
    return {"rows": sum(condition.count for condition in conditions),
            "annotated_sets": [list(annotated) for annotated in annotated_sets],
            "conditions": [[c.count, lookup[c.annotated], list(c.present)] for c in conditions]}


def _domain_from_json(entry: dict[str, Any], num_structures: int, where: str) -> tuple[Condition, ...]:
    annotated_sets = [tuple(int(s) for s in annotated) for annotated in entry["annotated_sets"]]
    conditions = tuple(Condition(tuple(int(s) for s in present), annotated_sets[int(index)], int(count))
                       for count, index, present in entry["conditions"])
    for condition in conditions:
        if any(not 1 <= s <= num_structures for s in condition.present + condition.annotated):
            raise ConfigError(where, f"holds a structure index outside 1..{num_structures}")
    return conditions


def build_condition_bank(domain_N: np.ndarray, present_NS: np.ndarray, annotated_NS: np.ndarray,
                         domain_names: Sequence[str], structures: Sequence[str]) -> ConditionBank:
    """Count the distinct (present, annotated) pairs of the rows, per domain.

    ``domain_N``: (N,) int positions in ``domain_names``; ``present_NS`` / ``annotated_NS``: (N, S) bool
    over ``structures`` (model-local order). Domains without rows get an empty tuple.
    """
    present_NS, annotated_NS = np.asarray(present_NS, bool), np.asarray(annotated_NS, bool)
    counters: dict[int, Counter] = {d: Counter() for d in range(len(domain_names))}
    for d, present_S, annotated_S in zip(np.asarray(domain_N).tolist(), present_NS, annotated_NS):
        key = (tuple(np.flatnonzero(present_S) + 1), tuple(np.flatnonzero(annotated_S) + 1))
        counters[d][key] += 1
    domains = {}
    for d, name in enumerate(domain_names):
        ordered = sorted(counters[d].items(), key=lambda item: (-item[1], item[0]))
        domains[name] = tuple(Condition(tuple(map(int, present)), tuple(map(int, annotated)), count)
                              for (present, annotated), count in ordered)
    return ConditionBank(tuple(structures), domains)


__all__ = ["BANK_FORMAT", "Condition", "ConditionBank", "build_condition_bank"]
