"""The RData reader (R dgCMatrix -> scipy) and stage _0_ offline, on tiny RData files made with R."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models import io
from models.geo import read_rdata_counts, series_supplementary_url
from models.utils import InputError

DATA = Path(__file__).parent / "data"


def test_reads_dgcmatrix_exactly_as_r_wrote_it():
    counts, genes, barcodes = read_rdata_counts(DATA / "tiny_counts.RData.gz")
    expected = pd.read_csv(DATA / "tiny_counts_expected.csv", index_col=0)
    assert genes == list(expected.index)
    assert barcodes == list(expected.columns)
    np.testing.assert_array_equal(counts.toarray(), expected.to_numpy())
    assert counts.dtype == np.int64


def test_no_sparse_matrix_lists_what_was_found():
    with pytest.raises(InputError, match=r"no_matrix.RData.gz.*no sparse count matrix.*metadata.*notes"):
        read_rdata_counts(DATA / "no_matrix.RData.gz")


def test_fractional_counts_are_refused():
    with pytest.raises(InputError, match=r"fractional_counts.RData.gz.*not integers"):
        read_rdata_counts(DATA / "fractional_counts.RData.gz")


@pytest.mark.parametrize("keep_bytes", [40, 150])
def test_truncated_file_is_refused_with_its_name(tmp_path, keep_bytes):
    truncated = tmp_path / "GSE_truncated.RData.gz"
    truncated.write_bytes((DATA / "tiny_counts.RData.gz").read_bytes()[:keep_bytes])
    with pytest.raises(InputError, match="GSE_truncated.RData.gz.*truncated or corrupt"):
        read_rdata_counts(truncated)


# rdata guesses at the garbage ("assumed RDS", "wrong extension") before failing; expected here.
@pytest.mark.filterwarnings("ignore:Unknown file type:UserWarning", "ignore:Wrong extension:UserWarning")
def test_not_gzip_garbage_is_refused(tmp_path):
    garbage = tmp_path / "garbage.RData.gz"
    garbage.write_bytes(gzip.compress(b"this is not an R file at all" * 10))
    with pytest.raises(InputError, match="garbage.RData.gz"):
        read_rdata_counts(garbage)


class _FakeGSE:
    name = "GSE130148"
    metadata = {"supplementary_file": [
        "ftp://ftp.ncbi.nlm.nih.gov/geo/series/GSE130nnn/GSE130148/suppl/GSE130148_barcodes_cell_types.txt.gz",
        "ftp://ftp.ncbi.nlm.nih.gov/geo/series/GSE130nnn/GSE130148/suppl/GSE130148_raw_counts.RData.gz",
    ]}


def test_series_file_is_picked_from_series_metadata():
    url = series_supplementary_url(_FakeGSE(), "_raw_counts.RData.gz")
    assert url.endswith("/GSE130148/suppl/GSE130148_raw_counts.RData.gz")
    with pytest.raises(InputError, match="expected one supplementary file"):
        series_supplementary_url(_FakeGSE(), ".h5")


def _stage0(tmp_path, rdata: Path):
    import _0_download_data as stage0

    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(rdata, raw / "GSE130148_raw_counts.RData.gz")
    (raw / "GeneLength.txt").write_text("Gene name,Transcript start (bp),Transcript end (bp)\nGENE_A,1,100\n")
    return stage0, raw


def test_stage0_runs_offline_when_inputs_are_present(tmp_path, monkeypatch):
    stage0, raw = _stage0(tmp_path, DATA / "tiny_counts.RData.gz")

    def no_network(*args, **kwargs):
        raise AssertionError("stage 0 touched the network although its inputs exist")

    monkeypatch.setattr(stage0, "download_series_file", no_network)
    monkeypatch.setattr(stage0, "download_file", no_network)
    stage0.main([f"--DATA_DIR={tmp_path}"])
    matrix = io.read_mtx(raw / "matrix.mtx")
    expected = pd.read_csv(DATA / "tiny_counts_expected.csv", index_col=0)
    np.testing.assert_array_equal(matrix.toarray(), expected.to_numpy())
    assert io.read_lines(raw / "genes.tsv") == list(expected.index)
    assert io.read_lines(raw / "barcodes.tsv") == list(expected.columns)
    assert "integer" in (raw / "matrix.mtx").read_text().splitlines()[0]


def test_stage0_truncated_rdata_leaves_no_matrix(tmp_path):
    import subprocess
    import sys

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "GSE130148_raw_counts.RData.gz").write_bytes((DATA / "tiny_counts.RData.gz").read_bytes()[:120])
    (raw / "GeneLength.txt").write_text("Gene name,Transcript start (bp),Transcript end (bp)\n")
    script = Path(__file__).resolve().parents[1] / "_0_download_data.py"
    run = subprocess.run([sys.executable, str(script), f"--DATA_DIR={tmp_path}"], capture_output=True, text=True)
    assert run.returncode == 1
    assert "GSE130148_raw_counts.RData.gz" in run.stderr and "truncated or corrupt" in run.stderr
    assert sorted(p.name for p in raw.iterdir()) == ["GSE130148_raw_counts.RData.gz", "GeneLength.txt"]


def test_stage0_on_the_geo_fixture(shared_data, tmp_path):
    stage0, raw = _stage0(tmp_path, shared_data / "geo_fixture" / "GSE130148_raw_counts.RData.gz")
    stage0.main([f"--DATA_DIR={tmp_path}"])
    matrix = io.read_mtx(raw / "matrix.mtx")
    assert matrix.shape == (8846, 3500)
    assert io.read_lines(raw / "genes.tsv") == io.read_lines(shared_data / "pbmc_zheng7" / "genes.tsv")


@pytest.mark.internet
def test_geo_series_metadata_lists_the_rdata(tmp_path):
    import GEOparse

    gse = GEOparse.get_GEO(geo="GSE130148", destdir=str(tmp_path), silent=True)
    assert series_supplementary_url(gse, "_raw_counts.RData.gz").endswith("GSE130148_raw_counts.RData.gz")
