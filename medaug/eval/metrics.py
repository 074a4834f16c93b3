"""Distribution metrics between a real and a synthetic feature set (issue 10 item 2).

Every function takes features as float arrays ``real_ND`` / ``synthetic_MD`` (one row per slice, in the
space of one backbone, :mod:`medaug.eval.features`); the numbers they give are only comparable between
runs that used the same backbone, so callers always store the backbone's name beside them.

* **FID** (Heusel et al. 2017): ``|mu_r - mu_s|² + tr Σ_r + tr Σ_s - 2 tr (Σ_r^½ Σ_s Σ_r^½)^½`` with the
  sample covariance (ddof 1, as pytorch-fid). No ``scipy.linalg.sqrtm``: its Schur iteration returns
  complex noise on near-singular covariances. :func:`frechet_distance` takes Σ_r^½ by a symmetric eigen
  decomposition and the trace term from the eigenvalues of the symmetric PSD matrix Σ_r^½ Σ_s Σ_r^½;
  :func:`fid` uses, when there are fewer samples than dimensions, the identity
  ``tr (Σ_r^½ Σ_s Σ_r^½)^½ = ‖A Bᵀ‖_* / √((N-1)(M-1))`` (A, B the centred features, ‖·‖_* the nuclear
  norm), which never forms a D×D matrix. Units: squared feature units.
* **KID** (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial kernel
  ``k(x, y) = (xᵀy / D + 1)³``, averaged over ``subsets`` random subsets of ``subset_size`` rows of each
  set (drawn without replacement); reported as mean ± std over the subsets (torch-fidelity's convention).
* **CMMD** (Jayasumana et al. 2024): the unbiased MMD² with the Gaussian RBF kernel
  ``exp(-‖x - y‖² / (2σ²))``, σ = 10, times 1000, on L2-normalised embeddings (as the paper's CLIP
  embeddings). The reference code (google-research/cmmd) averages the kernel matrices including their
  diagonals (a V-statistic); ``unbiased=False`` gives that number.
* **Precision / recall** (Kynkäänniemi et al. 2019) and **density / coverage** (Naeem et al. 2020) with
  k-nearest-neighbour balls (k = 5): a point's radius is the Euclidean distance to its k-th nearest
  neighbour in its own set (itself excluded); "inside" is a strict ``<``, as the reference code.
* **MedVAR efficiency** :func:`medvar_efficiency`: ``Q · (ln(1 + P))^γ``.
* **Confidence intervals** :func:`bootstrap`: percentile bootstrap over rows of both sets; resampled
  copies of one row never count as each other's neighbours or kernel pairs (so duplicates neither shrink
  k-NN radii to zero nor add self-similarity to an unbiased MMD). FID's draws are biased upward by the
  repeated rows, so they are re-centred on the estimate (median shift) before taking percentiles.
* **Real-vs-real floor** :func:`floor_split`: the same metric between two disjoint random subsets A and B
  of the real set, each the size of the smaller of the synthetic set and half the real set: what a
  perfect generator would score at that sample size. FID and KID depend on the sample size, so the
  **matched** figure, A against a random synthetic subset of that same size, is the one to set beside it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from medaug.errors import ConfigError

log = logging.getLogger(__name__)

DISTRIBUTION_METRICS = ("fid", "kid", "cmmd", "precision", "recall", "density", "coverage")
LOWER_IS_BETTER = {"fid": True, "kid": True, "cmmd": True, "precision": False, "recall": False,
                   "density": False, "coverage": False}


@dataclass(frozen=True)
class MetricConfig:
    """Settings of :func:`compare_features`.

    ``k``: neighbours of precision/recall/density/coverage. ``kid_subsets``/``kid_subset_size``: KID
    subsets (the size is capped by the smaller set). ``cmmd_sigma``/``cmmd_scale``: CMMD's kernel width
    (feature units) and factor. ``bootstrap``: resamples for the confidence intervals (0 = none) at
    ``level``. ``max_pairwise``: at most this many rows per set enter the pairwise (k-NN, kernel) metrics
    and the bootstrap draws; larger sets are subsampled at random (logged), since the matrices grow as N²
    (FID's value always uses every row). ``seed``: every draw.
    """

    k: int = 5
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    cmmd_sigma: float = 10.0
    cmmd_scale: float = 1000.0
    bootstrap: int = 50
    level: float = 0.95
    max_pairwise: int = 5000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1 or self.kid_subsets < 1 or self.kid_subset_size < 2 or self.max_pairwise < 2:
            raise ConfigError("metrics", "k, kid_subsets, kid_subset_size (>= 2) and max_pairwise (>= 2) must be positive")
        if not 0.0 < self.level < 1.0 or self.bootstrap < 0:
            raise ConfigError("metrics.level", f"is {self.level} with bootstrap {self.bootstrap}; expected 0 < level < 1, "
                                               "bootstrap >= 0")


# ---------------------------------------------------------------------------------------------- FID


def mean_and_covariance(features_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(D,) mean and (D, D) sample covariance (ddof 1) of float64 features."""
    features_ND = np.asarray(features_ND, dtype=np.float64)
    return features_ND.mean(axis=0), np.cov(features_ND, rowvar=False, ddof=1).reshape(features_ND.shape[1], -1)


def _psd_sqrt(sigma_DD: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root of a covariance (eigenvalues below 0 are rounding: set to 0)."""
    eigenvalues_D, vectors_DD = np.linalg.eigh((sigma_DD + sigma_DD.T) / 2.0)
    return (vectors_DD * np.sqrt(np.clip(eigenvalues_D, 0.0, None))) @ vectors_DD.T


def frechet_distance(mu1_D: np.ndarray, sigma1_DD: np.ndarray, mu2_D: np.ndarray, sigma2_DD: np.ndarray) -> float:
    """Fréchet distance between N(mu1, Σ1) and N(mu2, Σ2) (module docstring), clipped at 0 (rounding)."""
    sqrt1_DD = _psd_sqrt(np.asarray(sigma1_DD, dtype=np.float64))
    middle_DD = sqrt1_DD @ np.asarray(sigma2_DD, dtype=np.float64) @ sqrt1_DD
    eigenvalues_D = np.linalg.eigvalsh((middle_DD + middle_DD.T) / 2.0)
    trace_sqrt = float(np.sqrt(np.clip(eigenvalues_D, 0.0, None)).sum())
    mean_term = float(np.sum((np.asarray(mu1_D) - np.asarray(mu2_D)) ** 2))
    return max(mean_term + float(np.trace(sigma1_DD)) + float(np.trace(sigma2_DD)) - 2.0 * trace_sqrt, 0.0)


def fid(real_ND: np.ndarray, synthetic_MD: np.ndarray) -> float:
    """FID between two feature sets (at least 2 rows each), by the cheaper exact route (module docstring)."""
    real_ND, synthetic_MD = _as_pair(real_ND, synthetic_MD, minimum=2)
    n, m, d = real_ND.shape[0], synthetic_MD.shape[0], real_ND.shape[1]
    gram_cost = n * m * min(n, m)
    covariance_cost = (n + m) * d * d + 2 * d ** 3
    if gram_cost >= covariance_cost:
        return frechet_distance(*mean_and_covariance(real_ND), *mean_and_covariance(synthetic_MD))
    a_ND = real_ND - real_ND.mean(axis=0)
    b_MD = synthetic_MD - synthetic_MD.mean(axis=0)
    trace_sqrt = float(np.linalg.svd(a_ND @ b_MD.T, compute_uv=False).sum()) / math.sqrt((n - 1) * (m - 1))
    mean_term = float(np.sum((real_ND.mean(axis=0) - synthetic_MD.mean(axis=0)) ** 2))
    traces = float(np.sum(a_ND ** 2)) / (n - 1) + float(np.sum(b_MD ** 2)) / (m - 1)
    return max(mean_term + traces - 2.0 * trace_sqrt, 0.0)


def _as_pair(real_ND: np.ndarray, synthetic_MD: np.ndarray, minimum: int) -> tuple[np.ndarray, np.ndarray]:
    real_ND = np.asarray(real_ND, dtype=np.float64)
    synthetic_MD = np.asarray(synthetic_MD, dtype=np.float64)
    if real_ND.ndim != 2 or synthetic_MD.ndim != 2 or real_ND.shape[1] != synthetic_MD.shape[1]:
        raise ConfigError("features", f"shapes {real_ND.shape} and {synthetic_MD.shape}; expected (N, D) and (M, D)")
    if min(real_ND.shape[0], synthetic_MD.shape[0]) < minimum:
        raise ConfigError("features", f"{real_ND.shape[0]} and {synthetic_MD.shape[0]} rows; expected >= {minimum} each")
    return real_ND, synthetic_MD


# ---------------------------------------------------------------------------------------------- kernel MMD


def polynomial_kernel(x_ND: np.ndarray, y_MD: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """(N, M) KID kernel ``(xᵀy / D + coef0)^degree``."""
    return (x_ND @ y_MD.T / x_ND.shape[1] + coef0) ** degree


def rbf_kernel(x_ND: np.ndarray, y_MD: np.ndarray, sigma: float) -> np.ndarray:
    """(N, M) Gaussian kernel ``exp(-‖x - y‖² / (2σ²))``."""
    return np.exp(-squared_distances(x_ND, y_MD) / (2.0 * sigma * sigma))


def squared_distances(x_ND: np.ndarray, y_MD: np.ndarray) -> np.ndarray:
    """(N, M) squared Euclidean distances (clipped at 0 against cancellation)."""
    x_sq_N = np.einsum("nd,nd->n", x_ND, x_ND)
    y_sq_M = np.einsum("md,md->m", y_MD, y_MD)
    return np.clip(x_sq_N[:, None] + y_sq_M[None, :] - 2.0 * (x_ND @ y_MD.T), 0.0, None)


def mmd2(k_xx_NN: np.ndarray, k_yy_MM: np.ndarray, k_xy_NM: np.ndarray, origin_x_N: np.ndarray | None = None,
         origin_y_M: np.ndarray | None = None, unbiased: bool = True) -> float:
    """MMD² from kernel matrices: mean k(x, x') + mean k(y, y') - 2 mean k(x, y).

    ``unbiased``: the within-set means leave out pairs of one row with itself (and, for bootstrap draws,
    with another copy of itself: rows with equal ``origin``). Otherwise every pair counts (V-statistic).
    """
    if not unbiased:
        return float(k_xx_NN.mean() + k_yy_MM.mean() - 2.0 * k_xy_NM.mean())
    return _distinct_pair_mean(k_xx_NN, origin_x_N) + _distinct_pair_mean(k_yy_MM, origin_y_M) - 2.0 * float(k_xy_NM.mean())


def _distinct_pair_mean(k_NN: np.ndarray, origin_N: np.ndarray | None) -> float:
    origin_N = np.arange(k_NN.shape[0]) if origin_N is None else np.asarray(origin_N)
    distinct_NN = origin_N[:, None] != origin_N[None, :]
    count = int(distinct_NN.sum())
    return float(k_NN[distinct_NN].sum() / count) if count else float("nan")


@dataclass(frozen=True)
class KidResult:
    """KID: ``mean`` and ``std`` of the unbiased MMD² over ``values`` (one per subset) of ``subset_size`` rows."""

    mean: float
    std: float
    values: np.ndarray
    subset_size: int


def kid(real_ND: np.ndarray, synthetic_MD: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> KidResult:
    """KID (module docstring); ``subset_size`` is capped by the smaller set (which needs >= 2 rows)."""
    real_ND, synthetic_MD = _as_pair(real_ND, synthetic_MD, minimum=2)
    size = min(subset_size, real_ND.shape[0], synthetic_MD.shape[0])
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for s in range(subsets):
        x_ND = real_ND[rng.choice(real_ND.shape[0], size, replace=False)]
        y_ND = synthetic_MD[rng.choice(synthetic_MD.shape[0], size, replace=False)]
        values[s] = mmd2(polynomial_kernel(x_ND, x_ND), polynomial_kernel(y_ND, y_ND), polynomial_kernel(x_ND, y_ND))
    return KidResult(float(values.mean()), float(values.std()), values, size)


def l2_normalize(features_ND: np.ndarray) -> np.ndarray:
    """Rows scaled to unit Euclidean norm (zero rows stay zero)."""
    norms_N = np.linalg.norm(features_ND, axis=1, keepdims=True)
    return features_ND / np.where(norms_N > 0, norms_N, 1.0)


def cmmd(real_ND: np.ndarray, synthetic_MD: np.ndarray, sigma: float = 10.0, scale: float = 1000.0,
         normalize: bool = True, unbiased: bool = True) -> float:
    """CMMD (module docstring): ``scale`` · MMD² with an RBF kernel of width ``sigma``, on L2-normalised
    rows when ``normalize``."""
    real_ND, synthetic_MD = _as_pair(real_ND, synthetic_MD, minimum=2)
    if normalize:
        real_ND, synthetic_MD = l2_normalize(real_ND), l2_normalize(synthetic_MD)
    value = mmd2(rbf_kernel(real_ND, real_ND, sigma), rbf_kernel(synthetic_MD, synthetic_MD, sigma),
                 rbf_kernel(real_ND, synthetic_MD, sigma), unbiased=unbiased)
    return scale * value


# ---------------------------------------------------------------------------------------------- k-NN metrics


def knn_radii(distances_NN: np.ndarray, k: int, origin_N: np.ndarray | None = None) -> np.ndarray:
    """(N,) distance of each row to its k-th nearest neighbour in the same set, itself (and rows of
    equal ``origin``) excluded; inf when fewer than k others exist."""
    origin_N = np.arange(distances_NN.shape[0]) if origin_N is None else np.asarray(origin_N)
    masked_NN = np.where(origin_N[:, None] == origin_N[None, :], np.inf, distances_NN)
    if masked_NN.shape[1] < k:
        return np.full(masked_NN.shape[0], np.inf)
    return np.partition(masked_NN, k - 1, axis=1)[:, k - 1]


def prdc_from_distances(real_real_NN: np.ndarray, synthetic_synthetic_MM: np.ndarray, real_synthetic_NM: np.ndarray,
                        k: int = 5, origin_real_N: np.ndarray | None = None,
                        origin_synthetic_M: np.ndarray | None = None) -> dict[str, float]:
    """Precision, recall, density and coverage from Euclidean distance matrices (module docstring)."""
    real_radii_N = knn_radii(real_real_NN, k, origin_real_N)
    synthetic_radii_M = knn_radii(synthetic_synthetic_MM, k, origin_synthetic_M)
    inside_real_NM = real_synthetic_NM < real_radii_N[:, None]
    return {
        "precision": float(inside_real_NM.any(axis=0).mean()),
        "recall": float((real_synthetic_NM < synthetic_radii_M[None, :]).any(axis=1).mean()),
        "density": float(inside_real_NM.sum(axis=0).mean() / k),
        "coverage": float((real_synthetic_NM.min(axis=1) < real_radii_N).mean()),
    }


def prdc(real_ND: np.ndarray, synthetic_MD: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density, coverage of two feature sets (each needs more than k rows)."""
    real_ND, synthetic_MD = _as_pair(real_ND, synthetic_MD, minimum=k + 1)
    return prdc_from_distances(np.sqrt(squared_distances(real_ND, real_ND)),
                               np.sqrt(squared_distances(synthetic_MD, synthetic_MD)),
                               np.sqrt(squared_distances(real_ND, synthetic_MD)), k)


# ---------------------------------------------------------------------------------------------- efficiency, CIs, floor


def medvar_efficiency(quality: float, seconds_per_image: float, gamma: float = 1.0) -> float:
    """MedVAR's efficiency score ``Q · (ln(1 + P))^γ``: ``Q`` a lower-is-better quality figure (e.g. FID,
    in its own units), ``P`` wall-clock seconds per generated image, ``ln`` the natural log; lower is better."""
    if seconds_per_image < 0 or not math.isfinite(seconds_per_image):
        raise ConfigError("seconds_per_image", f"is {seconds_per_image}; expected a finite number >= 0")
    return float(quality) * math.log1p(seconds_per_image) ** gamma


Statistic = Callable[[np.ndarray, np.ndarray], dict[str, float]]


def bootstrap(statistic: Statistic, n_real: int, n_synthetic: int, resamples: int, level: float = 0.95,
              seed: int = 0, centre: dict[str, float | None] | None = None) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap: ``statistic(real_rows, synthetic_rows)`` on ``resamples`` draws with replacement
    (index arrays into the two sets); returns {name: (low, high)} at ``level`` (NaN draws are dropped).

    ``centre``: {name: estimate} for statistics that a bootstrap draw biases (FID grows when rows repeat,
    as it grows for smaller samples): their draws are shifted so that their median is the estimate, then
    clipped at 0, which keeps the interval's width and puts it around the number reported.
    """
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(resamples):
        real_rows = rng.integers(0, n_real, n_real)
        synthetic_rows = rng.integers(0, n_synthetic, n_synthetic)
        for name, value in statistic(real_rows, synthetic_rows).items():
            draws.setdefault(name, []).append(value)
    tail = 100.0 * (1.0 - level) / 2.0
    intervals = {}
    for name, values in draws.items():
        finite = np.asarray(values, dtype=np.float64)
        finite = finite[np.isfinite(finite)]
        estimate = (centre or {}).get(name)
        if finite.size and estimate is not None:
            finite = np.clip(finite - np.median(finite) + estimate, 0.0, None)
        if finite.size:
            intervals[name] = (float(np.percentile(finite, tail)), float(np.percentile(finite, 100.0 - tail)))
    return intervals


def floor_split(n_real: int, n_synthetic: int, seed: int = 0, minimum: int = 2) -> tuple[np.ndarray, np.ndarray] | None:
    """Two disjoint random row sets of the real set, each of size min(n_synthetic, n_real // 2); None when
    that is below ``minimum``."""
    size = min(n_synthetic, n_real // 2)
    if size < minimum:
        return None
    order = np.random.default_rng(seed).permutation(n_real)
    return np.sort(order[:size]), np.sort(order[size:2 * size])


# ---------------------------------------------------------------------------------------------- the suite


def point_metrics(real_ND: np.ndarray, synthetic_MD: np.ndarray, config: MetricConfig) -> dict[str, float | None]:
    """Every metric of :data:`DISTRIBUTION_METRICS` (None where a set is too small), plus ``kid_std``."""
    return _point_metrics(real_ND, synthetic_MD, config)[0]


def _point_metrics(real_ND: np.ndarray, synthetic_MD: np.ndarray, config: MetricConfig
                   ) -> tuple[dict[str, float | None], KidResult | None]:
    n = min(real_ND.shape[0], synthetic_MD.shape[0])
    result: dict[str, float | None] = dict.fromkeys([*DISTRIBUTION_METRICS, "kid_std"])
    if n < 2:
        return result, None
    result["fid"] = fid(real_ND, synthetic_MD)  # all rows: FID's cost grows only linearly with them
    real_ND, synthetic_MD = _cap_rows(real_ND, config), _cap_rows(synthetic_MD, config)
    kid_result = kid(real_ND, synthetic_MD, config.kid_subsets, config.kid_subset_size, config.seed)
    result["kid"], result["kid_std"] = kid_result.mean, kid_result.std
    result["cmmd"] = cmmd(real_ND, synthetic_MD, config.cmmd_sigma, config.cmmd_scale)
    if n > config.k:
        result.update(prdc(real_ND, synthetic_MD, config.k))
    return result, kid_result


def _cap_rows(features_ND: np.ndarray, config: MetricConfig) -> np.ndarray:
    features_ND = np.asarray(features_ND, dtype=np.float64)
    if features_ND.shape[0] <= config.max_pairwise:
        return features_ND
    log.info("using %d of %d rows for the pairwise metrics (max_pairwise)", config.max_pairwise, features_ND.shape[0])
    rows = np.random.default_rng(config.seed).choice(features_ND.shape[0], config.max_pairwise, replace=False)
    return features_ND[np.sort(rows)]


def bootstrap_statistic(real_ND: np.ndarray, synthetic_MD: np.ndarray, config: MetricConfig) -> Statistic:
    """FID, CMMD and (with more than k rows) precision/recall/density/coverage of one bootstrap draw, from
    distance and kernel matrices computed once."""
    real_ND, synthetic_MD = _cap_rows(real_ND, config), _cap_rows(synthetic_MD, config)
    squared = [squared_distances(real_ND, real_ND), squared_distances(synthetic_MD, synthetic_MD),
               squared_distances(real_ND, synthetic_MD)]
    unit_real, unit_synthetic = l2_normalize(real_ND), l2_normalize(synthetic_MD)
    gamma = 1.0 / (2.0 * config.cmmd_sigma ** 2)
    kernels = [np.exp(-gamma * squared_distances(a, b)) for a, b in
               ((unit_real, unit_real), (unit_synthetic, unit_synthetic), (unit_real, unit_synthetic))]
    distances = [np.sqrt(matrix) for matrix in squared]
    with_knn = min(real_ND.shape[0], synthetic_MD.shape[0]) > config.k

    def statistic(real_rows: np.ndarray, synthetic_rows: np.ndarray) -> dict[str, float]:
        pick = [np.ix_(real_rows, real_rows), np.ix_(synthetic_rows, synthetic_rows), np.ix_(real_rows, synthetic_rows)]
        values = {"fid": fid(real_ND[real_rows], synthetic_MD[synthetic_rows]),
                  "cmmd": config.cmmd_scale * mmd2(*(kernel[p] for kernel, p in zip(kernels, pick)),
                                                   real_rows, synthetic_rows)}
        if with_knn:
            values.update(prdc_from_distances(*(matrix[p] for matrix, p in zip(distances, pick)), config.k,
                                              real_rows, synthetic_rows))
        return values

    return statistic


def compare_features(real_ND: np.ndarray, synthetic_MD: np.ndarray, config: MetricConfig | None = None) -> dict[str, Any]:
    """All metrics of a synthetic set against a real one, each with its interval and real-vs-real floor.

    Returns ``{"n_real", "n_synthetic", "floor_n", <metric>: {"value", "ci": [low, high] | None,
    "floor": value | None, "matched": value | None}}`` for every metric of :data:`DISTRIBUTION_METRICS`; KID adds ``"std"`` and its
    ``ci`` is the central ``level`` range of the subset values (KID is itself an average over subsets).
    """
    config = config or MetricConfig()
    real_ND = np.asarray(real_ND, dtype=np.float64)
    synthetic_MD = np.asarray(synthetic_MD, dtype=np.float64)
    values, kid_result = _point_metrics(real_ND, synthetic_MD, config)
    intervals = _intervals(real_ND, synthetic_MD, config, values["fid"]) if kid_result is not None else {}
    if kid_result is not None:
        tail = 100.0 * (1.0 - config.level) / 2.0
        intervals["kid"] = (float(np.percentile(kid_result.values, tail)),
                            float(np.percentile(kid_result.values, 100.0 - tail)))
    floors, matched, floor_n = _floor_and_matched(real_ND, synthetic_MD, config)
    result: dict[str, Any] = {"n_real": int(real_ND.shape[0]), "n_synthetic": int(synthetic_MD.shape[0]),
                              "floor_n": floor_n}
    for name in DISTRIBUTION_METRICS:
        interval = intervals.get(name)
        result[name] = {"value": values[name], "ci": list(interval) if interval else None, "floor": floors[name],
                        "matched": matched[name]}
    result["kid"]["std"] = values["kid_std"]
    return result


def _floor_and_matched(real_ND: np.ndarray, synthetic_MD: np.ndarray, config: MetricConfig
                       ) -> tuple[dict[str, float | None], dict[str, float | None], int]:
    """The real-vs-real floor (real subset A against the disjoint real subset B) and the matched figure
    (A against a random synthetic subset of the same size), both at size ``floor_n``."""
    split = floor_split(real_ND.shape[0], synthetic_MD.shape[0], config.seed)
    if split is None:
        empty = dict.fromkeys([*DISTRIBUTION_METRICS, "kid_std"])
        return empty, dict(empty), 0
    first, second = split
    synthetic_rows = np.sort(np.random.default_rng(config.seed + 1).choice(synthetic_MD.shape[0], first.size, replace=False))
    floors = point_metrics(real_ND[first], real_ND[second], config)
    matched = point_metrics(real_ND[first], synthetic_MD[synthetic_rows], config)
    return floors, matched, int(first.size)


def _intervals(real_ND: np.ndarray, synthetic_MD: np.ndarray, config: MetricConfig,
               fid_value: float) -> dict[str, tuple[float, float]]:
    """Bootstrap intervals of FID, CMMD and the k-NN metrics (none with ``config.bootstrap`` 0)."""
    if config.bootstrap == 0:
        return {}
    statistic = bootstrap_statistic(real_ND, synthetic_MD, config)
    intervals = bootstrap(statistic, min(real_ND.shape[0], config.max_pairwise),
                          min(synthetic_MD.shape[0], config.max_pairwise), config.bootstrap, config.level, config.seed,
                          centre={"fid": fid_value})
    return intervals


__all__ = [
    "DISTRIBUTION_METRICS",
    "LOWER_IS_BETTER",
    "KidResult",
    "MetricConfig",
    "bootstrap",
    "bootstrap_statistic",
    "cmmd",
    "compare_features",
    "fid",
    "floor_split",
    "frechet_distance",
    "kid",
    "knn_radii",
    "l2_normalize",
    "mean_and_covariance",
    "medvar_efficiency",
    "mmd2",
    "point_metrics",
    "polynomial_kernel",
    "prdc",
    "prdc_from_distances",
    "rbf_kernel",
    "squared_distances",
]
