"""How close generated cells are to held-out real cells (pure functions on arrays, no files).

Every function takes cells x genes raw counts (dense or scipy sparse) and per-cell type
labels, and returns numbers. :func:`evaluate` runs them all; stage 5 calls it once for the
GMVAE, once for the NB baseline and once for two halves of the real test set (the
real-vs-real reference), so each number has a floor and a ceiling beside it.

Metrics:
- proportions MAE (``models.metrics.proportion_metrics``) of generated vs real type shares;
- per-type mean r: Pearson r across genes of each type's mean log1p-normalised expression
  (median over types, and each type);
- classifier AUROC: logistic regression on PCA of log-normalised top variable genes, trained
  on one half of real + generated and scored on the other (0.5 = indistinguishable), averaged
  over 3 random halvings scored both ways (one split alone varies by ~0.02); also
  with the squared PCs added (``auroc_quadratic``), which sees differences of spread too;
- MMD (RBF kernel, median-distance bandwidth taken from the real cells) in PCA space;
- KS distance of library size and of per-cell zero fraction;
- correlation r: Pearson r between the gene-gene correlation matrices (upper triangles) of
  the top variable genes of the real cells, pooled and within types (type means removed).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from models.metrics import pearson_r, proportion_metrics

log = logging.getLogger(__name__)

TARGET_SUM = 1e4  # counts per cell after normalisation (scanpy's usual choice)


# ----------------------------------------------------------------------------- transforms
def as_csr(counts) -> sp.csr_matrix:
    """Counts (dense or sparse, cells x genes) as float32 CSR."""
    return sp.csr_matrix(counts, dtype=np.float32)


def library_sizes(counts) -> np.ndarray:
    """Total counts per cell, [n_cells] float64."""
    return np.asarray(as_csr(counts).sum(axis=1), dtype=np.float64).ravel()


def zero_fractions(counts) -> np.ndarray:
    """Share of genes with a zero count, per cell, [n_cells]."""
    counts = as_csr(counts)
    counts.eliminate_zeros()
    return 1.0 - np.diff(counts.indptr) / counts.shape[1]


def log_normalize(counts, target_sum: float = TARGET_SUM) -> sp.csr_matrix:
    """log1p(counts / library size * target_sum), CSR float32 (empty cells stay zero)."""
    counts = as_csr(counts)
    scale = target_sum / np.maximum(library_sizes(counts), 1.0)
    normed = sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ counts)
    normed.data = np.log1p(normed.data)
    return normed


def top_variable_genes(normed, n_top: int) -> np.ndarray:
    """Indices of the ``n_top`` genes with the largest variance (ties: lower index first)."""
    normed = as_csr(normed)
    mean = np.asarray(normed.mean(axis=0)).ravel()
    mean_sq = np.asarray(normed.multiply(normed).mean(axis=0)).ravel()
    variance = mean_sq - mean ** 2
    n_top = min(int(n_top), normed.shape[1])
    return np.sort(np.argsort(-variance, kind="stable")[:n_top])


def dense(matrix) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


# ----------------------------------------------------------------------------- metrics
def type_proportions(cell_types, names: Sequence[str]) -> pd.Series:
    """Share of cells of each type in ``names`` order."""
    counts = pd.Series(list(cell_types), dtype=str).value_counts()
    return (counts.reindex([str(n) for n in names], fill_value=0) / max(len(cell_types), 1)).astype(float)


def proportion_mae(real_types, generated_types, names: Sequence[str]) -> float:
    """MAE between the generated and real type proportions (over all types)."""
    real = type_proportions(real_types, names).to_frame("sample").T
    generated = type_proportions(generated_types, names).to_frame("sample").T
    return float(proportion_metrics(generated, real).loc["overall", "mae"])


def per_type_mean_r(real_normed, real_types, generated_normed, generated_types) -> dict[str, float]:
    """Pearson r across genes of mean log-normalised expression, per type present in both sets."""
    real_types = np.asarray(real_types, dtype=str)
    generated_types = np.asarray(generated_types, dtype=str)
    real_normed, generated_normed = as_csr(real_normed), as_csr(generated_normed)
    result = {}
    for name in pd.unique(real_types):
        real_rows, generated_rows = real_types == name, generated_types == name
        if not generated_rows.any():
            continue
        real_mean = np.asarray(real_normed[real_rows].mean(axis=0)).ravel()
        generated_mean = np.asarray(generated_normed[generated_rows].mean(axis=0)).ravel()
        result[str(name)] = pearson_r(generated_mean, real_mean)
    return result


def ks_distance(first: np.ndarray, second: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (max CDF gap, 0 = same distribution)."""
    return float(stats.ks_2samp(np.asarray(first, np.float64), np.asarray(second, np.float64)).statistic)


def pca_fit_transform(fit_data: np.ndarray, *others: np.ndarray, n_comps: int = 30, seed: int = 0):
    """PCA fitted on ``fit_data`` (centred by its mean); returns the projections of it and ``others``."""
    from sklearn.decomposition import PCA

    n_comps = max(1, min(n_comps, fit_data.shape[0] - 1, fit_data.shape[1]))
    pca = PCA(n_components=n_comps, svd_solver="randomized" if min(fit_data.shape) > 200 else "full",
              random_state=seed)
    projected = pca.fit_transform(fit_data)
    return (projected, *[pca.transform(other) for other in others])


def halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of range(n) into two halves (sorted indices)."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2:])


def _fold_auroc(real_fit, generated_fit, real_score, generated_score, seed: int, n_comps: int,
                quadratic: bool) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    train = np.vstack([real_fit, generated_fit])
    test = np.vstack([real_score, generated_score])
    train_labels = np.r_[np.zeros(len(real_fit)), np.ones(len(generated_fit))]
    test_labels = np.r_[np.zeros(len(real_score)), np.ones(len(generated_score))]
    train_pcs, test_pcs = pca_fit_transform(train, test, n_comps=n_comps, seed=seed)
    if quadratic:
        train_pcs, test_pcs = np.hstack([train_pcs, train_pcs ** 2]), np.hstack([test_pcs, test_pcs ** 2])
    scaler = StandardScaler().fit(train_pcs)
    model = LogisticRegression(max_iter=2000, C=1.0)
    model.fit(scaler.transform(train_pcs), train_labels)
    return float(roc_auc_score(test_labels, model.decision_function(scaler.transform(test_pcs))))


def classifier_auroc(real_features: np.ndarray, generated_features: np.ndarray, seed: int = 0,
                     n_comps: int = 30, quadratic: bool = False, repeats: int = 3) -> float:
    """Real-vs-generated AUROC of a logistic regression trained on one half, scored on the other.

    PCA (``n_comps``) and standardisation are fitted on the training half only. 0.5 means the
    classifier cannot tell the sets apart; 1.0 means it always can. A linear classifier sees
    only shifts of the mean, which an NB fitted by moments matches by construction;
    ``quadratic=True`` adds the squared PCs, so it also sees the spread along each PC.

    One split of ~900 cells per side gives an AUROC with a standard error of about 0.02, as
    large as the differences between generators; so the value is the mean over ``repeats``
    seeded random halvings, each scored both ways (2-fold cross-validation).
    """
    real_features, generated_features = dense(real_features), dense(generated_features)
    scores = []
    for repeat in range(max(1, repeats)):
        # the same split seed for both sets: identical sets put each cell on the same side with
        # both labels -> exactly 0.5
        real_a, real_b = halves(len(real_features), seed + repeat)
        generated_a, generated_b = halves(len(generated_features), seed + repeat)
        for (rf, gf), (rs, gs) in (((real_a, generated_a), (real_b, generated_b)),
                                   ((real_b, generated_b), (real_a, generated_a))):
            scores.append(_fold_auroc(real_features[rf], generated_features[gf], real_features[rs],
                                      generated_features[gs], seed, n_comps, quadratic))
    return float(np.mean(scores))


def rbf_bandwidth(points: np.ndarray, max_points: int = 1000, seed: int = 0) -> float:
    """Median pairwise Euclidean distance (the usual MMD bandwidth heuristic)."""
    points = np.asarray(points, np.float64)
    if len(points) > max_points:
        points = points[np.random.default_rng(seed).choice(len(points), max_points, replace=False)]
    sq = ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1)
    distances = np.sqrt(sq[np.triu_indices(len(points), 1)])
    return float(np.median(distances)) if distances.size else 1.0


def mmd_rbf(first: np.ndarray, second: np.ndarray, bandwidth: float, max_points: int = 2000, seed: int = 0) -> float:
    """Unbiased squared MMD with kernel exp(-|x-y|^2 / (2 bandwidth^2)); ~0 for the same distribution."""
    rng = np.random.default_rng(seed)
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    if len(first) > max_points:
        first = first[rng.choice(len(first), max_points, replace=False)]
    if len(second) > max_points:
        second = second[rng.choice(len(second), max_points, replace=False)]

    def kernel(a, b):
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
        return np.exp(-np.maximum(sq, 0.0) / (2.0 * bandwidth ** 2))

    n, m = len(first), len(second)
    k_xx, k_yy, k_xy = kernel(first, first), kernel(second, second), kernel(first, second)
    return float((k_xx.sum() - np.trace(k_xx)) / (n * (n - 1)) + (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
                 - 2.0 * k_xy.mean())


def gene_correlation(normed_genes: np.ndarray) -> np.ndarray:
    """Gene-gene Pearson correlation [G, G] of a cells x genes block; constant genes give 0."""
    values = dense(normed_genes).astype(np.float64)
    centred = values - values.mean(axis=0)
    norms = np.sqrt((centred ** 2).sum(axis=0))
    safe = np.where(norms > 0, norms, 1.0)
    corr = (centred.T @ centred) / np.outer(safe, safe)
    corr[norms == 0, :] = 0.0
    corr[:, norms == 0] = 0.0
    np.fill_diagonal(corr, 1.0)
    return corr


def within_type_residuals(normed_genes, cell_types) -> np.ndarray:
    """Expression minus its cell type's mean: what is left once type identity is explained."""
    values = dense(normed_genes).astype(np.float64)
    cell_types = np.asarray(cell_types, dtype=str)
    residuals = np.empty_like(values)
    for name in np.unique(cell_types):
        rows = cell_types == name
        residuals[rows] = values[rows] - values[rows].mean(axis=0)
    return residuals


def correlation_similarity(real_corr: np.ndarray, generated_corr: np.ndarray) -> float:
    """Pearson r between the upper triangles of two gene-gene correlation matrices."""
    upper = np.triu_indices(len(real_corr), 1)
    return pearson_r(generated_corr[upper], real_corr[upper])


# ----------------------------------------------------------------------------- all at once
def evaluate(real_counts, real_types, generated_counts, generated_types, cell_types: Sequence[str],
             seed: int = 0, n_top_genes: int = 2000, n_comps: int = 30, n_corr_genes: int = 100,
             max_mmd_cells: int = 2000) -> dict:
    """Every metric of ``generated`` against ``real`` (cells x genes raw counts, same genes).

    Gene selections (top variable genes for PCA and for the correlation matrices) come from
    the real cells. MMD uses a PCA fitted on the real cells and a bandwidth from them, so
    values computed against the same real set are comparable.
    Returns a flat dict of floats plus ``per_type_r`` (type -> r).
    """
    real_counts, generated_counts = as_csr(real_counts), as_csr(generated_counts)
    if real_counts.shape[1] != generated_counts.shape[1]:
        raise ValueError(f"real ({real_counts.shape[1]}) and generated ({generated_counts.shape[1]}) gene counts differ")
    real_normed, generated_normed = log_normalize(real_counts), log_normalize(generated_counts)
    per_type = per_type_mean_r(real_normed, real_types, generated_normed, generated_types)

    hvg = top_variable_genes(real_normed, n_top_genes)
    real_hvg, generated_hvg = dense(real_normed[:, hvg]), dense(generated_normed[:, hvg])
    real_pcs, generated_pcs = pca_fit_transform(real_hvg, generated_hvg, n_comps=n_comps, seed=seed)
    bandwidth = rbf_bandwidth(real_pcs, seed=seed)
    real_first, real_second = halves(len(real_pcs), seed)  # same space and bandwidth: the reference

    corr_genes = top_variable_genes(real_normed, n_corr_genes)
    real_corr = gene_correlation(real_normed[:, corr_genes])
    generated_corr = gene_correlation(generated_normed[:, corr_genes])
    # Pooled correlations are dominated by differences between types; within types they show
    # gene programs (an independent-gene NB has none there).
    real_within = gene_correlation(within_type_residuals(real_normed[:, corr_genes], real_types))
    generated_within = gene_correlation(within_type_residuals(generated_normed[:, corr_genes], generated_types))

    r_values = np.array([v for v in per_type.values() if np.isfinite(v)])
    return {
        "n_real_cells": int(real_counts.shape[0]),
        "n_generated_cells": int(generated_counts.shape[0]),
        "proportion_mae": proportion_mae(real_types, generated_types, cell_types),
        "per_type_mean_r_median": float(np.median(r_values)) if r_values.size else float("nan"),
        "per_type_mean_r_min": float(r_values.min()) if r_values.size else float("nan"),
        "auroc": classifier_auroc(real_hvg, generated_hvg, seed=seed, n_comps=n_comps),
        "auroc_quadratic": classifier_auroc(real_hvg, generated_hvg, seed=seed, n_comps=n_comps, quadratic=True),
        "mmd": mmd_rbf(real_pcs, generated_pcs, bandwidth, max_points=max_mmd_cells, seed=seed),
        "mmd_real_halves": mmd_rbf(real_pcs[real_first], real_pcs[real_second], bandwidth,
                                   max_points=max_mmd_cells, seed=seed),
        "ks_library_size": ks_distance(library_sizes(real_counts), library_sizes(generated_counts)),
        "ks_zero_fraction": ks_distance(zero_fractions(real_counts), zero_fractions(generated_counts)),
        "gene_correlation_r": correlation_similarity(real_corr, generated_corr),
        "gene_correlation_r_within_type": correlation_similarity(real_within, generated_within),
        "mean_library_size_real": float(library_sizes(real_counts).mean()),
        "mean_library_size_generated": float(library_sizes(generated_counts).mean()),
        "per_type_r": per_type,
    }


def real_vs_real(real_counts, real_types, cell_types: Sequence[str], seed: int = 0, **kwargs) -> dict:
    """:func:`evaluate` of one random half of the real cells against the other: the ceiling."""
    first, second = halves(real_counts.shape[0], seed)
    real_types = np.asarray(real_types)
    return evaluate(as_csr(real_counts)[first], real_types[first], as_csr(real_counts)[second], real_types[second],
                    cell_types, seed=seed, **kwargs)
