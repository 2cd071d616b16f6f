"""Every file name the pipeline reads or writes, derived from one ``DATA_DIR`` root.

Stages never build paths by hand: ``Paths(cfg.DATA_DIR)`` gives them all, so two runs with
different ``DATA_DIR`` values live side by side and scripts work from any current directory.
"""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve(path: str | Path) -> Path:
    """A relative path is taken relative to the repository root, not the current directory."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


class Paths:
    """Fixed file layout under ``data_dir`` (see README, "Files between stages")."""

    def __init__(self, data_dir: str | Path = "data", fig_dir: str | Path = "fig"):
        self.data_dir = resolve(data_dir)
        self.fig_dir = resolve(fig_dir)

        # _0_download_data.py -> raw/
        self.raw_dir = self.data_dir / "raw"
        self.geo_dir = self.raw_dir / "geo"  # GEOparse's SOFT file lands here
        self.rdata = self.raw_dir / "GSE130148_raw_counts.RData.gz"
        self.gene_length = self.raw_dir / "GeneLength.txt"
        self.raw_matrix = self.raw_dir / "matrix.mtx"
        self.raw_genes = self.raw_dir / "genes.tsv"
        self.raw_barcodes = self.raw_dir / "barcodes.tsv"
        self.raw_h5ad = self.raw_dir / "cells.h5ad"  # bring-your-own alternative to the MTX
        self.raw_cell_types = self.raw_dir / "cell_types.csv"  # optional given labels

        # _1_split_train_test.py -> train/, test/
        self.train_dir = self.data_dir / "train"
        self.test_dir = self.data_dir / "test"

        # _2_prepare_sctape.py -> sctape/
        self.sctape_dir = self.data_dir / "sctape"
        self.sctape_reference = self.sctape_dir / "reference.txt.gz"  # TAPE reads ".txt" tables
        self.pseudobulk_counts = self.sctape_dir / "pseudobulk_counts.tsv"
        self.pseudobulk_tpm = self.sctape_dir / "pseudobulk_tpm.tsv"
        self.pseudobulk_truth = self.sctape_dir / "pseudobulk_truth.csv"
        self.sctape_config = self.sctape_dir / "config.json"  # _2_'s settings; PROTOCOL is read by _4_

        # _3_train_gmvae.py / _4_deconvolve_bulk.py -> checkpoints/
        self.checkpoints_dir = self.data_dir / "checkpoints"
        self.gmvae_checkpoint = self.checkpoints_dir / "gmvae.pt"
        self.gmvae_history = self.checkpoints_dir / "history.csv"
        self.tape_checkpoint = self.checkpoints_dir / "tape.pt"

        # _4_deconvolve_bulk.py -> deconvolution/
        self.deconvolution_dir = self.data_dir / "deconvolution"
        self.proportions = self.deconvolution_dir / "proportions.csv"
        self.proportions_lower = self.deconvolution_dir / "proportions_lower.csv"  # 90 % interval, per type
        self.proportions_upper = self.deconvolution_dir / "proportions_upper.csv"
        self.deconvolution_metrics = self.deconvolution_dir / "metrics.csv"
        self.bulk_record = self.deconvolution_dir / "bulk.json"  # the deconvolved bulk's path, unit, protocol
        self.departure = self.deconvolution_dir / "departure.csv"  # per sample: how far it departs from the simulated bulks
        self.proportions_scatter = self.fig_dir / "proportions_scatter.png"
        self.departure_figure = self.fig_dir / "departure.png"  # departure.csv's scores against the simulated bulks'

        # _5_generate_sc.py -> generated/
        self.generated_dir = self.data_dir / "generated"
        self.generated_metrics = self.generated_dir / "metrics.json"

    def split_dir(self, split: str) -> Path:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return self.train_dir if split == "train" else self.test_dir


# File names inside a dataset folder (raw/, train/, test/, generated/...).
MATRIX = "matrix.mtx"
GENES = "genes.tsv"
BARCODES = "barcodes.tsv"
CLUSTERS = "clusters.csv"
H5AD = "cells.h5ad"
