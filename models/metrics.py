"""Agreement between predicted and true cell-type proportions (pure functions, no files).

``proportion_metrics(pred, truth)`` gives MAE, RMSE, Pearson r and Lin's concordance
correlation coefficient (CCC) over all (sample, cell type) entries, and the same per sample
(across that sample's cell types). Stage 4 writes it as ``deconvolution/metrics.csv``; stage 5
uses the ``overall`` row's MAE for its generated proportions.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

OVERALL = "overall"
COLUMNS = ["n", "mae", "rmse", "pearson_r", "ccc"]


def pearson_r(pred: np.ndarray, truth: np.ndarray) -> float:
    """Pearson correlation of two flat arrays; NaN when either is constant (undefined)."""
    pred, truth = np.asarray(pred, np.float64).ravel(), np.asarray(truth, np.float64).ravel()
    dp, dt = pred - pred.mean(), truth - truth.mean()
    denom = np.sqrt((dp * dp).sum() * (dt * dt).sum())
    return float((dp * dt).sum() / denom) if denom > 0 else float("nan")


def lin_ccc(pred: np.ndarray, truth: np.ndarray) -> float:
    """Lin's concordance correlation coefficient, 2 cov / (var_p + var_t + (mean_p - mean_t)^2).

    Population (1/n) moments, as Lin (1989) and TAPE's ``CCCscore``. Unlike r it drops when
    predictions are biased or scaled; it is 1 only for pred == truth. NaN if both are constant
    and equal (0/0).
    """
    pred, truth = np.asarray(pred, np.float64).ravel(), np.asarray(truth, np.float64).ravel()
    mp, mt = pred.mean(), truth.mean()
    cov = ((pred - mp) * (truth - mt)).mean()
    denom = pred.var() + truth.var() + (mp - mt) ** 2
    return float(2.0 * cov / denom) if denom > 0 else float("nan")


def _scores(pred: np.ndarray, truth: np.ndarray) -> list[float]:
    err = pred - truth
    return [float(pred.size), float(np.abs(err).mean()), float(np.sqrt((err * err).mean())),
            pearson_r(pred, truth), lin_ccc(pred, truth)]


def align_proportions(pred: pd.DataFrame, truth: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both frames over the shared samples (truth's order) and truth's cell types.

    Raises ValueError when a truth cell type is missing from ``pred`` or no sample is shared,
    since a silent partial comparison would report a misleadingly good score.
    """
    missing = [c for c in truth.columns if c not in pred.columns]
    if missing:
        raise ValueError(f"predicted proportions lack cell types {missing[:5]} present in the truth")
    samples = [s for s in truth.index if s in pred.index]
    if not samples:
        raise ValueError("predicted and true proportions share no sample names "
                         f"(pred: {list(pred.index[:3])}..., truth: {list(truth.index[:3])}...)")
    return (pred.loc[samples, truth.columns].astype(np.float64),
            truth.loc[samples, truth.columns].astype(np.float64))


def proportion_metrics(pred: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Metrics table: row ``"overall"`` then one row per sample; columns n, mae, rmse, pearson_r, ccc.

    pred, truth: samples x cell types (names must match; extra predicted types are ignored).
    ``overall`` pools every (sample, type) entry, as the original bulk2sc MAE and TAPE's
    ``L1error``/``CCCscore(mode="all")`` do.
    """
    pred, truth = align_proportions(pred, truth)
    p, t = pred.to_numpy(), truth.to_numpy()
    rows = {OVERALL: _scores(p, t)}
    for i, sample in enumerate(pred.index):
        rows[str(sample)] = _scores(p[i], t[i])
    table = pd.DataFrame.from_dict(rows, orient="index", columns=COLUMNS)
    table["n"] = table["n"].astype(int)
    table.index.name = "sample"
    return table


def per_type_metrics(pred: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """The same scores per cell type (across samples): which types the deconvolution gets wrong."""
    pred, truth = align_proportions(pred, truth)
    table = pd.DataFrame.from_dict(
        {str(c): _scores(pred[c].to_numpy(), truth[c].to_numpy()) for c in truth.columns},
        orient="index", columns=COLUMNS)
    table["n"] = table["n"].astype(int)
    table.index.name = "cell_type"
    return table
