"""Distribution metrics against independent formulas (scipy sqrtm, double loops, analytic Gaussians)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import linalg

from medaug.eval import metrics
from medaug.eval.metrics import MetricConfig


def scipy_fid(a_ND: np.ndarray, b_MD: np.ndarray) -> float:
    """pytorch-fid's formula: sqrtm of Σ1·Σ2 by scipy, real part, traces."""
    mu1, mu2 = a_ND.mean(axis=0), b_MD.mean(axis=0)
    s1, s2 = np.cov(a_ND, rowvar=False), np.cov(b_MD, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean.real))


def correlated(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    mixing_DD = rng.normal(size=(d, d)) / math.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing_DD + shift


@pytest.mark.parametrize("n, m, d", [(400, 300, 8), (30, 25, 64), (60, 200, 40)], ids=["covariance", "gram", "mixed"])
def test_fid_matches_scipy_sqrtm(n, m, d):
    rng = np.random.default_rng(n + d)
    a_ND, b_MD = correlated(rng, n, d), correlated(rng, m, d, shift=0.3)
    assert metrics.fid(a_ND, b_MD) == pytest.approx(scipy_fid(a_ND, b_MD), rel=1e-6, abs=1e-8)


def test_frechet_distance_matches_scipy_on_random_covariances():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_of_identical_sets_is_zero():
    rng = np.random.default_rng(0)
    for n, d in ((500, 10), (20, 100)):
        x_ND = correlated(rng, n, d)
        assert metrics.fid(x_ND, x_ND) == pytest.approx(0.0, abs=1e-8 * d)


def test_frechet_distance_of_commuting_gaussians_is_analytic():
    """Σ1 = R diag(a) Rᵀ, Σ2 = R diag(b) Rᵀ: FID = |Δμ|² + Σ (√a - √b)²."""
    rng = np.random.default_rng(1)
    rotation, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    a, b = np.array([1.0, 4.0, 0.25, 9.0]), np.array([2.0, 1.0, 1.0, 4.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    value = metrics.frechet_distance(mu1, rotation @ np.diag(a) @ rotation.T, mu2, rotation @ np.diag(b) @ rotation.T)
    assert value == pytest.approx(expected, rel=1e-10)


def test_fid_of_sampled_gaussians_approaches_the_analytic_value():
    rng = np.random.default_rng(2)
    sd1, sd2 = np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.0, 0.5])
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, -1.0])
    x = rng.normal(size=(40000, 3)) * sd1 + mu1
    y = rng.normal(size=(40000, 3)) * sd2 + mu2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((sd1 - sd2) ** 2)  # 2 + 0.25 + 1 = 3.25
    assert metrics.fid(x, y) == pytest.approx(expected, abs=0.05)


def loop_mmd2(x, y, kernel, unbiased=True):
    n, m = len(x), len(y)
    xx = sum(kernel(x[i], x[j]) for i in range(n) for j in range(n) if i != j or not unbiased)
    yy = sum(kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j or not unbiased)
    xy = sum(kernel(x[i], y[j]) for i in range(n) for j in range(m))
    pairs_x = n * (n - 1) if unbiased else n * n
    pairs_y = m * (m - 1) if unbiased else m * m
    return xx / pairs_x + yy / pairs_y - 2 * xy / (n * m)


def test_kid_matches_a_double_loop():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(9, 5)), rng.normal(size=(9, 5)) + 0.4
    expected = loop_mmd2(x, y, lambda u, v: (float(u @ v) / 5 + 1) ** 3)
    result = metrics.kid(x, y, subsets=3, subset_size=50)  # the whole sets, in another order each time
    assert result.subset_size == 9
    np.testing.assert_allclose(result.values, expected, rtol=1e-10)
    assert result.std == pytest.approx(0.0, abs=1e-12)


def test_kid_subsets_average_the_subset_values():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(40, 3)), rng.normal(size=(30, 3))
    result = metrics.kid(x, y, subsets=20, subset_size=10, seed=7)
    assert result.values.shape == (20,) and result.subset_size == 10
    assert result.mean == pytest.approx(result.values.mean()) and result.std == pytest.approx(result.values.std())
    assert result.std > 0


@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "v-statistic"])
def test_cmmd_matches_a_double_loop(unbiased):
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(7, 4)) * 5, rng.normal(size=(8, 4)) * 5 + 2
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    kernel = lambda u, v: math.exp(-float(np.sum((unit(u) - unit(v)) ** 2)) / (2 * 10.0 ** 2))  # noqa: E731
    expected = 1000 * loop_mmd2(x, y, kernel, unbiased)
    assert metrics.cmmd(x, y, unbiased=unbiased) == pytest.approx(expected, rel=1e-8)


def test_cmmd_without_normalisation_uses_the_raw_features():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(6, 3)) * 8, rng.normal(size=(5, 3)) * 8
    kernel = lambda u, v: math.exp(-float(np.sum((u - v) ** 2)) / (2 * 3.0 ** 2))  # noqa: E731
    assert metrics.cmmd(x, y, sigma=3.0, scale=1.0, normalize=False) == pytest.approx(loop_mmd2(x, y, kernel), rel=1e-8)


def loop_prdc(real, fake, k):
    dist = lambda a, b: float(np.linalg.norm(a - b))  # noqa: E731
    def radius(points, i):
        return sorted(dist(points[i], points[j]) for j in range(len(points)) if j != i)[k - 1]
    r_real = [radius(real, i) for i in range(len(real))]
    r_fake = [radius(fake, j) for j in range(len(fake))]
    precision = np.mean([any(dist(real[i], f) < r_real[i] for i in range(len(real))) for f in fake])
    recall = np.mean([any(dist(r, fake[j]) < r_fake[j] for j in range(len(fake))) for r in real])
    density = np.mean([sum(dist(real[i], f) < r_real[i] for i in range(len(real))) for f in fake]) / k
    coverage = np.mean([min(dist(real[i], f) for f in fake) < r_real[i] for i in range(len(real))])
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prdc_matches_direct_loops(k):
    rng = np.random.default_rng(k)
    real, fake = rng.normal(size=(15, 3)), rng.normal(size=(12, 3)) * 1.3 + 0.5
    result = metrics.prdc(real, fake, k)
    for name, value in loop_prdc(real, fake, k).items():
        assert result[name] == pytest.approx(value), name


def test_bootstrap_copies_are_not_their_own_neighbours_or_kernel_pairs():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(6, 2))
    origin = np.array([0, 0, 1, 2, 2, 2])
    drawn = x[origin]
    distances = np.sqrt(metrics.squared_distances(drawn, drawn))
    radii = metrics.knn_radii(distances, 2, origin)
    for i, o in enumerate(origin):
        others = sorted(float(np.linalg.norm(drawn[i] - drawn[j])) for j in range(6) if origin[j] != o)
        assert radii[i] == pytest.approx(others[1])
    kernel = metrics.rbf_kernel(drawn, drawn, 1.0)
    pairs = [(i, j) for i in range(6) for j in range(6) if origin[i] != origin[j]]
    expected = np.mean([kernel[i, j] for i, j in pairs]) * 2 - 2 * kernel.mean()
    assert metrics.mmd2(kernel, kernel, kernel, origin, origin) == pytest.approx(expected)


def test_shifted_and_noisier_sets_score_worse():
    rng = np.random.default_rng(9)
    real = correlated(rng, 300, 6)
    mixing = np.linalg.cholesky(np.cov(real, rowvar=False))
    fresh = rng.normal(size=(300, 6)) @ mixing.T
    shifted = fresh + 1.0
    noisier = fresh + rng.normal(size=fresh.shape) * 1.0
    config = MetricConfig(kid_subsets=10, kid_subset_size=200, bootstrap=0, cmmd_sigma=1.0)
    scores = {name: metrics.point_metrics(real, data, config) for name, data in
              (("fresh", fresh), ("shifted", shifted), ("noisier", noisier))}
    for worse in ("shifted", "noisier"):
        for name in ("fid", "kid", "cmmd"):
            assert scores[worse][name] > scores["fresh"][name] + 1e-3, (worse, name)
        assert scores[worse]["precision"] < scores["fresh"]["precision"], worse
        assert scores[worse]["density"] < scores["fresh"]["density"], worse
    assert scores["shifted"]["coverage"] < scores["fresh"]["coverage"]


def test_compare_features_reports_intervals_and_a_real_floor():
    rng = np.random.default_rng(10)
    real = rng.normal(size=(120, 4))
    shifted = rng.normal(size=(50, 4)) + 0.8
    config = MetricConfig(kid_subsets=20, kid_subset_size=40, bootstrap=30, cmmd_sigma=1.0)
    result = metrics.compare_features(real, shifted, config)
    assert (result["n_real"], result["n_synthetic"], result["floor_n"]) == (120, 50, 50)
    split = metrics.floor_split(120, 50, config.seed)
    floors = metrics.point_metrics(real[split[0]], real[split[1]], config)
    for name in metrics.DISTRIBUTION_METRICS:
        entry = result[name]
        assert entry["floor"] == pytest.approx(floors[name]), name
        low, high = entry["ci"]
        assert low <= high, name
    for name in ("fid", "kid", "cmmd"):
        assert result[name]["value"] > result[name]["floor"], name
        assert result[name]["ci"][0] > result[name]["floor"], name
    for name in ("fid", "kid", "cmmd"):  # at the floor's size, the synthetic set is still further away
        assert result[name]["matched"] > result[name]["floor"], name
    assert result["fid"]["ci"][0] <= result["fid"]["value"] <= result["fid"]["ci"][1]  # re-centred on the estimate
    assert result["kid"]["std"] == pytest.approx(metrics.kid(real, shifted, 20, 40, config.seed).std)


def test_floor_split_is_disjoint_and_sized_by_the_smaller_set():
    first, second = metrics.floor_split(101, 80, seed=3)
    assert first.size == second.size == 50 and not set(first) & set(second)
    assert metrics.floor_split(100, 30)[0].size == 30
    assert metrics.floor_split(3, 10) is None


def test_medvar_efficiency_formula():
    assert metrics.medvar_efficiency(20.0, 0.5) == pytest.approx(20.0 * math.log(1.5))
    assert metrics.medvar_efficiency(20.0, 2.0, gamma=2.0) == pytest.approx(20.0 * math.log(3.0) ** 2)
    with pytest.raises(Exception, match="seconds_per_image"):
        metrics.medvar_efficiency(1.0, -1.0)


def test_pairwise_cap_subsamples_kernel_metrics_but_not_fid():
    rng = np.random.default_rng(11)
    real, synthetic = rng.normal(size=(300, 3)), rng.normal(size=(250, 3)) + 0.2
    config = MetricConfig(max_pairwise=100, bootstrap=0, kid_subsets=5, kid_subset_size=50)
    values = metrics.point_metrics(real, synthetic, config)
    assert values["fid"] == pytest.approx(metrics.fid(real, synthetic))
    rows = np.sort(np.random.default_rng(config.seed).choice(300, 100, replace=False))
    synthetic_rows = np.sort(np.random.default_rng(config.seed).choice(250, 100, replace=False))
    assert values["cmmd"] == pytest.approx(metrics.cmmd(real[rows], synthetic[synthetic_rows]))
