"""Class-balanced sampler: weights by domain / structure against hand-computed values, empirical draw
frequencies against the weights (chi-square), ranks' shares of the global stream, resume positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from medaug.data.samplers import BalancedSampler, SamplerConfig, build_sampler, row_weights
from medaug.errors import ConfigError

# 7 rows: domain 0 has 4 rows, domain 1 has 2, domain 2 has 1; structures A (rows 0-3), B (rows 1, 4), C (row 6)
DOMAIN_N = np.array([0, 0, 0, 0, 1, 1, 2])
PRESENT_NS = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1]], dtype=bool)


@pytest.mark.parametrize("by,power,expected", [
    ("natural", 1.0, [1, 1, 1, 1, 1, 1, 1]),
    ("domain", 1.0, [1 / 4, 1 / 4, 1 / 4, 1 / 4, 1 / 2, 1 / 2, 1]),
    ("domain", 0.5, [4 ** -0.5] * 4 + [2 ** -0.5] * 2 + [1]),
    ("domain", 0.0, [1] * 7),
    # classes: A in 4 rows, B in 2, C in 1, "empty" in 1 (row 5); a row takes its rarest class
    ("structure", 1.0, [1 / 4, 1 / 2, 1 / 4, 1 / 4, 1 / 2, 1, 1]),
    ("structure", 0.5, [0.5, 2 ** -0.5, 0.5, 0.5, 2 ** -0.5, 1, 1]),
], ids=["natural", "domain", "domain-sqrt", "domain-power-0", "structure", "structure-sqrt"])
def test_row_weights_match_hand_computed_values(by, power, expected):
    weights = row_weights(SamplerConfig(by=by, power=power), DOMAIN_N, PRESENT_NS)
    np.testing.assert_allclose(weights, expected, rtol=1e-12)


def test_balanced_by_domain_gives_each_domain_the_same_mass():
    weights = row_weights(SamplerConfig(by="domain", power=1.0), DOMAIN_N, PRESENT_NS)
    masses = [weights[DOMAIN_N == d].sum() / weights.sum() for d in range(3)]
    np.testing.assert_allclose(masses, [1 / 3] * 3)


@pytest.mark.parametrize("by,power", [("domain", 1.0), ("structure", 0.5), ("natural", 1.0)])
def test_draw_frequencies_match_the_weights(by, power):
    weights = row_weights(SamplerConfig(by=by, power=power), DOMAIN_N, PRESENT_NS)
    sampler = BalancedSampler(weights, seed=3, epoch_size=5000)
    counts = np.zeros(len(weights))
    for epoch in range(8):  # 40,000 draws over 8 independent epochs
        counts += np.bincount(sampler.global_stream(epoch).numpy(), minlength=len(weights))
    expected = counts.sum() * weights / weights.sum()
    statistic, p_value = stats.chisquare(counts, expected)
    assert p_value > 1e-3, (counts, expected, statistic)
    np.testing.assert_allclose(counts / counts.sum(), weights / weights.sum(), atol=0.01)


def test_rows_of_zero_weight_are_never_drawn():
    sampler = BalancedSampler(np.array([0.0, 2.0, 0.0, 1.0, 0.0]), epoch_size=3000)
    drawn = set(sampler.global_stream(0).tolist())
    assert drawn == {1, 3}


def test_ranks_take_disjoint_interleaved_shares_of_one_stream():
    weights = row_weights(SamplerConfig(by="structure"), DOMAIN_N, PRESENT_NS)
    single = BalancedSampler(weights, seed=11, epoch_size=30)
    ranks = [BalancedSampler(weights, num_replicas=3, rank=r, seed=11, epoch_size=30) for r in range(3)]
    for sampler in (single, *ranks):
        sampler.set_epoch(2)
    stream = list(single)
    shares = [list(sampler) for sampler in ranks]
    assert all(len(share) == 10 == sampler.num_samples for share, sampler in zip(shares, ranks))
    # position t of the stream belongs to rank t % 3: disjoint positions that together are the whole stream
    interleaved = [shares[t % 3][t // 3] for t in range(30)]
    assert interleaved == stream
    # a batch of 6 on one process holds exactly the rows of the three ranks' batches of 2
    assert sorted(stream[6:12]) == sorted(shares[0][2:4] + shares[1][2:4] + shares[2][2:4])


def test_epoch_size_is_rounded_to_the_processes():
    ranks = [BalancedSampler(np.ones(7), num_replicas=2, rank=r, epoch_size=7) for r in range(2)]
    assert [sampler.total_size for sampler in ranks] == [6, 6] and [len(sampler) for sampler in ranks] == [3, 3]
    with pytest.raises(ConfigError, match="epoch_size"):
        BalancedSampler(np.ones(7), num_replicas=4, rank=0, epoch_size=3)


def test_stream_is_a_function_of_seed_and_epoch_and_resumes_from_a_position():
    weights = np.arange(1.0, 8.0)
    first, again, other_seed = (BalancedSampler(weights, seed=s, epoch_size=50) for s in (5, 5, 6))
    assert torch.equal(first.global_stream(1), again.global_stream(1))
    assert not torch.equal(first.global_stream(1), first.global_stream(2))
    assert not torch.equal(first.global_stream(1), other_seed.global_stream(1))
    first.set_epoch(4)
    full = list(first)
    first.start = 17
    assert list(first) == full[17:] and len(first) == 33


def test_build_sampler_uses_the_config_and_bad_configs_fail():
    sampler = build_sampler(SamplerConfig(by="domain", epoch_size=12), DOMAIN_N, PRESENT_NS, num_replicas=2, rank=1, seed=4)
    reference = BalancedSampler(row_weights(SamplerConfig(by="domain"), DOMAIN_N, PRESENT_NS), 2, 1, 4, 12)
    assert torch.equal(sampler.share(0), reference.share(0)) and sampler.num_samples == 6
    with pytest.raises(ConfigError, match="sampler.power"):
        SamplerConfig(power=1.5)
    with pytest.raises(ValueError, match="not all zero"):
        BalancedSampler(np.zeros(3))
