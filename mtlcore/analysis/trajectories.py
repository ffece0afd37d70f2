"""Comparing trajectories (the paper's §3, §4 and Appendix B.4): loss bins, one number per trajectory,
Δ with its ±2 std significance, %Δ, correlations.

A trajectory is a 1-D sequence of values along `epoch`, paired with the training loss at each
checkpoint. NaN marks an unmeasured checkpoint and is skipped everywhere: a summary of a trajectory
uses its measured checkpoints only, and is NaN when there are none. The summaries and binning
functions also accept xarray DataArrays: they then act along `dim` ("epoch") and keep every other
dimension (run, task, ...).
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import xarray as xr
from scipy import stats

logger = logging.getLogger(__name__)


def _along(func: Callable, *arrays, dim: str = "epoch", output_dim: str | None = None, **kwargs):
    """func on 1-D numpy arrays; for DataArrays, the same along `dim` for every other coordinate."""
    if isinstance(arrays[0], xr.DataArray):
        return xr.apply_ufunc(
            func,
            *arrays,
            input_core_dims=[[dim]] * len(arrays),
            output_core_dims=[[output_dim]] if output_dim else [[]],
            vectorize=True,
            kwargs=kwargs,
        )
    return func(*(np.asarray(a, dtype=float) for a in arrays), **kwargs)


# --- loss bins --------------------------------------------------------------------------------


def loss_bins(losses, n_bins: int = 20) -> np.ndarray:
    """n_bins + 1 increasing, geometrically spaced edges from the smallest to the largest loss.

    `losses` may hold several trajectories (any shape): the bins then span all of them. NaN and
    non-positive losses (no place on a log axis) are left out of the range.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    values = np.asarray(losses, dtype=float).ravel()
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size == 0:
        raise ValueError(f"no positive finite loss among {values.size} values; geometric bins need one")
    ignored = np.count_nonzero(~np.isnan(values)) - positive.size
    if ignored:
        logger.warning("loss bins ignore %d non-positive or infinite losses", ignored)
    edges = np.geomspace(positive.min(), positive.max(), n_bins + 1)
    edges[0], edges[-1] = positive.min(), positive.max()  # exact ends, so the extreme points fall in a bin
    return edges


def _bin_means(loss: np.ndarray, values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    edges = np.asarray(edges, dtype=float)
    # Bin i holds edges[i] ≤ loss < edges[i + 1]; the last bin also holds loss = edges[-1].
    index = np.searchsorted(edges, loss, side="right") - 1
    index[loss == edges[-1]] = len(edges) - 2
    inside = (index >= 0) & (index < len(edges) - 1) & ~np.isnan(loss) & ~np.isnan(values)
    sums = np.bincount(index[inside], weights=values[inside], minlength=len(edges) - 1)
    counts = np.bincount(index[inside], minlength=len(edges) - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def bin_trajectory(loss, values, edges, *, dim: str = "epoch"):
    """Mean of the measured `values` whose training loss falls in each bin (NaN for an empty bin).

    Returns len(edges) − 1 means, bin 0 the lowest loss; for DataArrays a new dim `loss_bin`.
    """
    output_dim = "loss_bin" if isinstance(loss, xr.DataArray) else None
    return _along(_bin_means, loss, values, dim=dim, output_dim=output_dim, edges=edges)


def band_mean(loss, values, band: tuple[float, float], *, dim: str = "epoch"):
    """Mean of the measured `values` whose training loss lies in [band[0], band[1]]."""
    return _along(lambda l, v: _bin_means(l, v, np.asarray(band, dtype=float))[0], loss, values, dim=dim)


def early_phase_band(losses, n_bins: int = 20, skip_highest: int = 2, width: int = 4) -> tuple[float, float]:
    """Loss interval of the early phase (FIM explosion), from `n_bins` geometric bins over `losses`.

    Rule: count bins from the highest loss down, skip the `skip_highest` highest-loss bins (the first,
    abnormally high-loss checkpoints) and take the next `width` bins. The paper's bin numbers were lost;
    the defaults put the band about 0.1–0.8 for a trajectory going from ln 10 ≈ 2.3 to 1e-4.
    Pass one trajectory's losses, or several concatenated to compare them in a common band.
    """
    if skip_highest < 0 or width < 1 or skip_highest + width > n_bins:
        raise ValueError(f"need 0 ≤ skip_highest and 1 ≤ width with skip_highest + width ≤ n_bins, got "
                         f"skip_highest={skip_highest}, width={width}, n_bins={n_bins}")
    edges = loss_bins(losses, n_bins)
    return float(edges[n_bins - skip_highest - width]), float(edges[n_bins - skip_highest])


def end_of_training_band(trajectory_losses: Sequence | xr.DataArray, n_bins: int = 20, width: int = 3, *,
                         dim: str = "epoch") -> tuple[float, float]:
    """Loss interval of the end of training, set by the trajectory with the highest minimum loss.

    That trajectory's loss range is split into `n_bins` geometric bins and its `width` lowest-loss bins
    form the band, so every trajectory compared is measured at losses the worst-converged one reaches.
    `trajectory_losses`: a sequence of trajectories, or a DataArray whose trajectories run along `dim`.
    """
    if not 1 <= width <= n_bins:
        raise ValueError(f"width must lie in [1, n_bins={n_bins}], got {width}")
    if isinstance(trajectory_losses, xr.DataArray):
        trajectory_losses = list(trajectory_losses.transpose(..., dim).values.reshape(-1, trajectory_losses.sizes[dim]))
    positive = [np.asarray(t, dtype=float) for t in trajectory_losses]
    minima = [t[t > 0].min() if (t > 0).any() else np.nan for t in positive]  # NaN > 0 is False
    if not minima or np.all(np.isnan(minima)):
        raise ValueError("no trajectory has a positive measured loss; pass training-loss trajectories")
    edges = loss_bins(trajectory_losses[int(np.nanargmax(minima))], n_bins)
    return float(edges[0]), float(edges[width])


# --- one number per trajectory -----------------------------------------------------------------


def _best_validation_mean(val: np.ndarray, test: np.ndarray, k: int, higher_is_better: bool) -> float:
    measured = ~np.isnan(val) & ~np.isnan(test)
    if not measured.any():
        return float("nan")
    val, test = val[measured], test[measured]
    order = np.argsort(-val if higher_is_better else val, kind="stable")  # ties: the earlier checkpoint
    return float(test[order[:k]].mean())


def best_validation_mean(val, test, k: int = 10, *, higher_is_better=True, dim: str = "epoch"):
    """Mean test score at the k checkpoints with the best validation score (fewer if fewer are measured).

    higher_is_better: the score's direction (the best validation score is the largest or the smallest);
    for DataArrays it may also be a DataArray (e.g. one value per `task`) broadcast against the others.
    """
    _check_count(k)
    if isinstance(higher_is_better, xr.DataArray):
        if not isinstance(val, xr.DataArray):
            raise TypeError("a DataArray higher_is_better needs DataArray val and test scores")
        return xr.apply_ufunc(
            lambda v, t, h: _best_validation_mean(v, t, k, bool(h)),
            val, test, higher_is_better.astype(bool),
            input_core_dims=[[dim], [dim], []],
            vectorize=True,
        )
    return _along(_best_validation_mean, val, test, dim=dim, k=k, higher_is_better=bool(higher_is_better))


def _measured(values: np.ndarray) -> np.ndarray:
    return values[~np.isnan(values)]


def _check_count(k) -> None:
    # values[-0:] is all of them and values[-(-1):] drops the first: a bad k would pass silently
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int (how many checkpoints), got {k!r}")


def _mean_of_last(values: np.ndarray, k: int) -> float:
    return float(values[-k:].mean()) if values.size else float("nan")


def last_mean(values, k: int = 20, *, dim: str = "epoch"):
    """Mean of the last k measured values (sharpness and coherence near convergence)."""
    _check_count(k)
    return _along(lambda v: _mean_of_last(_measured(v), k), values, dim=dim)


def top_mean(values, k: int = 20, *, dim: str = "epoch"):
    """Mean of the k largest measured values (the FIM explosion)."""
    _check_count(k)
    return _along(lambda v: _mean_of_last(np.sort(_measured(v)), k), values, dim=dim)



# --- reading trajectories at a training loss ----------------------------------------------------------


def value_at_loss(loss: np.ndarray, values: np.ndarray, level: float) -> float:
    """`values` where the trajectory's `loss` first falls to `level` (linear in log loss between epochs).

    NaN when the trajectory never reaches `level`; the first measured value when it starts below it.
    """
    loss, values = np.asarray(loss, dtype=float), np.asarray(values, dtype=float)
    ok = np.isfinite(loss) & np.isfinite(values) & (loss > 0)
    loss, values = loss[ok], values[ok]
    below = np.nonzero(loss <= level)[0]
    if len(below) == 0:
        return float("nan")
    i = below[0]
    if i == 0:
        return float(values[0])
    a, b = np.log(loss[i - 1]), np.log(loss[i])
    t = (a - np.log(level)) / (a - b)
    return float(values[i - 1] + t * (values[i] - values[i - 1]))


def common_loss_levels(loss: np.ndarray, n_levels: int) -> np.ndarray:
    """`n_levels` geometric levels strictly inside the loss range that every trajectory (row) covers,
    from the highest down; empty when the trajectories share no range."""
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row: no common range
        high = np.nanmin(np.nanmax(loss, axis=1))
        low = np.nanmax(np.nanmin(loss, axis=1))
    if not (np.isfinite(high) and np.isfinite(low)) or low >= high or low <= 0:
        return np.array([])
    return np.geomspace(high, low, n_levels + 2)[1:-1]

# --- comparing trajectories ----------------------------------------------------------------------


class Delta(NamedTuple):
    delta: float  # mean over seeds of MTL − mean of STL
    mtl_mean: float
    stl_mean: float
    mtl_std: float
    stl_std: float
    significant: bool  # the intervals mean ± 2 std do not overlap


def delta(mtl_values_per_seed, stl_values_per_seed, *, ddof: int = 1) -> Delta:
    """Δ = mean(MTL) − mean(STL) over seeds (the paper's Table 1, §4.1), NaN seeds left out.

    Standard deviations are the sample ones (ddof=1), so a single seed gives NaN and never counts as
    significant.
    """
    mtl, stl = (_measured(np.asarray(v, dtype=float).ravel()) for v in (mtl_values_per_seed, stl_values_per_seed))

    def mean_and_std(values):
        if values.size == 0:
            return float("nan"), float("nan")
        return float(values.mean()), float(values.std(ddof=ddof)) if values.size > ddof else float("nan")

    (mtl_mean, mtl_std), (stl_mean, stl_std) = mean_and_std(mtl), mean_and_std(stl)
    difference = mtl_mean - stl_mean
    significant = bool(abs(difference) > 2 * (mtl_std + stl_std))  # False when anything is NaN
    return Delta(difference, mtl_mean, stl_mean, mtl_std, stl_std, significant)


def _percent_change(smto: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(uniform != 0, 100.0 * (smto - uniform) / np.abs(uniform), np.nan)


def percent_change(smto, uniform):
    """%Δ = 100 · (SMTO − UMTG)/|UMTG| (the paper's §4.2, Figure 4), elementwise; NaN where UMTG is 0 or unmeasured.

    Numbers give a float, arrays an array, DataArrays a DataArray (matched by coordinate labels in any
    order; NaN where one side lacks a label).
    """
    if isinstance(smto, xr.DataArray) or isinstance(uniform, xr.DataArray):
        return xr.apply_ufunc(_percent_change, smto, uniform, join="outer")
    change = _percent_change(np.asarray(smto, dtype=float), np.asarray(uniform, dtype=float))
    return float(change) if change.ndim == 0 else change


class Correlation(NamedTuple):
    pearson: float
    pearson_p: float
    spearman: float
    spearman_p: float
    n: int  # number of (x, y) pairs with both measured


def correlations(x, y) -> Correlation:
    """Pearson and Spearman correlation (scipy) with two-sided p-values over the pairs where both are measured
    (finite: an inf is an overflow, not a value to rank).

    NaN coefficients when fewer than 3 pairs remain or when either side is constant.
    """
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must pair up, got {x.size} and {y.size} values")
    measured = np.isfinite(x) & np.isfinite(y)
    x, y, n = x[measured], y[measured], int(measured.sum())
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(float("nan"), float("nan"), float("nan"), float("nan"), n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        pearson, spearman = stats.pearsonr(x, y), stats.spearmanr(x, y)
    return Correlation(
        float(pearson.statistic), float(pearson.pvalue), float(spearman.statistic), float(spearman.pvalue), n
    )
