"""Per-type, per-gene negative-binomial baseline: the simplest generator a GMVAE must beat.

``fit_nb_per_type`` fits NB(mu_kg, theta_kg) to the cells of each type k, gene by gene, either
by moments (fast; the generator baseline) or by maximum likelihood (mu = sample mean, which is
the NB MLE of the mean, and theta by golden-section search of the profile log-likelihood in
log theta). ``nb_nll_per_cell`` scores held-out cells under such a fit.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

MIN_MU = 1e-4  # a gene never seen in a type still gets a tiny mean, so held-out counts stay finite
THETA_RANGE = (1e-3, 1e5)  # search range of theta; var <= mean (Poisson-like) ends at the top
MAX_THETA = THETA_RANGE[1]
_GOLDEN = (5 ** 0.5 - 1) / 2  # golden-section ratio


def _type_rows(partition: np.ndarray, k: int) -> np.ndarray:
    return np.flatnonzero(partition == k)


def _csr(counts) -> sp.csr_matrix:
    return sp.csr_matrix(counts, dtype=np.float64) if not sp.issparse(counts) else counts.tocsr().astype(np.float64)


def fit_nb_per_type(counts, partition, n_types: int, method: str = "moments") -> tuple[np.ndarray, np.ndarray]:
    """(mu [K, G], theta [K, G]) of a per-type, per-gene NB.

    counts: (n_cells, n_genes) scipy sparse or ndarray of raw counts; partition: type code per cell.
    ``method="moments"``: theta = mu^2 / (var - mu) (MAX_THETA where var <= mu).
    ``method="ml"``: maximum likelihood (mu = mean, theta maximising the profile likelihood).
    A type with no cells gets mu = MIN_MU and theta = MAX_THETA.
    """
    if method not in ("moments", "ml"):
        raise ValueError(f"method must be 'moments' or 'ml', got {method!r}")
    counts = _csr(counts)
    partition = np.asarray(partition)
    n_genes = counts.shape[1]
    mu = np.full((n_types, n_genes), MIN_MU)
    theta = np.full((n_types, n_genes), MAX_THETA)
    for k in range(n_types):
        block = counts[_type_rows(partition, k)]
        n_cells = block.shape[0]
        if n_cells == 0:
            continue
        total = np.asarray(block.sum(axis=0)).ravel()
        mean = total / n_cells
        mu[k] = np.maximum(mean, MIN_MU)
        if method == "moments" or n_cells < 2:
            second = np.asarray(block.multiply(block).sum(axis=0)).ravel() / n_cells
            var = (second - mean ** 2) * n_cells / max(n_cells - 1, 1)
            excess = var - mean
            with np.errstate(divide="ignore", invalid="ignore"):
                theta[k] = np.where(excess > 1e-12, mean ** 2 / excess, MAX_THETA)
            theta[k] = np.clip(theta[k], THETA_RANGE[0], MAX_THETA)
        else:
            theta[k] = _ml_theta(block, mu[k], n_cells)
    return mu, theta


def _ml_theta(block: sp.csr_matrix, mu: np.ndarray, n_cells: int, n_iter: int = 60) -> np.ndarray:
    """Per-gene theta maximising sum_i log NB(x_ig; mu_g, theta) (golden section in log theta)."""
    coo = block.tocoo()
    genes = torch.as_tensor(coo.col, dtype=torch.int64)
    values = torch.as_tensor(coo.data, dtype=torch.float64)
    mu_t = torch.as_tensor(mu, dtype=torch.float64)
    total = torch.zeros_like(mu_t).index_add_(0, genes, values)
    n_genes = len(mu)

    def profile(log_theta: torch.Tensor) -> torch.Tensor:
        theta = log_theta.exp()
        at_nonzeros = torch.lgamma(values + theta[genes]) - torch.lgamma(theta[genes])
        log_denominator = torch.log(theta + mu_t)
        return (torch.zeros(n_genes, dtype=torch.float64).index_add_(0, genes, at_nonzeros)
                + n_cells * theta * (log_theta - log_denominator) + total * (torch.log(mu_t) - log_denominator))

    low = torch.full((n_genes,), np.log(THETA_RANGE[0]), dtype=torch.float64)
    high = torch.full((n_genes,), np.log(THETA_RANGE[1]), dtype=torch.float64)
    left, right = high - _GOLDEN * (high - low), low + _GOLDEN * (high - low)
    f_left, f_right = profile(left), profile(right)
    for _ in range(n_iter):
        go_right = f_right > f_left  # maximum lies in [left, high]
        low = torch.where(go_right, left, low)
        high = torch.where(go_right, high, right)
        new_left, new_right = high - _GOLDEN * (high - low), low + _GOLDEN * (high - low)
        left_eval = torch.where(go_right, right, new_left)
        right_eval = torch.where(go_right, new_right, left)
        f_new = profile(torch.where(go_right, new_right, new_left))
        f_left, f_right = torch.where(go_right, f_right, f_new), torch.where(go_right, f_new, f_left)
        left, right = left_eval, right_eval
    return ((low + high) / 2).exp().numpy()


def nb_nll_per_cell(counts, partition, mu: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """-log NB(x_i; mu[k_i], theta[k_i]) summed over genes, per cell ([n_cells], float64)."""
    counts = _csr(counts)
    partition = np.asarray(partition)
    mu_t = torch.as_tensor(mu, dtype=torch.float64)
    theta_t = torch.as_tensor(theta, dtype=torch.float64)
    log_p0 = theta_t * (torch.log(theta_t) - torch.log(theta_t + mu_t))  # [K, G]
    zero_part = log_p0.sum(-1)[torch.as_tensor(partition)]
    coo = counts.tocoo()
    rows, genes = torch.as_tensor(coo.row, dtype=torch.int64), torch.as_tensor(coo.col, dtype=torch.int64)
    x = torch.as_tensor(coo.data, dtype=torch.float64)
    k = torch.as_tensor(partition, dtype=torch.int64)[rows]
    m, t = mu_t[k, genes], theta_t[k, genes]
    full = (torch.lgamma(x + t) - torch.lgamma(t) - torch.lgamma(x + 1) + t * (torch.log(t) - torch.log(t + m))
            + x * (torch.log(m) - torch.log(t + m)))
    correction = torch.zeros(counts.shape[0], dtype=torch.float64).index_add_(0, rows, full - log_p0[k, genes])
    return -(zero_part + correction).numpy()
