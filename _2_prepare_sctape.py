"""Stage 2: scTAPE's reference table and independent TPM pseudo-bulk samples with known truth.

Reads:
    DATA_DIR/train/, DATA_DIR/test/     (from _1_split_train_test.py)
    DATA_DIR/raw/GeneLength.txt         (from _0_download_data.py)
Writes, in DATA_DIR/sctape/:
    reference.txt.gz        training cells (at most REFERENCE_CELLS_PER_TYPE per type) x genes raw counts,
                            row index = cell-type name
                            (the tab-separated layout TAPE.generate_simulated_data reads)
    pseudobulk_counts.tsv   samples x genes summed raw counts of random test-cell subsets
    pseudobulk_tpm.tsv      the same in TPM (rows sum to 1e6): CPM for UMI counts (PROTOCOL="umi",
                            one count per molecule), length-normalised for PROTOCOL="full_length"
    pseudobulk_truth.csv    samples x cell types, the true proportions (rows sum to 1)
    config.json             this run's settings; _4_ reads PROTOCOL from it

Each pseudo-bulk draws its own cell count in [n_test/3, 1.2 n_test/3] and its own cells from
its own seed, so samples are independent (the original's were nested, its MAE optimistic).

Run:  python _2_prepare_sctape.py [--DATA_DIR=data] [--N_PSEUDOBULK=5]
"""
from __future__ import annotations

import gzip
from io import TextIOWrapper
import logging

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm import tqdm

from models import io
from models import bulk
from models.bulk import counts_to_expression, sample_pseudobulks
from models.config import load_config, save_config
from models.paths import Paths
from models.split import cap_per_type
from models.utils import InputError, require_files, run_stage, setup_logging

log = logging.getLogger("bulk2sc.sctape_inputs")

# -----------------------------------------------------------------------------
DATA_DIR = "data"  # root of every stage's inputs and outputs; relative paths are from the repo root
SEED = 123  # pseudo-bulk s uses the generator seeded with (SEED, s)
N_PSEUDOBULK = 5  # independent pseudo-bulk samples drawn from the test cells
MIN_CELL_FRACTION = 1 / 3  # each sample takes at least this share of the test cells ...
MAX_CELL_FRACTION = 1.2 / 3  # ... and at most this share (the original's range)
REFERENCE_CELLS_PER_TYPE = 5000  # cap per type of sctape/reference.txt.gz (seeded by SEED); TAPE draws at most
#                                  500 cells of a type per simulated bulk, with replacement, so 10x that keeps the
#                                  draws varied while an atlas no longer becomes cells x genes of text; 0 = no cap
CHUNK_CELLS = 1000  # rows of the reference table densified at a time (bounds memory)
PROTOCOL = "umi"  # how the single cells were counted: "umi" (10x, Drop-seq as GSE130148: a count is a molecule, so TPM is CPM) or "full_length" (Smart-seq2: reads scale with gene length)
# -----------------------------------------------------------------------------


def write_reference_table(adata, path, chunk_cells: int) -> None:
    """cells x genes integer counts, tab-separated, gzip, row index = cell-type name; chunked."""
    counts = sp.csr_matrix(adata.X)
    names = adata.obs["cell_type"].astype(str).to_numpy()
    # no file name and mtime 0 in the gzip header: the same cells give the same bytes
    with (io.atomic_path(path) as tmp, open(tmp, "wb") as raw,
          gzip.GzipFile(filename="", mode="wb", compresslevel=1, fileobj=raw, mtime=0) as packed,
          TextIOWrapper(packed, encoding="utf-8") as handle):
        handle.write("cell_type\t" + "\t".join(adata.var_names) + "\n")
        for start in tqdm(range(0, adata.n_obs, chunk_cells), desc="reference table", unit="chunk"):
            stop = min(start + chunk_cells, adata.n_obs)
            block = pd.DataFrame(counts[start:stop].toarray().astype(np.int64), index=names[start:stop])
            block.to_csv(handle, sep="\t", header=False)


def main(argv=None) -> None:
    cfg = load_config(globals(), argv)
    setup_logging()
    paths = Paths(cfg.DATA_DIR)
    require_files([paths.gene_length], "_0_download_data.py")
    train = io.read_dataset(paths.train_dir)
    test = io.read_dataset(paths.test_dir)
    if list(train.var_names) != list(test.var_names):
        raise InputError(f"{paths.train_dir} and {paths.test_dir} have different genes: rerun _1_split_train_test.py")
    type_names = list(train.obs["cell_type"].cat.categories)
    if list(test.obs["cell_type"].cat.categories) != type_names:
        raise InputError(f"{paths.test_dir}: cell types differ from {paths.train_dir}: rerun _1_split_train_test.py")
    if cfg.PROTOCOL not in bulk.PROTOCOLS:
        raise InputError(f"PROTOCOL must be one of {bulk.PROTOCOLS}, got {cfg.PROTOCOL!r}")
    if cfg.N_PSEUDOBULK < 1:
        raise InputError(f"N_PSEUDOBULK must be at least 1, got {cfg.N_PSEUDOBULK}")
    gene_lengths = io.read_gene_lengths(paths.gene_length)

    summed, truth, members = sample_pseudobulks(
        test.X, test.obs["partition"].to_numpy(), type_names, cfg.N_PSEUDOBULK, cfg.SEED,
        cfg.MIN_CELL_FRACTION, cfg.MAX_CELL_FRACTION)
    counts = pd.DataFrame(summed.astype(np.int64), index=truth.index, columns=test.var_names)
    tpm, overlap = counts_to_expression(counts, gene_lengths, cfg.PROTOCOL)
    log.info("pseudo-bulk TPM (%s counts): %s", cfg.PROTOCOL,
             "CPM, no gene-length correction" if overlap is None else f"{paths.gene_length.name}: {overlap}")
    for name, cells in zip(truth.index, members):
        log.info("%s: %d test cells", name, len(cells))

    reference_rows = cap_per_type(train.obs["cell_type"].astype(str), cfg.REFERENCE_CELLS_PER_TYPE, cfg.SEED)
    if len(reference_rows) < train.n_obs:
        log.info("reference table: %d of %d training cells (at most REFERENCE_CELLS_PER_TYPE=%d per type)",
                 len(reference_rows), train.n_obs, cfg.REFERENCE_CELLS_PER_TYPE)
    else:
        log.info("reference table: all %d training cells (none of the types has more than "
                 "REFERENCE_CELLS_PER_TYPE=%d)", train.n_obs, cfg.REFERENCE_CELLS_PER_TYPE)
    write_reference_table(train[reference_rows], paths.sctape_reference, cfg.CHUNK_CELLS)
    io.write_table(counts, paths.pseudobulk_counts, sep="\t")
    io.write_table(tpm, paths.pseudobulk_tpm, sep="\t")
    io.write_table(truth, paths.pseudobulk_truth)
    save_config(cfg, paths.sctape_config)
    log.info("wrote %s and %d pseudo-bulk samples to %s", paths.sctape_reference.name, len(truth), paths.sctape_dir)


if __name__ == "__main__":
    run_stage(main)
