"""Stage 1: QC, doublet removal, cell-type labels, and a stratified 75/25 train/test split.

Reads:
    DATA_DIR/raw/matrix.mtx + genes.tsv + barcodes.tsv   (from _0_download_data.py), or
    DATA_DIR/raw/cells.h5ad                              (your own data: cells x genes raw counts)
    DATA_DIR/raw/cell_types.csv  optional, columns barcode,cell_type: use these labels instead of Leiden
Writes, for each of DATA_DIR/train/ and DATA_DIR/test/:
    matrix.mtx (integer, genes x cells), genes.tsv, barcodes.tsv,
    clusters.csv (partition = code 0..K-1 in sorted order of names, cell_type = name),
    cells.h5ad (cells x genes, raw counts in X, obs["cell_type"])
    FIG_DIR/umap_clusters.png

Run:  python _1_split_train_test.py [--DATA_DIR=data] [--LEIDEN_RESOLUTION=0.7] ...
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from models import io
from models.config import load_config, save_config
from models.paths import Paths
from models.preprocess import QCThresholds, attach_given_labels, embed, leiden_clusters, quality_control, remove_doublets
from models.split import small_types, stratified_split
from models.utils import InputError, run_stage, set_seed, setup_logging

log = logging.getLogger("bulk2sc.split")

# -----------------------------------------------------------------------------
DATA_DIR = "data"  # root of every stage's inputs and outputs; relative paths are from the repo root
FIG_DIR = "fig"  # where the UMAP figure goes
SEED = 123  # seeds scrublet, PCA, UMAP, Leiden and the split (the original study's value)
MAX_GENES = 2500  # drop cells with this many detected genes or more (likely doublets)
MAX_COUNTS = 6000  # drop cells with this many UMIs or more
MAX_PCT_MITO = 15.0  # drop cells with this % of mitochondrial (MT-) counts or more (damaged cells)
MIN_GENES = 200  # drop near-empty droplets with fewer detected genes
MIN_CELLS = 3  # drop genes detected in fewer cells
MITO_PREFIX = "MT-"  # mitochondrial gene prefix (human symbols; "mt-" for mouse)
REMOVE_DOUBLETS = True  # scrublet doublet removal; turn off only for data already cleaned
N_TOP_GENES = 2000  # highly variable genes for PCA
N_PCS = 50  # principal components for the neighbour graph
N_NEIGHBORS = 15  # neighbours per cell
UMAP_MIN_DIST = 0.25  # as in the original study
LEIDEN_RESOLUTION = 0.7  # gives 17 lung clusters in the original study
USE_GIVEN_LABELS = True  # use raw/cell_types.csv when present instead of Leiden
MIN_CELLS_PER_TYPE = 30  # types smaller than this cannot be modelled or split reliably
TEST_FRACTION = 0.25  # held-out share of each type
UMAP_FIGURE = True  # draw FIG_DIR/umap_clusters.png (costs a UMAP when labels are given)
# -----------------------------------------------------------------------------


def load_raw(paths: Paths):
    """Raw counts as cells x genes AnnData, from raw/cells.h5ad or raw/matrix.mtx + TSVs."""
    import anndata as ad

    if paths.raw_h5ad.exists():
        try:
            adata = ad.read_h5ad(paths.raw_h5ad)
        except Exception as err:  # h5py raises many types for damaged files
            raise InputError(f"{paths.raw_h5ad}: cannot read, it may be truncated or corrupt ({err}); write it again "
                             "(cells x genes raw counts, see README), or remove it to read raw/matrix.mtx") from None
        source = paths.raw_h5ad
        counts, genes, barcodes = adata.X, adata.var_names, adata.obs_names
        gene_ids = adata.var["gene_ids"].astype(str).tolist() if "gene_ids" in adata.var else None
    else:
        needed = (paths.raw_matrix, paths.raw_genes, paths.raw_barcodes)
        missing = [str(p) for p in needed if not p.exists()]
        if missing:
            raise InputError(f"missing {', '.join(missing)}: run _0_download_data.py first, "
                             f"or place your own raw/cells.h5ad (see README)")
        source = paths.raw_matrix
        (genes, gene_ids), barcodes = io.read_genes(paths.raw_genes), io.read_lines(paths.raw_barcodes)
        counts = io.read_mtx(paths.raw_matrix, "rerun _0_download_data.py --FORCE=true, or replace it with a "
                                                "complete file")
        if counts.shape != (len(genes), len(barcodes)):
            raise InputError(f"{paths.raw_matrix}: shape {counts.shape} does not match {len(genes)} genes "
                             f"x {len(barcodes)} barcodes (expected genes x cells)")
        counts = counts.T
    io.check_counts(counts, source)
    n_cells, n_genes = counts.shape
    if n_cells == 0 or n_genes == 0 or (counts.nnz if hasattr(counts, "nnz") else (counts != 0).sum()) == 0:
        raise InputError(f"{source}: the matrix is empty ({n_cells} cells x {n_genes} genes, no counts); "
                         "give the raw counts of at least one cell")
    adata = io.make_anndata(counts, genes, barcodes, gene_ids=gene_ids)
    if adata.var_names.has_duplicates:
        log.warning("%s: %d duplicated gene names made unique", source, int(adata.var_names.duplicated().sum()))
        adata.var_names_make_unique()
    log.info("read %s: %d cells x %d genes", source, adata.n_obs, adata.n_vars)
    return adata


def read_given_labels(path) -> pd.Series:
    table = pd.read_csv(path, dtype=str)
    if not {"barcode", "cell_type"} <= set(table.columns):
        raise InputError(f"{path}: needs columns barcode,cell_type; found {list(table.columns)}")
    if table["cell_type"].isna().any():
        raise InputError(f"{path}: {int(table['cell_type'].isna().sum())} rows have an empty cell_type")
    return table.set_index("barcode")["cell_type"]


def plot_umap(embedded, cell_types: pd.Series, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from models.io import atomic_path

    coords = embedded.obsm["X_umap"]
    names = io.type_order(cell_types)
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(names), 2)))
    fig, ax = plt.subplots(figsize=(7, 6))
    for colour, name in zip(colours, names):
        members = (cell_types.to_numpy() == name)
        ax.scatter(coords[members, 0], coords[members, 1], s=3, color=colour, label=f"{name} ({members.sum()})")
    ax.set(xlabel="UMAP 1", ylabel="UMAP 2", title=f"{len(coords):,} cells after QC, {len(names)} types")
    ax.legend(markerscale=4, fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main(argv=None) -> None:
    cfg = load_config(globals(), argv)
    setup_logging()
    set_seed(cfg.SEED)
    paths = Paths(cfg.DATA_DIR, cfg.FIG_DIR)

    adata = load_raw(paths)
    given = None
    if cfg.USE_GIVEN_LABELS and paths.raw_cell_types.exists():
        given = attach_given_labels(adata, read_given_labels(paths.raw_cell_types), paths.raw_cell_types)
        adata = adata[given.notna().to_numpy()].copy()
        log.info("using given labels from %s (%d types)", paths.raw_cell_types, given.nunique())

    thresholds = QCThresholds(cfg.MAX_GENES, cfg.MAX_COUNTS, cfg.MAX_PCT_MITO, cfg.MIN_GENES,
                              cfg.MIN_CELLS, cfg.MITO_PREFIX)
    adata = quality_control(adata, thresholds)
    if adata.n_obs == 0:  # before scrublet, which fails on no cells
        raise InputError(f"no cells pass QC in {paths.raw_dir}; check the thresholds (MAX_GENES, MAX_COUNTS, ...)")
    if cfg.REMOVE_DOUBLETS:
        adata = remove_doublets(adata, cfg.SEED)
    if adata.n_obs == 0:
        raise InputError(f"no cells pass QC in {paths.raw_dir}; check the thresholds (MAX_GENES, MAX_COUNTS, ...)")

    embedded = None
    if given is None or cfg.UMAP_FIGURE:
        embedded = embed(adata, cfg.N_TOP_GENES, cfg.N_PCS, cfg.N_NEIGHBORS, cfg.UMAP_MIN_DIST, cfg.SEED,
                         umap=cfg.UMAP_FIGURE)
    if given is None:
        cell_types = leiden_clusters(embedded, cfg.LEIDEN_RESOLUTION, cfg.SEED)
        log.info("Leiden (resolution %.2f) found %d clusters", cfg.LEIDEN_RESOLUTION, cell_types.nunique())
    else:
        cell_types = given.reindex(adata.obs_names)

    dropped = small_types(cell_types, cfg.MIN_CELLS_PER_TYPE)
    if dropped:
        log.info("dropping types with < %d cells: %s", cfg.MIN_CELLS_PER_TYPE, dropped)
    keep = ~cell_types.isin(dropped).to_numpy()
    if not keep.any():
        raise InputError(f"every cell type has fewer than MIN_CELLS_PER_TYPE={cfg.MIN_CELLS_PER_TYPE} cells")
    adata = adata[keep].copy()
    cell_types = cell_types[keep]
    io.set_labels(adata, cell_types.to_numpy())
    # Keep only the raw counts, labels and gene ids (genes.tsv's first column); QC columns stay in obs.
    adata.var = adata.var[[c for c in ("gene_ids",) if c in adata.var]]

    train, test = stratified_split(adata.obs["cell_type"].astype(str), cfg.TEST_FRACTION, cfg.SEED)
    io.write_dataset(adata[train].copy(), paths.train_dir)
    io.write_dataset(adata[test].copy(), paths.test_dir)
    save_config(cfg, paths.train_dir / "config.json")
    summary = pd.crosstab(adata.obs["cell_type"], np.isin(np.arange(adata.n_obs), test)).rename(
        columns={False: "train", True: "test"})
    log.info("split %d cells x %d genes into train %d / test %d:\n%s",
             adata.n_obs, adata.n_vars, len(train), len(test), summary.to_string())

    if cfg.UMAP_FIGURE:
        embedded = embedded[adata.obs_names]
        plot_umap(embedded, adata.obs["cell_type"].astype(str), paths.fig_dir / "umap_clusters.png")


if __name__ == "__main__":
    run_stage(main)
