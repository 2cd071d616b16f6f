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
