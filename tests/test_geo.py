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
    assert io.read_gene_names(raw / "genes.tsv") == list(expected.index)
    assert (raw / "genes.tsv").read_text().splitlines()[0] == f"{expected.index[0]}\t{expected.index[0]}"
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
    assert io.read_gene_names(raw / "genes.tsv") == io.read_gene_names(shared_data / "pbmc_zheng7" / "genes.tsv")


@pytest.mark.internet
def test_geo_series_metadata_lists_the_rdata(tmp_path):
    import GEOparse

    gse = GEOparse.get_GEO(geo="GSE130148", destdir=str(tmp_path), silent=True)
    assert series_supplementary_url(gse, "_raw_counts.RData.gz").endswith("GSE130148_raw_counts.RData.gz")


# ----------------------------------------------------------------------------- failed downloads
# A local HTTP server stands in for GEO and GitHub: no test touches the network. Port 9 (discard)
# on 127.0.0.1 refuses connections at once, which is what "no network" looks like to urllib.
UNREACHABLE = "http://127.0.0.1:9/GeneLength.txt"


class _Files(dict):
    """path -> (status, body, headers) served by :func:`local_server`."""


@pytest.fixture
def local_server():
    import http.server
    import threading

    files = _Files()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            status, body, headers = files.get(self.path, (404, b"not found", {}))
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **headers}.items():
                if value is not None:
                    self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    files.base = f"http://127.0.0.1:{server.server_address[1]}"
    yield files
    server.shutdown()
    server.server_close()


def _soft(supplementary_url: str) -> bytes:
    return gzip.compress(f"^SERIES = GSE130148\n!Series_geo_accession = GSE130148\n"
                         f"!Series_supplementary_file = {supplementary_url}\n".encode())


def _assert_clean_failure(err_text: str, url: str, target: Path):
    assert url in err_text and str(target) in err_text
    assert "offline" in err_text and "place" in err_text
    assert not target.exists()
    assert not target.with_name(target.name + ".part").exists()


def test_unreachable_url_is_one_clear_error_and_leaves_no_file(tmp_path):
    from models.geo import DownloadError, download_file

    target = tmp_path / "raw" / "GeneLength.txt"
    with pytest.raises(DownloadError) as err:
        download_file(UNREACHABLE, target, offline_hint="To run offline, place GeneLength.txt at ...")
    _assert_clean_failure(str(err.value), UNREACHABLE, target)
    assert "no connection" in str(err.value)


@pytest.mark.parametrize("case, served, problem", [
    ("http_error", (503, b"busy", {}), "HTTP 503"),
    ("missing", None, "HTTP 404"),
    ("short_body", (200, b"Gene name,Tr", {"Content-Length": "5000"}), "truncated: received 12 of 5,000 bytes"),
])
def test_http_errors_and_truncation_are_refused(tmp_path, local_server, case, served, problem):
    from models.geo import DownloadError, download_file

    if served is not None:
        local_server["/GeneLength.txt"] = served
    url = local_server.base + "/GeneLength.txt"
    target = tmp_path / "GeneLength.txt"
    with pytest.raises(DownloadError, match=problem) as err:
        download_file(url, target, offline_hint="To run offline, place it at ...")
    _assert_clean_failure(str(err.value), url, target)


def test_truncated_gzip_without_content_length_is_refused(tmp_path, local_server):
    from models.geo import DownloadError, download_file, gzip_complete

    whole = (DATA / "tiny_counts.RData.gz").read_bytes()
    local_server["/x.RData.gz"] = (200, whole[:len(whole) // 2], {"Content-Length": None})
    target = tmp_path / "x.RData.gz"
    url = local_server.base + "/x.RData.gz"
    with pytest.raises(DownloadError, match="do not decompress to the end") as err:
        download_file(url, target, offline_hint="To run offline, place it ...")
    _assert_clean_failure(str(err.value), url, target)
    assert gzip_complete(DATA / "tiny_counts.RData.gz")


def test_stage0_downloads_through_a_local_server(tmp_path, local_server, monkeypatch):
    """The whole online path (SOFT -> supplementary URL -> RData, GeneLength), against 127.0.0.1."""
    import models.geo as geo

    gene_length = b"Gene name,Transcript start (bp),Transcript end (bp)\nGENE_A,1,100\n"
    rdata_url = local_server.base + "/suppl/GSE130148_raw_counts.RData.gz"
    local_server["/soft/GSE130148_family.soft.gz"] = (200, _soft(rdata_url), {})
    local_server["/suppl/GSE130148_raw_counts.RData.gz"] = (200, (DATA / "tiny_counts.RData.gz").read_bytes(), {})
    local_server["/GeneLength.txt"] = (200, gene_length, {})
    monkeypatch.setattr(geo, "GEO_SOFT_URL", local_server.base + "/soft/{accession}_family.soft.gz")
    import _0_download_data as stage0

    stage0.main([f"--DATA_DIR={tmp_path}", f"--GENE_LENGTH_URL={local_server.base}/GeneLength.txt"])
    raw = tmp_path / "raw"
    assert (raw / "GeneLength.txt").read_bytes() == gene_length
    assert (raw / "GSE130148_raw_counts.RData.gz").read_bytes() == (DATA / "tiny_counts.RData.gz").read_bytes()
    assert io.read_mtx(raw / "matrix.mtx").shape == pd.read_csv(DATA / "tiny_counts_expected.csv", index_col=0).shape
    assert not list(raw.rglob("*.part"))


def _run_stage0(data_dir: Path, *args: str):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "_0_download_data.py"
    return subprocess.run([sys.executable, str(script), f"--DATA_DIR={data_dir}", *args],
                          capture_output=True, text=True, timeout=120)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


def test_stage0_unreachable_gene_length_url_exits_1_with_one_line(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(DATA / "tiny_counts.RData.gz", raw / "GSE130148_raw_counts.RData.gz")
    run = _run_stage0(tmp_path, f"--GENE_LENGTH_URL={UNREACHABLE}")
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    (line,) = _error_lines(run.stderr)
    _assert_clean_failure(line, UNREACHABLE, raw / "GeneLength.txt")
    assert str(raw / "GSE130148_raw_counts.RData.gz") in line  # the other file to place offline
    assert not (raw / "matrix.mtx").exists()


def test_stage0_geo_unreachable_exits_1_naming_the_accession(tmp_path):
    """GEO itself unreachable (the default URL, no network here or a refused local port)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "GeneLength.txt").write_text("Gene name,Transcript start (bp),Transcript end (bp)\nGENE_A,1,100\n")
    # Point the SOFT URL at the refused port via the module constant, in a subprocess.
    import subprocess
    import sys

    code = ("import models.geo as g; g.GEO_SOFT_URL = 'http://127.0.0.1:9/{accession}_family.soft.gz'; "
            "import _0_download_data as s; from models.utils import run_stage; "
            f"run_stage(s.main, ['--DATA_DIR={tmp_path}'])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    (line,) = _error_lines(run.stderr)
    _assert_clean_failure(line, "http://127.0.0.1:9/GSE130148_family.soft.gz", raw / "geo" / "GSE130148_family.soft.gz")
    assert "GSE130148" in line and str(raw / "GSE130148_raw_counts.RData.gz") in line
    assert not (raw / "GSE130148_raw_counts.RData.gz").exists()


@pytest.mark.parametrize("soft_body, problem", [
    (b"not gzip at all", "do not decompress"),  # a proxy's HTML page in place of the SOFT
    (None, "expected one supplementary file"),  # a series without the RData (wrong accession)
])
def test_stage0_bad_geo_metadata_is_one_error(tmp_path, local_server, monkeypatch, caplog, soft_body, problem):
    import models.geo as geo
    from models.utils import run_stage

    local_server["/soft/GSE130148_family.soft.gz"] = (200, soft_body or _soft(local_server.base + "/other.h5"), {})
    monkeypatch.setattr(geo, "GEO_SOFT_URL", local_server.base + "/soft/{accession}_family.soft.gz")
    import _0_download_data as stage0

    with pytest.raises(SystemExit) as exit_:
        run_stage(stage0.main, [f"--DATA_DIR={tmp_path}"])
    assert exit_.value.code == 1
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert problem in record.getMessage() and "place" in record.getMessage()
    raw = tmp_path / "raw"
    assert not (raw / "GSE130148_raw_counts.RData.gz").exists()
    assert not (raw / "geo" / "GSE130148_family.soft.gz").exists()  # a bad SOFT is not kept for the next run
    assert not list(raw.rglob("*.part"))


def test_stage0_geoparse_failure_is_one_error(tmp_path, monkeypatch, caplog):
    """GEOparse raising on a SOFT file (its bare Exception) becomes the one-line error."""
    import GEOparse

    from models.utils import run_stage

    soft = tmp_path / "raw" / "geo" / "GSE130148_family.soft.gz"
    soft.parent.mkdir(parents=True)
    soft.write_bytes(_soft("http://127.0.0.1:9/GSE130148_raw_counts.RData.gz"))

    def broken(*args, **kwargs):
        raise Exception("Unknown GEO type")  # noqa: TRY002 - what GEOparse raises

    monkeypatch.setattr(GEOparse, "get_GEO", broken)
    import _0_download_data as stage0

    with pytest.raises(SystemExit):
        run_stage(stage0.main, [f"--DATA_DIR={tmp_path}"])
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "GSE130148" in record.getMessage() and "cannot parse" in record.getMessage()
    assert "place" in record.getMessage() and not soft.exists()


def test_malformed_accession_is_refused_with_the_offline_hint(tmp_path):
    from models.geo import DownloadError, download_series_file

    target = tmp_path / "GSE_raw_counts.RData.gz"
    with pytest.raises(DownloadError, match=r"GEO_ACCESSION='foo' is not a GEO series accession.*place it"):
        download_series_file("foo", "_raw_counts.RData.gz", target, tmp_path / "geo", offline_hint="place it")
    assert not target.exists()
