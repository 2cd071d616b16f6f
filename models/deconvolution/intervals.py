"""90 % intervals for every proportion, calibrated on simulated bulks with known truth.

Split conformal prediction (Vovk et al. 2005; Lei et al. 2018): TAPE predicts ``n`` extra
bulks simulated from the reference with another seed, whose proportions are known. For each
cell type the interval half-width is the ``ceil((n + 1) * level) / n`` quantile of the absolute
errors there, so an exchangeable new bulk's interval covers its truth with probability at least
``level``. Pseudo-bulks of the reference's own platform are close to exchangeable with those
bulks (measured coverage in the README); a real bulk from another platform is not, and its
intervals then say how uncertain TAPE is *within* the reference's platform only.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

LEVEL = 0.9  # the intervals' nominal coverage


def conformal_halfwidth(pred: pd.DataFrame, truth: pd.DataFrame, level: float = LEVEL,
                        scale: pd.DataFrame | None = None) -> pd.Series:
    """Per-type half-width: the finite-sample conformal quantile of |pred - truth| over samples.

    pred, truth: samples x cell types (same index and columns). Returns a Series over types.
    scale (samples x types, > 0; e.g. :func:`ensemble_scale`): normalised conformal prediction,
    the quantile of |pred - truth| / scale, a multiplier for :func:`intervals`' ``scale``.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    errors = (pred - truth.loc[pred.index, pred.columns]).abs()
    if scale is not None:
        errors = errors / scale.loc[pred.index, pred.columns]
    errors = errors.to_numpy()
    n = len(errors)
    rank = min(math.ceil((n + 1) * level), n)  # the conformal order statistic (1-based)
    return pd.Series(np.sort(errors, axis=0)[rank - 1], index=pred.columns)


def ensemble_scale(members: list[pd.DataFrame], floor: float) -> pd.DataFrame:
    """Per (sample, type) spread of an ensemble's proportions: their sd over members + ``floor``."""
    stacked = np.stack([m.to_numpy(np.float64) for m in members])
    return pd.DataFrame(stacked.std(axis=0, ddof=1 if len(members) > 1 else 0) + floor,
                        index=members[0].index, columns=members[0].columns)


def intervals(pred: pd.DataFrame, halfwidth: pd.Series,
              scale: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(lower, upper) = pred -/+ the type's half-width (times ``scale``, if given), clipped to [0, 1];
    both contain pred."""
    width = halfwidth.reindex(pred.columns).to_numpy()[None, :]
    if scale is not None:
        width = width * scale.loc[pred.index, pred.columns].to_numpy()
    lower = (pred - width).clip(lower=0.0)
    upper = (pred + width).clip(upper=1.0)
    return lower, upper


def coverage(lower: pd.DataFrame, upper: pd.DataFrame, truth: pd.DataFrame) -> float:
    """Share of (sample, type) pairs whose truth lies in [lower, upper] (pairs of lower's frame)."""
    t = truth.loc[lower.index, lower.columns].to_numpy()
    return float(((t >= lower.to_numpy() - 1e-12) & (t <= upper.to_numpy() + 1e-12)).mean())
