"""Bulk expression transforms: counts -> FPKM -> TPM, and pseudo-bulk samples from cells.

All functions are pure (arrays/DataFrames in, arrays/DataFrames out) so they test without files.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

log = logging.getLogger(__name__)


@dataclass
class GeneOverlap:
    """How many genes of a table survive the intersection with the gene-length table."""

    n_genes: int
    n_shared: int

    @property
    def n_lost(self) -> int:
        return self.n_genes - self.n_shared

    def __str__(self) -> str:
        return (f"{self.n_shared:,} of {self.n_genes:,} genes have a length; "
                f"{self.n_lost:,} ({100.0 * self.n_lost / max(self.n_genes, 1):.2f}%) dropped")


def counts_to_fpkm(counts: pd.DataFrame, gene_lengths: pd.Series) -> pd.DataFrame:
    """samples x genes counts -> FPKM over the genes with a known length (TAPE's convention).

    FPKM = counts * 1e9 / (length * total reads of the sample), where the total is taken over
    the genes kept, exactly as TAPE's ``counts2FPKM`` does.
    """
    shared = counts.columns.intersection(gene_lengths.index)
    values = counts[shared].to_numpy(dtype=np.float64)
    totals = values.sum(axis=1, keepdims=True)
    if np.any(totals <= 0):
        empty = list(counts.index[(totals <= 0).ravel()])[:5]
        raise ValueError(f"samples {empty} have no counts on genes with a known length")
    lengths = gene_lengths.loc[shared].to_numpy(dtype=np.float64)
    return pd.DataFrame(values * 1e9 / (lengths[None, :] * totals), index=counts.index, columns=shared)


def fpkm_to_tpm(fpkm: pd.DataFrame) -> pd.DataFrame:
    """Rescale each sample (row) to sum to 1e6."""
    values = fpkm.to_numpy(dtype=np.float64)
    return pd.DataFrame(values * 1e6 / values.sum(axis=1, keepdims=True), index=fpkm.index, columns=fpkm.columns)


def counts_to_tpm(counts: pd.DataFrame, gene_lengths: pd.Series) -> tuple[pd.DataFrame, GeneOverlap]:
    """samples x genes raw counts -> TPM (rows sum to 1e6), and the gene-overlap report."""
    overlap = GeneOverlap(counts.shape[1], len(counts.columns.intersection(gene_lengths.index)))
    return fpkm_to_tpm(counts_to_fpkm(counts, gene_lengths)), overlap


def sample_pseudobulks(counts: sp.spmatrix, partition: np.ndarray, type_names: list[str],
                       n_samples: int, seed: int, min_fraction: float = 1 / 3,
                       max_fraction: float = 1.2 / 3) -> tuple[np.ndarray, pd.DataFrame, list[np.ndarray]]:
    """Independent pseudo-bulk samples drawn from single cells.

    Each sample ``s`` draws its own number of cells uniformly in
    [min_fraction * n_cells, max_fraction * n_cells] and that many cells without replacement,
    from its own generator ``default_rng([seed, s])``, so samples are not nested in each other.

    counts: (n_cells, n_genes) sparse raw counts. partition: (n_cells,) codes 0..K-1.
    Returns (summed counts (n_samples, n_genes), true proportions (n_samples, K), cell indices).
    """
    counts = sp.csr_matrix(counts)
    n_cells = counts.shape[0]
    low = max(1, int(np.ceil(min_fraction * n_cells)))
    high = max(low, int(np.floor(max_fraction * n_cells)))
    sums, truth, members = [], [], []
    for sample in range(n_samples):
        rng = np.random.default_rng([seed, sample])
        size = int(rng.integers(low, high + 1))
        chosen = np.sort(rng.choice(n_cells, size=size, replace=False))
        sums.append(np.asarray(counts[chosen].sum(axis=0)).ravel())
        truth.append(np.bincount(partition[chosen], minlength=len(type_names)) / size)
        members.append(chosen)
    names = [f"pseudobulk_{i}" for i in range(n_samples)]
    return np.vstack(sums), pd.DataFrame(np.vstack(truth), index=names, columns=type_names), members
