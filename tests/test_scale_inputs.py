"""Stages 1 and 2 at atlas scale: no densified matrix in _1_, a capped scTAPE reference in _2_."""
from __future__ import annotations

import shutil
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import gene_length_table
from models import geo
from models.paths import Paths
from models.split import cap_per_type

DATA = Path(__file__).parent / "data"


def test_cap_per_type_is_seeded_and_keeps_small_types_whole():
    types = np.array(["a"] * 50 + ["b"] * 5 + ["c"] * 20)
    kept = cap_per_type(types, 10, seed=1)
    assert list(pd.Series(types[kept]).value_counts().sort_index()) == [10, 5, 10]
    assert np.array_equal(kept, np.sort(kept)) and np.array_equal(kept, cap_per_type(types, 10, seed=1))
    assert not np.array_equal(kept, cap_per_type(types, 10, seed=2))
    assert len(cap_per_type(types, 0)) == 75


def test_stage_2_caps_the_reference_table_per_type(tiny_split_dir, tmp_path):
    import _2_prepare_sctape as stage2

    data_dir = tmp_path / "data"
    shutil.copytree(tiny_split_dir, data_dir)
    stage2.main([f"--DATA_DIR={data_dir}", "--N_PSEUDOBULK=2", "--REFERENCE_CELLS_PER_TYPE=20"])
    reference = pd.read_csv(Paths(data_dir).sctape_reference, sep="\t", index_col=0)
    assert reference.index.value_counts().to_dict() == {"alpha": 20, "beta": 20, "gamma": 20}


@pytest.fixture()
def raw_with_labels(tmp_path):
    import _0_download_data as stage0

    paths = Paths(tmp_path)
    paths.raw_dir.mkdir(parents=True)
    shutil.copy(DATA / "sim_counts.RData.gz", paths.rdata)
    _, genes, barcodes = geo.read_rdata_counts(paths.rdata)
    gene_length_table(genes).to_csv(paths.gene_length, index=False)
    stage0.main([f"--DATA_DIR={tmp_path}"])
    pd.DataFrame({"barcode": barcodes, "cell_type": [b.split("_")[0] for b in barcodes]}).to_csv(
        paths.raw_cell_types, index=False)
    return tmp_path, len(genes)


def test_stage_1_with_given_labels_never_densifies_the_matrix(raw_with_labels, monkeypatch):
    """No dense array with every gene is made (scrublet densifies only its variable-gene subset)."""
    import scipy.sparse._compressed as compressed
    import scipy.sparse._coo as coo

    import _1_split_train_test as stage1

    data_dir, n_genes = raw_with_labels
    dense_shapes = []

    def recording(real):
        def toarray(self, *args, **kwargs):
            if self.shape[1] >= n_genes - 10:  # QC may drop a few genes
                dense_shapes.append((self.shape, traceback.format_stack(limit=4)[0]))
            return real(self, *args, **kwargs)
        return toarray

    for cls in (compressed._cs_matrix, coo._coo_base):  # where scipy's toarray (and todense) really run
        monkeypatch.setattr(cls, "toarray", recording(cls.toarray))
    stage1.main([f"--DATA_DIR={data_dir}", f"--FIG_DIR={data_dir / 'fig'}", "--MIN_GENES=10", "--MAX_COUNTS=100000",
                 "--MAX_GENES=100000", "--N_PCS=10", "--N_TOP_GENES=100"])
    assert dense_shapes == []
    from models import io

    io.read_dataset(Paths(data_dir).train_dir).X.toarray()  # the probe does see a densified matrix
    assert len(dense_shapes) == 1
