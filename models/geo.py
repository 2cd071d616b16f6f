"""Fetching GSE130148 from GEO and reading R's ``dgCMatrix`` from an ``.RData(.gz)`` without R.

rdata 1.1.0 has no converter for the Matrix package's ``dgCMatrix``: it returns a namespace
with ``i``, ``p``, ``x``, ``Dim`` and ``Dimnames``, from which a CSC matrix is built here.
"""
from __future__ import annotations

import gzip
import logging
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
                         f"({type(err).__name__}: {err}). Delete it and rerun to download it again") from None
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


def download_series_file(accession: str, pattern: str, target: Path, soft_dir: Path) -> Path:
    """Download GEO series ``accession``'s supplementary file matching ``pattern`` to ``target``.

    Uses GEOparse (SOFT metadata -> series-level ``supplementary_file``). ``download_supplementary_files``
    only fetches per-sample files, so the URL is taken from the metadata instead.
    """
    import GEOparse
    from GEOparse.utils import download_from_url

    soft_dir.mkdir(parents=True, exist_ok=True)
    gse = GEOparse.get_GEO(geo=accession, destdir=str(soft_dir), silent=True)
    url = series_supplementary_url(gse, pattern)
    return download_file(url, target)


def download_file(url: str, target: Path) -> Path:
    """Download ``url`` to ``target`` via a ``.part`` file, so an interrupted download is not kept."""
    from GEOparse.utils import download_from_url

    partial = target.with_name(target.name + ".part")
    partial.unlink(missing_ok=True)  # a leftover from an interrupted run is not a download
    log.info("downloading %s", url)
    download_from_url(url, str(partial), force=True, silent=True)
    partial.replace(target)
    return target
