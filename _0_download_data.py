"""Stage 0: download GSE130148 and the gene-length table, and convert the counts to MTX.

Reads / downloads (each file is kept when it already exists, so a second run, or a run with
the files placed by hand, touches no network):
    DATA_DIR/raw/GSE130148_raw_counts.RData.gz   GEO series supplementary file (via GEOparse)
    DATA_DIR/raw/GeneLength.txt                  TAPE's human gene-length table
Writes:
    DATA_DIR/raw/matrix.mtx     integer raw counts, genes x cells
    DATA_DIR/raw/genes.tsv      10x two columns, gene id <TAB> symbol (the RData has symbols: both)
    DATA_DIR/raw/barcodes.tsv   one cell barcode per line

The RData holds an R ``dgCMatrix``; it is read in Python with ``rdata`` (no R needed).
Offline: copy the two input files into DATA_DIR/raw/ first (see README). A failed download
(no network, HTTP error, wrong accession, truncated file) is one error line naming the URL, the
file and what to place where; nothing is left at the final path (downloads go via ``.part``).

Run:  python _0_download_data.py [--DATA_DIR=data] [--FORCE=true]
"""
from __future__ import annotations

import logging

from models import io
from models.config import load_config
from models.geo import download_file, download_series_file, read_rdata_counts
from models.paths import Paths
from models.utils import InputError, run_stage, setup_logging

log = logging.getLogger("bulk2sc.download")

# -----------------------------------------------------------------------------
DATA_DIR = "data"  # root of every stage's inputs and outputs; relative paths are from the repo root
GEO_ACCESSION = "GSE130148"  # human lung scRNA-seq (Vieira Braga et al. 2019)
RDATA_PATTERN = "_raw_counts.RData.gz"  # the series-level supplementary file holding the dgCMatrix
RDATA_OBJECT = "raw_counts"  # name of the dgCMatrix inside the RData (falls back to the only one)
GENE_LENGTH_URL = "https://raw.githubusercontent.com/poseidonchan/TAPE/main/data/GeneLength.txt"  # TAPE's table
FORCE = False  # rewrite matrix.mtx/genes.tsv/barcodes.tsv even when they exist
# -----------------------------------------------------------------------------


def offline_hint(paths: Paths, accession: str = GEO_ACCESSION) -> str:
    """What to place where to run without network (the README's offline section)."""
    return (f"To run offline, place {paths.rdata.name} (GEO {accession}'s supplementary file) at {paths.rdata} "
            f"and GeneLength.txt (TAPE's data/GeneLength.txt) at {paths.gene_length}, then rerun")


def fetch_inputs(cfg, paths: Paths) -> None:
    """Download the RData and the gene-length table unless they are already in raw/."""
    try:
        paths.raw_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create {paths.raw_dir} ({err.strerror}); choose a writable DATA_DIR") from None
    hint = offline_hint(paths, cfg.GEO_ACCESSION)
    if paths.rdata.exists():
        log.info("using existing %s", paths.rdata)
    else:
        download_series_file(cfg.GEO_ACCESSION, cfg.RDATA_PATTERN, paths.rdata, paths.geo_dir, offline_hint=hint)
    if paths.gene_length.exists():
        log.info("using existing %s", paths.gene_length)
    else:
        download_file(cfg.GENE_LENGTH_URL, paths.gene_length, offline_hint=hint)


def main(argv=None) -> None:
    cfg = load_config(globals(), argv)
    setup_logging()
    paths = Paths(cfg.DATA_DIR)
    outputs = (paths.raw_matrix, paths.raw_genes, paths.raw_barcodes)
    fetch_inputs(cfg, paths)
    if all(p.exists() for p in outputs) and not cfg.FORCE:
        log.info("%s already converted; pass --FORCE=true to redo", paths.raw_matrix)
        return
    counts, genes, barcodes = read_rdata_counts(paths.rdata, cfg.RDATA_OBJECT)
    # Each file is written atomically; genes/barcodes go last so a crash mid-way never leaves a
    # complete-looking set.
    io.write_mtx(paths.raw_matrix, counts)
    io.write_genes(paths.raw_genes, genes)  # the RData has symbols only: the symbol in both columns
    io.write_lines(paths.raw_barcodes, barcodes)
    log.info("wrote %s (%d genes x %d cells)", paths.raw_matrix, len(genes), len(barcodes))


if __name__ == "__main__":
    run_stage(main)
