"""90 % intervals for every proportion, calibrated on simulated bulks with known truth.

Split conformal prediction (Vovk et al. 2005; Lei et al. 2018): TAPE predicts ``n`` extra
bulks simulated from the reference with another seed, whose proportions are known. For each
cell type the interval half-width is the ``ceil((n + 1) * level) / n`` quantile of the absolute
errors there, so an exchangeable new bulk's interval covers its truth with probability at least
``level``. Pseudo-bulks of the reference's own platform are close to exchangeable with those
bulks (measured coverage in the README); a real bulk from another platform is not. For it,
:func:`departure_halfwidth` widens each sample's intervals by what TAPE's errors become when that
sample's reconstruction residual (its departure from the simulated bulks) is added to bulks with
known truth. What the residual cannot show (a platform shift that looks like another
composition) stays outside the intervals.

:func:`departure_scores` asks a narrower question of the same residuals: does a bulk depart, in a few
genes, further than any simulated bulk does? A state change of the cells (a stimulus, a disease) moves
a few hundred genes strongly and the rest not at all; over all genes the residual's rms hardly sees it
(Kang's IFN-beta-stimulated pseudo-bulks: 1.0-1.5x the simulated bulks' median, inside their spread),
but gene by gene, in units of the simulated bulks' own residual, it stands out (README). Stage 5 re-reads
the composition of the bulks that depart so (``CONDITION_COMPOSITION=auto``).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

LEVEL = 0.9  # the intervals' nominal coverage
DEPARTURE_TAIL = 0.01  # departure_scores: the share of genes, those departing most, whose squared z is averaged


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


def departure_halfwidth(forward, calib_x: np.ndarray, calib_truth: pd.DataFrame, bulk_x: np.ndarray,
                        halfwidth: pd.Series, index=None, level: float = LEVEL) -> tuple[pd.DataFrame, dict]:
    """Per-sample half-widths [samples x types] for bulks that depart from the simulated ones.

    The conformal half-width (``halfwidth``, from ``calib_x``'s errors) holds for bulks like the
    simulated ones. A real bulk from another platform departs from them: TAPE's reconstruction
    of it (proportions x its signature) leaves a residual larger than the simulated bulks' (rms
    per sample over genes, against the simulated bulks' median). Each sample's residual, scaled
    to its excess ``sqrt(1 - rms_sim^2 / rms^2)`` (whole, for a bulk that departs in its most departing
    genes beyond every simulated bulk: :func:`departure_scores`), is added to every simulated bulk, whose truth is
    known; the conformal half-width of TAPE's errors on those moved bulks is that sample's, and
    never below ``halfwidth``. A bulk like the simulated ones (no excess) keeps ``halfwidth``.
    The residual shows only the part of the departure that TAPE cannot reconstruct: a shift that
    looks like another composition does not widen anything (measured in the README).

    forward: x [n, genes] (the model's input scale) -> (proportions [n, K], reconstruction [n, genes]);
    calib_truth: the simulated bulks' true proportions (columns = the model's types).
    Returns (half-widths, {"rms": per-sample residual rms, "rms_simulated", "excess": per-sample factor,
    "score", "scores_simulated", "score_simulated_max", "p_value": :func:`departure_scores` and its p-value}).
    """
    calib_x = np.asarray(calib_x, np.float64)
    bulk_x = np.asarray(bulk_x, np.float64)
    _, calib_recon = forward(calib_x)
    _, bulk_recon = forward(bulk_x)
    residual = bulk_x - bulk_recon
    rms = np.sqrt((residual ** 2).mean(axis=1))
    rms_simulated = float(np.sqrt(np.median(((calib_x - calib_recon) ** 2).mean(axis=1))))
    excess = np.sqrt(np.clip(1.0 - rms_simulated ** 2 / np.maximum(rms, 1e-12) ** 2, 0.0, 1.0))
    score, simulated_scores = departure_scores(calib_x - calib_recon, residual)
    # the rms netting takes the departure to be spread over every gene like the noise; a bulk that departs in a
    # few genes beyond every simulated bulk has its residual added whole (Kang stimulated: coverage 0.60 -> 0.72)
    excess = np.where(score > simulated_scores.max(), 1.0, excess)
    floor = halfwidth.reindex(calib_truth.columns).to_numpy()
    widths = np.tile(floor, (len(bulk_x), 1))
    for j in np.flatnonzero(excess > 0):
        moved, _ = forward(calib_x + excess[j] * residual[j][None, :])
        predicted = pd.DataFrame(moved, index=calib_truth.index, columns=calib_truth.columns)
        widths[j] = np.maximum(conformal_halfwidth(predicted, calib_truth, level).to_numpy(), floor)
    frame = pd.DataFrame(widths, index=index, columns=calib_truth.columns)
    return frame, {"rms": rms, "rms_simulated": rms_simulated, "excess": excess, "score": score,
                   "score_simulated_max": float(simulated_scores.max()), "scores_simulated": simulated_scores,
                   "p_value": (1.0 + (simulated_scores[None, :] >= score[:, None]).sum(1)) / (1.0 + len(simulated_scores))}


def departure_scores(calib_residual: np.ndarray, bulk_residual: np.ndarray,
                     tail: float = DEPARTURE_TAIL) -> tuple[np.ndarray, np.ndarray]:
    """How far each bulk departs from the simulated bulks in the genes where it departs most.

    Each gene's residual (bulk - TAPE's reconstruction) is divided by that gene's rms residual over the
    simulated (calibration) bulks; the score is the mean squared ratio over the ``tail`` share of genes
    with the largest ratios (1 %: e.g. 127 of 12,681). A change confined to a few genes, which the rms over
    every gene dilutes, dominates it. Returns (the bulks' scores [n_bulks], the simulated bulks' own
    [n_calib], computed the same way: the null a bulk is compared with; a bulk scoring above all of them
    departs beyond every simulated bulk).
    """
    calib_residual = np.asarray(calib_residual, np.float64)
    scale = np.sqrt((calib_residual ** 2).mean(axis=0)) + 1e-6

    def score(residual):
        z2 = (np.asarray(residual, np.float64) / scale) ** 2
        k = max(1, int(round(tail * z2.shape[1])))
        return -np.sort(-z2, axis=1)[:, :k].mean(axis=1)
    return score(bulk_residual), score(calib_residual)


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


def read_departure(path, alternative: str) -> pd.DataFrame:
    """_4_'s departure.csv (sample index; a bool column ``departs``), or an InputError naming the file, the
    problem and the fix (rerun _4_, or ``alternative``)."""
    from models.utils import InputError

    try:
        departure = pd.read_csv(path, index_col=0)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as err:
        departure, problem = None, f"cannot be read ({err})"
    else:
        problem = ("has no column 'departs'" if "departs" not in departure else
                   "has a 'departs' column that is not True/False" if departure["departs"].dtype != bool else "")
    if departure is None or problem:
        raise InputError(f"{path} {problem}: rerun _4_deconvolve_bulk.py on this bulk to write it again, or set "
                         f"{alternative}")
    return departure
