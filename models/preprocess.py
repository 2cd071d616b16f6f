"""Quality control, doublet removal and Leiden labelling of raw-count AnnData (stage _1_).

Functions take and return AnnData objects; nothing reads or writes files. The count matrix
stays sparse throughout (scanpy's PCA centres implicitly on sparse input).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import pandas as pd

log = logging.getLogger(__name__)


@dataclass
class QCThresholds:
    max_genes: int = 2500  # cells with this many detected genes or more are likely doublets
    max_counts: int = 6000  # library-size cap used by the original study
    max_pct_mito: float = 15.0  # dying cells leak cytoplasmic RNA and keep mitochondrial RNA
    min_genes: int = 200  # near-empty droplets
    min_cells: int = 3  # genes seen in fewer cells carry no usable signal
    mito_prefix: str = "MT-"  # human mitochondrial gene symbols


def quality_control(adata, thresholds: QCThresholds):
    """Filter cells and genes as the original study did; returns a new AnnData (raw counts kept)."""
    import scanpy as sc

    adata = adata.copy()
    adata.var["mt"] = adata.var_names.str.upper().str.startswith(thresholds.mito_prefix.upper())
    sc.pp.calculate_qc_metrics(adata, qc_vars=["mt"], percent_top=None, log1p=False, inplace=True)
    keep = (
        (adata.obs["n_genes_by_counts"] < thresholds.max_genes)
        & (adata.obs["total_counts"] < thresholds.max_counts)
        & (adata.obs["pct_counts_mt"] < thresholds.max_pct_mito)
    )
    n_before = adata.n_obs
    adata = adata[keep.to_numpy()].copy()
    sc.pp.filter_cells(adata, min_genes=thresholds.min_genes)
    sc.pp.filter_genes(adata, min_cells=thresholds.min_cells)
    log.info("QC kept %d of %d cells and %d genes", adata.n_obs, n_before, adata.n_vars)
    return adata


def remove_doublets(adata, seed: int):
    """Drop scrublet's predicted doublets (scanpy's ``pp.scrublet`` on raw counts)."""
    import scanpy as sc

    scored = adata.copy()
    sc.pp.scrublet(scored, random_state=seed, verbose=False)
    doublet = scored.obs["predicted_doublet"].fillna(False).to_numpy(dtype=bool)
    log.info("scrublet flagged %d of %d cells as doublets", int(doublet.sum()), adata.n_obs)
    return adata[~doublet].copy()


def embed(adata, n_top_genes: int = 2000, n_pcs: int = 50, n_neighbors: int = 15,
          umap_min_dist: float = 0.25, seed: int = 123, umap: bool = True):
    """Normalised copy with PCA, neighbour graph and (optionally) UMAP; the raw counts are untouched."""
    import scanpy as sc

    work = adata.copy()
    sc.pp.normalize_total(work)
    sc.pp.log1p(work)
    n_top = min(n_top_genes, work.n_vars)
    sc.pp.highly_variable_genes(work, n_top_genes=n_top)
    n_comps = max(2, min(n_pcs, work.n_obs - 1, int(work.var["highly_variable"].sum()) - 1))
    sc.pp.pca(work, n_comps=n_comps, mask_var="highly_variable", random_state=seed)
    sc.pp.neighbors(work, n_neighbors=min(n_neighbors, work.n_obs - 1), n_pcs=n_comps, random_state=seed)
    if umap:
        sc.tl.umap(work, min_dist=umap_min_dist, random_state=seed)
    return work


def leiden_clusters(embedded, resolution: float = 0.7, seed: int = 123) -> pd.Series:
    """Leiden cluster ids (strings "0", "1", ...) on an ``embed``-ed AnnData's neighbour graph."""
    import scanpy as sc

    sc.tl.leiden(embedded, resolution=resolution, random_state=seed, flavor="igraph",
                 n_iterations=2, directed=False, key_added="leiden")
    return embedded.obs["leiden"].astype(str)


def attach_given_labels(adata, labels: pd.Series, source) -> pd.Series:
    """Labels for ``adata``'s cells from a barcode -> cell_type Series; unlabelled cells get NaN."""
    from models.utils import InputError

    if labels.index.duplicated().any():
        dup = labels.index[labels.index.duplicated()][:3].tolist()
        raise InputError(f"{source}: barcodes appear more than once (e.g. {dup})")
    matched = labels.reindex(adata.obs_names)
    n_matched = int(matched.notna().sum())
    if n_matched == 0:
        raise InputError(f"{source}: none of its barcodes match the count matrix's barcodes "
                         f"(e.g. {list(labels.index[:2])} vs {list(adata.obs_names[:2])}); its barcode column "
                         "must hold the names of raw/barcodes.tsv (or cells.h5ad's obs_names)")
    if n_matched < adata.n_obs:
        log.warning("%s labels %d of %d cells; the %d unlabelled cells are dropped",
                    source, n_matched, adata.n_obs, adata.n_obs - n_matched)
    return matched

