"""Dataset folders, atomic writes and count checks."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from models import io
from models.utils import InputError


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


def test_dataset_round_trip_mtx_and_h5ad_agree(tmp_path, tiny_adata):
    io.write_dataset(tiny_adata, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "barcodes.tsv", "cells.h5ad", "clusters.csv", "genes.tsv", "matrix.mtx"]
    from_h5ad = io.read_dataset(tmp_path)
    from_mtx = io.read_dataset(tmp_path, prefer_h5ad=False)
    for adata in (from_h5ad, from_mtx):
        assert (adata.X != tiny_adata.X).nnz == 0
        assert list(adata.var_names) == list(tiny_adata.var_names)
        assert list(adata.obs_names) == list(tiny_adata.obs_names)
        assert list(adata.obs["cell_type"].cat.categories) == ["alpha", "beta", "gamma"]
        np.testing.assert_array_equal(adata.obs["partition"], tiny_adata.obs["partition"])
    mtx_header = (tmp_path / "matrix.mtx").read_text().splitlines()[0]
    assert "integer" in mtx_header
    assert io.read_mtx(tmp_path / "matrix.mtx").shape == (tiny_adata.n_vars, tiny_adata.n_obs)  # genes x cells
    clusters = pd.read_csv(tmp_path / "clusters.csv")
    assert list(clusters.columns) == ["partition", "cell_type"]


def test_type_order_is_numeric_for_cluster_ids():
    assert io.type_order(["10", "2", "0", "2"]) == ["0", "2", "10"]
    assert io.type_order(["NK", "B", "NK"]) == ["B", "NK"]
    codes, order = io.encode_labels(["10", "2", "0"])
    assert order == ["0", "2", "10"] and codes.tolist() == [2, 1, 0]


def test_missing_dataset_names_the_stage(tmp_path):
    with pytest.raises(InputError, match=r"matrix.mtx.*run _1_split_train_test.py first"):
        io.read_dataset(tmp_path / "train")


@pytest.mark.parametrize("values, message", [
    ([1.0, 2.5], "not integers"),
    ([1.0, -1.0], "negative"),
    ([1.0, np.nan], "NaN"),
])
def test_check_counts_rejects_non_counts(values, message):
    with pytest.raises(InputError, match=f"counts.mtx.*{message}"):
        io.check_counts(sp.csr_matrix(np.array([values])), "counts.mtx")


def test_mtx_with_wrong_shape_is_refused(tmp_path, tiny_adata):
    io.write_dataset(tiny_adata, tmp_path, write_h5ad=False)
    io.write_lines(tmp_path / "genes.tsv", list(tiny_adata.var_names)[:-1])
    with pytest.raises(InputError, match="does not match"):
        io.read_dataset(tmp_path)


def test_read_type_order_follows_partition_codes(tmp_path):
    path = tmp_path / "clusters.csv"
    pd.DataFrame({"partition": [1, 0, 1, 2], "cell_type": ["NK", "B", "NK", "T"]}).to_csv(path, index=False)
    assert io.read_type_order(path) == ["B", "NK", "T"]
    pd.DataFrame({"partition": [0, 1], "cell_type": ["NK", "NK"]}).to_csv(path, index=False)
    with pytest.raises(InputError, match="one to one"):
        io.read_type_order(path)
    with pytest.raises(InputError, match="run _1_split_train_test.py"):
        io.read_type_order(tmp_path / "absent.csv")


# ----------------------------------------------------------------------------- 10x genes.tsv
def assert_reads_with_scanpy(folder, expected):
    """``scanpy.read_10x_mtx(folder)`` gives ``expected``'s genes, barcodes and counts."""
    import scanpy as sc

    read = sc.read_10x_mtx(folder)
    assert list(read.var_names) == list(expected.var_names)
    assert list(read.obs_names) == list(expected.obs_names)
    assert (sp.csr_matrix(read.X) != sp.csr_matrix(expected.X)).nnz == 0
    return read


def test_genes_tsv_is_10x_two_column_and_both_forms_read(tmp_path, tiny_adata):
    io.write_dataset(tiny_adata, tmp_path, write_h5ad=False)
    first = (tmp_path / "genes.tsv").read_text().splitlines()[0]
    assert first == f"{tiny_adata.var_names[0]}\t{tiny_adata.var_names[0]}"  # no id known: the symbol twice
    assert io.read_genes(tmp_path / "genes.tsv") == (list(tiny_adata.var_names), None)
    io.write_lines(tmp_path / "genes.tsv", tiny_adata.var_names)  # the older one-column form
    assert io.read_genes(tmp_path / "genes.tsv") == (list(tiny_adata.var_names), None)
    assert list(io.read_dataset(tmp_path).var_names) == list(tiny_adata.var_names)


def test_gene_ids_are_read_from_the_first_column_and_kept(tmp_path, tiny_adata):
    ids = [f"ENSG{i:011d}" for i in range(tiny_adata.n_vars)]
    io.write_dataset(tiny_adata, tmp_path / "raw", write_h5ad=False)
    io.write_genes(tmp_path / "raw" / "genes.tsv", tiny_adata.var_names, ids)
    adata = io.read_dataset(tmp_path / "raw", prefer_h5ad=False)
    assert list(adata.var_names) == list(tiny_adata.var_names)  # symbols (10x column 2) name the genes
    assert list(adata.var["gene_ids"]) == ids
    io.write_dataset(adata[:, 5:].copy(), tmp_path / "train")  # a subset keeps its ids, in both files
    assert io.read_genes(tmp_path / "train" / "genes.tsv") == (list(tiny_adata.var_names[5:]), ids[5:])
    assert list(io.read_dataset(tmp_path / "train").var["gene_ids"]) == ids[5:]
    read = assert_reads_with_scanpy(tmp_path / "train", adata[:, 5:])
    assert list(read.var["gene_ids"]) == ids[5:]
    assert io.known_gene_ids(tmp_path / "train", tiny_adata.var_names[7:9]) == ids[7:9]
    assert io.known_gene_ids(tmp_path / "train", ["NOT_A_GENE"]) is None


def test_ragged_genes_tsv_is_refused(tmp_path):
    (tmp_path / "genes.tsv").write_text("ENSG1\tA\nB\n")
    with pytest.raises(InputError, match=r"genes.tsv: rows have \[1, 2\] columns"):
        io.read_genes(tmp_path / "genes.tsv")


def test_train_and_test_split_read_with_scanpy(tiny_split_dir):
    """What _1_ writes (write_dataset) opens with scanpy.read_10x_mtx and equals cells.h5ad."""
    import anndata as ad

    for split in ("train", "test"):
        folder = tiny_split_dir / split
        assert_reads_with_scanpy(folder, ad.read_h5ad(folder / "cells.h5ad"))


def test_generated_folder_reads_with_scanpy(tmp_path):
    import anndata as ad
    import torch

    from models import generate

    n_types, n_genes = 3, 30
    mu = torch.as_tensor(np.random.default_rng(0).lognormal(0.0, 1.0, (n_types, n_genes)), dtype=torch.float32)
    sampler = generate.NBBaselineSampler(mu, torch.full((n_types, n_genes), 2.0))
    genes = [f"G{i}" for i in range(n_genes)]
    ids = [f"ENSG{i:011d}" for i in range(n_genes)]
    for name, gene_ids in (("plain", None), ("with_ids", ids)):
        generate.write_generated(tmp_path / name, sampler, genes, ["a", "b", "c"], [6, 0, 9], seed=1,
                                 chunk_cells=4, block_cells=2, progress=False, gene_ids=gene_ids)
        read = assert_reads_with_scanpy(tmp_path / name, ad.read_h5ad(tmp_path / name / "cells.h5ad"))
        assert list(read.var["gene_ids"]) == (gene_ids or genes)
