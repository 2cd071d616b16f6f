"""Fetching GSE130148 from GEO and reading R's ``dgCMatrix`` from an ``.RData(.gz)`` without R.

rdata 1.1.0 has no converter for the Matrix package's ``dgCMatrix``: it returns a namespace
with ``i``, ``p``, ``x``, ``Dim`` and ``Dimnames``, from which a CSC matrix is built here.
"""
from __future__ import annotations

import gzip
import logging
import re
import warnings
import zlib
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from models.io import check_counts
from models.utils import InputError

log = logging.getLogger(__name__)


def dgcmatrix_to_csc(obj, source: str | Path = "RData") -> tuple[sp.csc_matrix, list[str], list[str]]:
    """(rows x columns CSC matrix, row names, column names) from rdata's view of a dgCMatrix."""
    try:
        n_rows, n_cols = (int(v) for v in np.asarray(obj.Dim).ravel())
        indices = np.asarray(obj.i, dtype=np.int64)
        indptr = np.asarray(obj.p, dtype=np.int64)
        data = np.asarray(obj.x)
        matrix = sp.csc_matrix((data, indices, indptr), shape=(n_rows, n_cols))
        matrix.check_format(full_check=True)
    except (AttributeError, TypeError, ValueError) as err:
        raise InputError(f"{source}: the dgCMatrix is malformed ({err})") from None
    row_names, col_names = _dimnames(obj, n_rows, n_cols, source)
    return matrix, row_names, col_names


def _dimnames(obj, n_rows: int, n_cols: int, source) -> tuple[list[str], list[str]]:
    dimnames = getattr(obj, "Dimnames", None)
    if dimnames is None or len(dimnames) != 2 or dimnames[0] is None or dimnames[1] is None:
        raise InputError(f"{source}: the dgCMatrix has no row/column names (genes and barcodes are needed)")
    rows, cols = [str(v) for v in dimnames[0]], [str(v) for v in dimnames[1]]
    if len(rows) != n_rows or len(cols) != n_cols:
        raise InputError(f"{source}: dimnames ({len(rows)}, {len(cols)}) do not match Dim ({n_rows}, {n_cols})")
    return rows, cols


def _is_dgcmatrix(value) -> bool:
    cls = getattr(value, "class", None) if not isinstance(value, dict) else None
    names = [str(c) for c in np.atleast_1d(cls)] if cls is not None else []
    return "dgCMatrix" in names or all(hasattr(value, a) for a in ("i", "p", "x", "Dim"))


def _describe(value) -> str:
    cls = getattr(value, "class", None)
    if cls is not None:
        return "/".join(str(c) for c in np.atleast_1d(cls))
    return type(value).__name__


def read_rdata_counts(path: str | Path, name: str | None = "raw_counts") -> tuple[sp.csc_matrix, list[str], list[str]]:
    """Read a genes x cells ``dgCMatrix`` of raw counts from an ``.RData`` / ``.RData.gz`` file.

    ``name`` picks the object (falls back to the only dgCMatrix in the file). Counts must be
    non-negative integers. Returns (genes x cells CSC int64, genes, barcodes).
    """
    import rdata

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        # rdata decompresses nested gzip itself (GEO's .RData.gz wraps an already-gzipped save()).
        parsed = rdata.parser.parse_file(path)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Missing constructor", category=UserWarning)
            objects = rdata.conversion.convert(parsed)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError, NotImplementedError, KeyError,
            IndexError, TypeError, AssertionError) as err:
        raise InputError(f"{path}: cannot read as an R data file; it may be truncated or corrupt "
                         f"({type(err).__name__}: {err}). Delete it and rerun to download it again, "
                         "or place a complete copy there") from None
    if not isinstance(objects, dict):
        raise InputError(f"{path}: expected an R save() file of named objects, found {type(objects).__name__}")
    matrices = {key: value for key, value in objects.items() if _is_dgcmatrix(value)}
    if not matrices:
        found = ", ".join(f"{key} ({_describe(value)})" for key, value in objects.items()) or "nothing"
        raise InputError(f"{path}: holds no sparse count matrix (dgCMatrix); found: {found}")
    if name in matrices:
        key = name
    elif len(matrices) == 1:
        key = next(iter(matrices))
    else:
        raise InputError(f"{path}: no object {name!r}, and several dgCMatrix objects: {sorted(matrices)}")
    matrix, genes, barcodes = dgcmatrix_to_csc(matrices[key], path)
    check_counts(matrix, path)
    log.info("read %s: %s, %d genes x %d cells, %d nonzero", path.name, key, *matrix.shape, matrix.nnz)
    return matrix.astype(np.int64), genes, barcodes


def series_supplementary_url(gse, pattern: str) -> str:
    """The series-level supplementary file whose name contains ``pattern`` (GEOparse GSE object)."""
    urls = [str(u) for u in gse.metadata.get("supplementary_file", [])]
    matches = [u for u in urls if pattern in u.rsplit("/", 1)[-1]]
    if len(matches) != 1:
        raise InputError(f"GEO {gse.name}: expected one supplementary file matching {pattern!r}, found {urls}")
    # GEO lists ftp:// links; https on the same host serves the same files through proxies.
    return matches[0].replace("ftp://ftp.ncbi.nlm.nih.gov", "https://ftp.ncbi.nlm.nih.gov")


GEO_SOFT_URL = "https://ftp.ncbi.nlm.nih.gov/geo/series/{prefix}nnn/{accession}/soft/{accession}_family.soft.gz"
TIMEOUT_S = 60  # seconds without a byte before a download counts as failed


class DownloadError(InputError):
    """A failed fetch; the message names the URL, the file it would have written and the offline fix."""


def soft_url(accession: str) -> str:
    """The series' SOFT file on GEO (https, so it passes proxies, unlike GEOparse's ftp://)."""
    given, accession = accession, accession.strip().upper()
    if not re.fullmatch(r"GSE\d+", accession):
        raise InputError(f"GEO_ACCESSION={given!r} is not a GEO series accession (GSE followed by digits)")
    return GEO_SOFT_URL.format(prefix=re.sub(r"\d{1,3}$", "", accession), accession=accession)


def download_series_file(accession: str, pattern: str, target: Path, soft_dir: Path, offline_hint: str = "") -> Path:
    """Download GEO series ``accession``'s supplementary file matching ``pattern`` to ``target``.

    The SOFT metadata is fetched here (https, checked like any download) and parsed with
    GEOparse; its series-level ``supplementary_file`` gives the URL (GEOparse's
    ``download_supplementary_files`` only fetches per-sample files). Any failure is a
    :class:`DownloadError` naming the URL or accession, ``target`` and ``offline_hint``.
    """
    try:
        url = soft_url(accession)
    except InputError as err:
        raise DownloadError(f"{err}; it names the series whose file becomes {target}. {offline_hint}") from None
    soft = soft_dir / f"{accession.strip().upper()}_family.soft.gz"
    if not soft.exists():
        download_file(url, soft, offline_hint=offline_hint,
                      purpose=f"GEO {accession}'s metadata, which gives the URL of {target.name}; "
                              "a 404 means GEO_ACCESSION is wrong")
    gse = parse_soft(soft, accession, target, offline_hint)
    try:
        file_url = series_supplementary_url(gse, pattern)
    except InputError as err:
        soft.unlink(missing_ok=True)  # fetched again next time, in case it was the wrong one
        raise DownloadError(f"{err}; check GEO_ACCESSION and RDATA_PATTERN. {offline_hint}") from None
    return download_file(file_url, target, offline_hint=offline_hint)


def parse_soft(soft: Path, accession: str, target: Path, offline_hint: str = ""):
    """GEOparse's GSE object of a downloaded SOFT file; a damaged file is removed and refused."""
    import GEOparse

    geoparse_log = logging.getLogger("GEOparse")
    level = geoparse_log.level
    geoparse_log.setLevel(logging.ERROR)  # GEOparse logs at DEBUG, with tracebacks, on its own handler
    try:
        return GEOparse.get_GEO(filepath=str(soft), silent=True)
    except Exception as err:  # noqa: BLE001 - GEOparse raises bare Exception/OSError/EOFError alike
        soft.unlink(missing_ok=True)
        raise DownloadError(f"GEO {accession}: cannot parse its SOFT metadata {soft} ({type(err).__name__}: {err}); "
                            f"removed it, rerun to download it again, or check GEO_ACCESSION. {offline_hint}") from None
    finally:
        geoparse_log.setLevel(level)


def download_file(url: str, target: Path, offline_hint: str = "", purpose: str = "",
                  timeout: float = TIMEOUT_S, chunk_bytes: int = 1 << 20) -> Path:
    """Download ``url`` to ``target`` via ``target.part``, renamed into place only when complete.

    Complete means the server's Content-Length (when it gives one) was received, and a
    ``.gz`` target decompresses to its end. Any failure (no network, HTTP error, timeout,
    truncation) removes the ``.part`` and raises :class:`DownloadError` naming ``url``,
    ``target`` and ``offline_hint`` (which file to place where to run offline).
    """
    import http.client
    import urllib.error
    import urllib.request

    from tqdm import tqdm

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    partial.unlink(missing_ok=True)  # a leftover from an interrupted run is not a download
    log.info("downloading %s -> %s", url, target)

    def fail(problem: str) -> DownloadError:
        partial.unlink(missing_ok=True)
        what = f" ({purpose})" if purpose else ""
        return DownloadError(f"cannot download {url}{what} to {target}: {problem}. {offline_hint}".rstrip())

    try:
        request = urllib.request.Request(url, headers={"User-Agent": "bulk2sc"})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(partial, "wb") as out:
            expected = response.headers.get("Content-Length")
            expected = int(expected) if expected and expected.isdigit() else None
            with tqdm(total=expected, unit="B", unit_scale=True, desc=target.name, leave=False) as bar:
                while chunk := response.read(chunk_bytes):
                    out.write(chunk)
                    bar.update(len(chunk))
            received = out.tell()
    except urllib.error.HTTPError as err:
        raise fail(f"HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise fail(f"no connection ({err.reason}); no network, a proxy, or a wrong URL") from None
    except (OSError, ValueError, http.client.HTTPException) as err:  # timeouts, resets, bad URLs, a full disk
        raise fail(f"{type(err).__name__}: {err}") from None
    except BaseException:
        partial.unlink(missing_ok=True)  # Ctrl-C: leave nothing behind
        raise
    if expected is not None and received != expected:
        raise fail(f"truncated: received {received:,} of {expected:,} bytes")
    if target.name.endswith(".gz") and not gzip_complete(partial):
        raise fail(f"truncated or corrupt: {received:,} bytes that do not decompress to the end")
    partial.replace(target)
    return target


def gzip_complete(path: Path) -> bool:
    """Whether a gzip file decompresses to its end (every member, CRC checked)."""
    try:
        with gzip.open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass
        return True
    except (OSError, EOFError, zlib.error):
        return False
