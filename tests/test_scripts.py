"""Every numbered stage script, run end to end in order on tiny data (Pyro's test_examples).

The chain starts from an RData made by R (tests/data/sim_counts.RData.gz, 300 cells x 150
genes in three types) placed where _0_ would download it, so it runs offline. A new
``_N_*.py`` script that is not listed in TINY_ARGS fails ``test_every_script_is_covered``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import gene_length_table
from models import io
from models.paths import Paths

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"

# Overrides that make each stage run in seconds on the tiny data.
TINY_ARGS = {
    "_0_download_data.py": [],
    "_1_split_train_test.py": ["--MIN_GENES=10", "--MAX_COUNTS=100000", "--MAX_GENES=100000", "--N_PCS=10",
                               "--N_TOP_GENES=100", "--UMAP_FIGURE=false"],
    "_2_prepare_sctape.py": ["--N_PSEUDOBULK=3"],
    "_3_train_gmvae.py": ["--EPOCHS=2", "--BATCH_SIZE=64", "--CLS_WARMUP_EPOCHS=1", "--DEVICE=cpu"],
    "_4_deconvolve_bulk.py": ["--SAMPLENUM=60", "--N_CELLS=20", "--EPOCHS=2", "--ADAPTIVE=false",
                              "--MIN_SHARED_GENES=50"],
    "_5_generate_sc.py": ["--UMAP=false", "--N_TOP_GENES=100", "--N_PCS=5", "--N_CORR_GENES=20",
                          "--CONDITION_MIN_GENES=50"],
}


def numbered_scripts() -> list[str]:
    return sorted(p.name for p in REPO.glob("_[0-9]_*.py"))


def test_every_script_is_covered():
    assert numbered_scripts() == sorted(TINY_ARGS), "list every numbered script in TINY_ARGS"


def _run(script: str, data_dir: Path, fig_dir: Path, extra=()):
    import importlib

    module = importlib.import_module(script[:-3])
    args = [f"--DATA_DIR={data_dir}", *extra]
    if "FIG_DIR" in vars(module):
        args.append(f"--FIG_DIR={fig_dir}")
    module.main(args + list(TINY_ARGS[script] or []))


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory) -> Path:
    """A DATA_DIR whose raw/ holds the tiny RData, given labels and a gene-length table."""
    root = tmp_path_factory.mktemp("chain")
    paths = Paths(root)
    paths.raw_dir.mkdir(parents=True)
    shutil.copy(DATA / "sim_counts.RData.gz", paths.rdata)
    return root


def test_pipeline_end_to_end(chain_dir, tmp_path, monkeypatch):
    paths = Paths(chain_dir)
    fig_dir = tmp_path / "fig"
    monkeypatch.chdir(tmp_path)  # stages must not depend on, or write into, the current directory

    # _0_: offline, since both inputs are already in raw/
    _, genes, barcodes = __import__("models.geo", fromlist=["x"]).read_rdata_counts(paths.rdata)
    gene_length_table(genes).to_csv(paths.gene_length, index=False)
    _run("_0_download_data.py", chain_dir, fig_dir)
    assert io.read_mtx(paths.raw_matrix).shape == (150, 300)
    import scanpy as sc  # every folder the pipeline writes opens with the ecosystem's 10x reader

    raw = sc.read_10x_mtx(paths.raw_dir)
    assert list(raw.var_names) == genes and list(raw.obs_names) == barcodes

    # _1_ with given labels (the type is the barcode's prefix)
    labels = pd.DataFrame({"barcode": barcodes, "cell_type": [b.split("_")[0] for b in barcodes]})
    labels.to_csv(paths.raw_cell_types, index=False)
    _run("_1_split_train_test.py", chain_dir, fig_dir)
    train, test = io.read_dataset(paths.train_dir), io.read_dataset(paths.test_dir)
    for split in (train, test):
        read_10x = sc.read_10x_mtx(paths.train_dir if split is train else paths.test_dir)
        assert list(read_10x.var_names) == list(split.var_names) and (read_10x.X != split.X).nnz == 0
    assert list(train.obs["cell_type"].cat.categories) == ["alpha", "beta", "gamma"]
    assert set(train.obs_names).isdisjoint(test.obs_names)
    for name in ["alpha", "beta", "gamma"]:
        n_train, n_test = (train.obs["cell_type"] == name).sum(), (test.obs["cell_type"] == name).sum()
        assert abs(n_test - 0.25 * (n_train + n_test)) <= 1
    assert all(b.split("_")[0] == t for b, t in zip(test.obs_names, test.obs["cell_type"]))

    # _2_
    _run("_2_prepare_sctape.py", chain_dir, fig_dir)
    truth = pd.read_csv(paths.pseudobulk_truth, index_col=0)
    tpm = pd.read_csv(paths.pseudobulk_tpm, sep="\t", index_col=0)
    counts = pd.read_csv(paths.pseudobulk_counts, sep="\t", index_col=0)
    assert truth.shape == (3, 3) and list(truth.columns) == ["alpha", "beta", "gamma"]
    np.testing.assert_allclose(truth.sum(axis=1), 1.0)
    np.testing.assert_allclose(tpm.sum(axis=1), 1e6)
    assert tpm.shape == counts.shape  # UMI counts: TPM is CPM, no gene needs a length
    assert counts.drop_duplicates().shape[0] == 3  # distinct samples
    reference = pd.read_csv(paths.sctape_reference, sep="\t", index_col=0)
    assert reference.shape == (train.n_obs, train.n_vars)
    assert list(reference.index) == list(train.obs["cell_type"].astype(str))
    np.testing.assert_array_equal(reference.to_numpy(), train.X.toarray())

    # _3_: a checkpoint that loads with weights_only=True, and a history row per epoch
    _run("_3_train_gmvae.py", chain_dir, fig_dir)
    import torch

    checkpoint = torch.load(paths.gmvae_checkpoint, weights_only=True)
    assert checkpoint["genes"] == list(train.var_names)
    assert checkpoint["cell_types"] == ["alpha", "beta", "gamma"]
    assert len(pd.read_csv(paths.gmvae_history)) == checkpoint["epoch"] >= 1
    assert bool(checkpoint["state_dict"]["post_fitted"])  # the per-type posterior Gaussian _5_ samples from
    assert float(checkpoint["state_dict"]["mean_log_ratio"].abs().sum()) > 0  # and the gene-mean calibration

    # _4_: proportions for the three pseudo-bulks, scored against their truth
    _run("_4_deconvolve_bulk.py", chain_dir, fig_dir)
    proportions = pd.read_csv(paths.proportions, index_col=0)
    assert list(proportions.index) == list(truth.index)
    assert list(proportions.columns) == ["alpha", "beta", "gamma"]
    np.testing.assert_allclose(proportions.sum(axis=1), 1.0, atol=1e-5)
    assert paths.deconvolution_metrics.exists() and (fig_dir / "proportions_scatter.png").exists()

    # _5_: cells for each bulk sample, in the reference's file layout, plus held-out metrics
    _run("_5_generate_sc.py", chain_dir, fig_dir)
    matrices = sorted(paths.generated_dir.glob("*/matrix.mtx")) or [paths.generated_dir / "matrix.mtx"]
    assert len(matrices) == 3
    for matrix_path in matrices:
        generated = io.read_dataset(matrix_path.parent, prefer_h5ad=False)
        read_10x = sc.read_10x_mtx(matrix_path.parent)
        assert list(read_10x.var_names) == list(generated.var_names)
        assert list(read_10x.obs_names) == list(generated.obs_names)
        assert (read_10x.X != generated.X).nnz == 0
        assert generated.n_obs == test.n_obs  # N_CELLS defaults to the test set's size
        assert list(generated.var_names) == list(train.var_names)
        io.check_counts(generated.X, matrix_path)
    assert paths.generated_metrics.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["fig"]  # nothing written into the current directory

    # COUNTS_FROM=draw: REPLICATES sets per sample side by side, compositions drawn from _4_'s intervals
    assert paths.proportions_lower.exists() and paths.proportions_upper.exists()
    draw = ["--COUNTS_FROM=draw", "--REPLICATES=2", "--N_CELLS=40", "--EVALUATE=false", "--FIGURES=false"]
    shutil.rmtree(paths.generated_dir)
    _run("_5_generate_sc.py", chain_dir, fig_dir, draw)
    folders = sorted(p.name for p in paths.generated_dir.iterdir() if p.is_dir())
    assert folders == sorted(f"{s}_rep{r}" for s in truth.index for r in range(2))
    drawn = {name: io.read_dataset(paths.generated_dir / name, prefer_h5ad=False) for name in folders}
    assert all(d.n_obs == 40 for d in drawn.values())
    _run("_5_generate_sc.py", chain_dir, fig_dir, draw)  # the same SEED gives the same files
    for name, first_draw in drawn.items():
        again = io.read_dataset(paths.generated_dir / name, prefer_h5ad=False)
        assert np.array_equal(again.X.toarray(), first_draw.X.toarray())
        assert list(again.obs["cell_type"]) == list(first_draw.obs["cell_type"])
    shutil.rmtree(paths.generated_dir)
    _run("_5_generate_sc.py", chain_dir, fig_dir, ["--EVALUATE=false", "--FIGURES=false"])

    # PRIOR=learned draws z from the GMVAE's own p(z|k): other cells from the same seed
    first = io.read_mtx(matrices[0]).toarray()
    _run("_5_generate_sc.py", chain_dir, fig_dir, ["--PRIOR=learned", "--EVALUATE=false", "--FIGURES=false"])
    assert io.read_mtx(matrices[0]).shape == first.shape
    assert not np.array_equal(io.read_mtx(matrices[0]).toarray(), first)
    # CALIBRATE=false leaves the decoder's means as they are: other counts again
    _run("_5_generate_sc.py", chain_dir, fig_dir, ["--CALIBRATE=false", "--EVALUATE=false", "--FIGURES=false"])
    assert not np.array_equal(io.read_mtx(matrices[0]).toarray(), first)


def test_split_with_leiden_clusters(chain_dir, tmp_path):
    """Without given labels, _1_ clusters with Leiden and writes integer cluster ids as names."""
    data_dir = tmp_path / "leiden"
    shutil.copytree(Paths(chain_dir).raw_dir, data_dir / "raw")
    (data_dir / "raw" / "cell_types.csv").unlink(missing_ok=True)
    if not (data_dir / "raw" / "matrix.mtx").exists():
        _run("_0_download_data.py", data_dir, tmp_path)
    _run("_1_split_train_test.py", data_dir, tmp_path / "fig",
         ["--LEIDEN_RESOLUTION=0.3", "--MIN_CELLS_PER_TYPE=10"])
    train = io.read_dataset(Paths(data_dir).train_dir)
    names = list(train.obs["cell_type"].cat.categories)
    assert len(names) >= 2 and all(name.isdigit() for name in names)
    clusters = pd.read_csv(Paths(data_dir).train_dir / "clusters.csv")
    assert (clusters["partition"] == clusters["cell_type"].astype(str).map({n: i for i, n in enumerate(names)})).all()
    # The simulated types are well separated: Leiden clusters should be nearly pure.
    truth = [b.split("_")[0] for b in train.obs_names]
    purity = pd.crosstab(train.obs["cell_type"], np.array(truth)).max(axis=1).sum() / train.n_obs
    assert purity > 0.9


def test_missing_input_names_the_earlier_stage(tmp_path):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, str(REPO / "_2_prepare_sctape.py"), f"--DATA_DIR={tmp_path}"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 1
    assert "GeneLength.txt" in run.stderr and "_0_download_data.py" in run.stderr


def test_split_keeps_gene_ids_of_a_two_column_genes_tsv(chain_dir, tmp_path):
    """raw/genes.tsv with ids (10x gene_id<TAB>symbol): train/ and test/ keep them, symbols name the genes."""
    data_dir = tmp_path / "ids"
    shutil.copytree(Paths(chain_dir).raw_dir, data_dir / "raw")
    paths = Paths(data_dir)
    if not paths.raw_matrix.exists():  # run alone: the end-to-end test has not filled raw/
        from models.geo import read_rdata_counts

        gene_length_table(read_rdata_counts(paths.rdata)[1]).to_csv(paths.gene_length, index=False)
        _run("_0_download_data.py", data_dir, tmp_path)
    symbols = io.read_gene_names(paths.raw_genes)
    ids = [f"ENSG{i:011d}" for i in range(len(symbols))]
    io.write_genes(paths.raw_genes, symbols, ids)
    if not paths.raw_cell_types.exists():
        barcodes = io.read_lines(paths.raw_barcodes)
        pd.DataFrame({"barcode": barcodes, "cell_type": [b.split("_")[0] for b in barcodes]}).to_csv(
            paths.raw_cell_types, index=False)
    _run("_1_split_train_test.py", data_dir, tmp_path / "fig")
    by_symbol = dict(zip(symbols, ids))
    for folder in (paths.train_dir, paths.test_dir):
        kept, kept_ids = io.read_genes(folder / "genes.tsv")
        assert kept_ids == [by_symbol[s] for s in kept] and set(kept) <= set(symbols)
        assert list(io.read_dataset(folder).var["gene_ids"]) == kept_ids
