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


def counts_to_cpm(counts: pd.DataFrame) -> pd.DataFrame:
    """samples x genes counts -> counts per million (rows sum to 1e6), every gene kept.

    For UMI counts (10x, Drop-seq) this *is* TPM: each UMI is one transcript molecule, so no
    gene-length correction belongs in it; dividing by length would distort every gene.
    """
    values = counts.to_numpy(dtype=np.float64)
    totals = values.sum(axis=1, keepdims=True)
    if np.any(totals <= 0):
        empty = list(counts.index[(totals <= 0).ravel()])[:5]
        raise ValueError(f"samples {empty} have no counts")
    return pd.DataFrame(values * 1e6 / totals, index=counts.index, columns=counts.columns)


PROTOCOLS = ("umi", "full_length")


def counts_to_expression(counts: pd.DataFrame, gene_lengths: pd.Series | None,
                         protocol: str) -> tuple[pd.DataFrame, GeneOverlap | None]:
    """Counts -> transcripts per million, as the counting protocol requires.

    protocol "umi" (10x, Drop-seq: a count is a molecule): CPM over every gene, no length.
    protocol "full_length" (bulk RNA-seq reads, Smart-seq2: a gene's reads grow with its length):
    TPM with ``gene_lengths`` over the genes that have one (TAPE's counts2TPM).
    """
    if protocol == "umi":
        return counts_to_cpm(counts), None
    if protocol == "full_length":
        if gene_lengths is None:
            raise ValueError("full-length counts need the gene-length table to become TPM")
        return counts_to_tpm(counts, gene_lengths)
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


def length_bias_slope(counts: pd.DataFrame, profile: pd.Series, gene_lengths: pd.Series,
                      min_cpm: float = 20.0) -> np.ndarray:
    """Per sample, the slope of log(bulk / reference) against log(gene length).

    counts: samples x genes raw bulk counts. profile: the reference's mean expression per gene
    (any scale; the UMI reference's CPM). Over genes with a length, at least ``min_cpm`` in the
    profile and nonzero in the sample, fits log(sample CPM / profile CPM) = a + slope * log(length).
    Reads from full-length RNA-seq against a UMI reference give a clearly positive slope
    (0.29..0.42 on the five Finotello PBMC bulks vs the Zheng 10x reference); a pseudo-bulk of UMI
    counts from the reference's own platform gives ~0 (-0.10..0.06 for each Zheng type alone).
    Returns (n_samples,) slopes; NaN for a sample with fewer than 50 usable genes.
    """
    genes = counts.columns.intersection(profile.index).intersection(gene_lengths.index)
    reference = profile.loc[genes].to_numpy(dtype=np.float64)
    reference = reference * 1e6 / max(reference.sum(), 1e-300)
    log_length = np.log(gene_lengths.loc[genes].to_numpy(dtype=np.float64))
    values = counts.loc[:, genes].to_numpy(dtype=np.float64)
    slopes = np.full(len(values), np.nan)
    for row, sample in enumerate(values):
        total = sample.sum()
        keep = (reference >= min_cpm) & (sample > 0)
        if total <= 0 or keep.sum() < 50:
            continue
        ratio = np.log(sample[keep] * 1e6 / total) - np.log(reference[keep])
        slopes[row] = np.polyfit(log_length[keep], ratio, 1)[0]
    return slopes


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
