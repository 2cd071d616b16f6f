"""Reading and writing the files stages pass to each other, with atomic writes.

A dataset folder (``raw/``, ``train/``, ``test/``, ``generated/``) holds

- ``matrix.mtx``  integer raw counts, genes x cells (10x / original bulk2sc orientation)
- ``genes.tsv``   10x's two columns, ``gene_id<TAB>symbol`` (the symbol twice where no id is
  known), so ``scanpy.read_10x_mtx`` and Seurat's ``Read10X`` open the folder; one-column
  files (a symbol per line) are read too. ``barcodes.tsv`` one barcode per line
- ``clusters.csv`` columns ``partition`` (0..K-1) and ``cell_type``, one row per barcode
- ``cells.h5ad``  the same cells x genes, raw counts in ``X``, ``obs["cell_type"]``

In memory a dataset is always an AnnData of cells x genes with CSR counts (scanpy convention).
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from models.paths import BARCODES, CLUSTERS, GENES, H5AD, MATRIX
from models.utils import InputError, one_line

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- atomic writes
_HOST = re.sub(r"[^A-Za-z0-9]+", "_", socket.gethostname()) or "host"


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{_HOST}-{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the temporary files of ``path`` left by killed processes of this host (kill -9, a
    power cut); a live writer's, or another host's, are kept. Returns those removed."""
    removed = []
    pattern = re.compile(re.escape(f".{path.name}.{_HOST}-") + r"(\d+)\.[^/]*\.tmp$")
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.{_HOST}-*.tmp"):
        match = pattern.match(candidate.name)
        if match and not _pid_alive(int(match.group(1))):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    A crash or error leaves the old file (or none), never a half-written one. The temporary
    name (``.<name>.<host>-<pid>.<random>.tmp``) is hidden, never read by a stage, and removed
    by the next write of ``path`` once its process is gone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_torch(obj, path: str | Path) -> None:
    """``torch.save`` atomically, through a file handle: the zip's inner folder is then always
    ``archive/`` (given a path, torch names it after the random temporary file), so the same
    tensors give the same bytes."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)


def load_torch(path: str | Path, what: str, fix: str, needed: Sequence[str] = (), device="cpu") -> dict:
    """A checkpoint dict from ``torch.load(weights_only=True)``; InputError (one line) otherwise.

    ``what`` names the checkpoint in messages ("GMVAE checkpoint"), ``fix`` says what to do, and
    ``needed`` are keys it must hold. Pickled code (``torch.save(model)``) is refused, never run.
    """
    import pickle
    import zipfile

    import torch

    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch.save writes a zip: a pickle refused inside a complete zip is pickled code, not damage
        if ("weights_only" in str(err) or "Weights only" in str(err)) and zipfile.is_zipfile(path):
            raise InputError(f"{path}: holds pickled Python objects, not only tensors (e.g. a whole model saved "
                             f"with torch.save(model)); weights_only loading refuses them, as unpickling could "
                             f"run code; {fix}") from None
        raise InputError(f"{path}: cannot read the {what}, it may be truncated or corrupt "
                         f"({type(err).__name__}: {one_line(err)[:200]}); {fix}") from None
    except Exception as err:  # zip, EOF and runtime errors come in many types
        raise InputError(f"{path}: cannot read the {what}, it may be truncated or corrupt "
                         f"({type(err).__name__}: {one_line(err)[:200]}); {fix}") from None
    if not isinstance(checkpoint, dict) or not set(needed) <= set(checkpoint):
        found = sorted(map(str, checkpoint)) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise InputError(f"{path}: not a {what} (it needs keys {sorted(needed)}, found {found}); {fix}")
    return checkpoint


def write_lines(path: Path, lines: Sequence[str]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in lines))


def read_lines(path: Path) -> list[str]:
    """One entry per line; for multi-column TSVs, the first column (barcodes; not gene names:
    :func:`read_genes` takes a 10x genes.tsv's symbol column)."""
    with open(path) as handle:
        return [line.rstrip("\n").split("\t")[0] for line in handle if line.strip()]


def gene_lines(symbols: Sequence[str], gene_ids: Sequence[str] | None = None) -> list[str]:
    """10x ``genes.tsv`` lines, ``gene_id<TAB>symbol``; the symbol stands in for unknown ids."""
    symbols = [str(s) for s in symbols]
    ids = symbols if gene_ids is None else [str(g) if str(g) else s for g, s in zip(gene_ids, symbols)]
    if len(ids) != len(symbols):
        raise ValueError(f"{len(ids)} gene ids for {len(symbols)} symbols")
    return [f"{gene_id}\t{symbol}" for gene_id, symbol in zip(ids, symbols)]


def write_genes(path: Path, symbols: Sequence[str], gene_ids: Sequence[str] | None = None) -> None:
    """A 10x ``genes.tsv`` (see :func:`gene_lines`), written atomically."""
    write_lines(path, gene_lines(symbols, gene_ids))


def read_genes(path: Path) -> tuple[list[str], list[str] | None]:
    """(symbols, ids or None) of a ``genes.tsv`` / ``features.tsv``.

    One column: symbols (the pipeline's gene names), no ids. Two or more (10x: id, symbol,
    feature type): the second column is the symbol, the first the id; ids are None when every
    id equals its symbol (what the pipeline writes where it knows no id).
    """
    import gzip

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        rows = [line.rstrip("\n").split("\t") for line in handle if line.strip()]
    widths = {len(row) for row in rows}
    if len(widths) > 1:
        raise InputError(f"{path}: rows have {sorted(widths)} columns; one gene per line, or 10x's "
                         "gene_id<TAB>symbol on every line")
    if not rows or widths == {1}:
        return [row[0] for row in rows], None
    ids, symbols = [row[0] for row in rows], [row[1] for row in rows]
    return symbols, (None if ids == symbols else ids)


def read_gene_names(path: Path) -> list[str]:
    """The gene symbols of a one- or two-column ``genes.tsv`` (see :func:`read_genes`)."""
    return read_genes(path)[0]


def known_gene_ids(folder: Path, genes: Sequence[str]) -> list[str] | None:
    """Ids of ``genes`` from ``folder``'s two-column genes.tsv, or None without one (or if a gene lacks one)."""
    path = Path(folder) / GENES
    if not path.exists():
        return None
    symbols, ids = read_genes(path)
    if ids is None:
        return None
    by_symbol = dict(zip(symbols, ids))
    if not all(str(g) in by_symbol for g in genes):
        return None
    return [by_symbol[str(g)] for g in genes]


def read_csv_checked(path: Path, fix: str, **kwargs) -> pd.DataFrame:
    """``pd.read_csv``; an unreadable file is an InputError naming it and ending with ``fix``."""
    try:
        return pd.read_csv(path, **kwargs)
    except (OSError, EOFError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as err:
        raise InputError(f"{path}: cannot read as a table, it may be truncated or corrupt "
                         f"({type(err).__name__}: {one_line(err)[:200]}); {fix}") from None


def write_table(frame: pd.DataFrame, path: Path, sep: str = ",", index: bool = True) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, sep=sep, index=index)


# ----------------------------------------------------------------------------- counts checks
def check_counts(matrix: sp.spmatrix | np.ndarray, source: str | Path) -> None:
    """Raise InputError unless every stored value is a finite, non-negative integer."""
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    if values.size == 0:
        return
    if not np.all(np.isfinite(values)):
        raise InputError(f"{source}: counts contain NaN or infinite values; raw integer UMI counts are expected")
    if values.min() < 0:
        raise InputError(f"{source}: counts contain negative values (min {values.min()}); raw integer counts are expected")
    if np.issubdtype(values.dtype, np.floating) and not np.all(values == np.round(values)):
        bad = values[values != np.round(values)][:3]
        raise InputError(
            f"{source}: counts are not integers (e.g. {', '.join(f'{v:g}' for v in bad)}); "
            "bulk2sc models raw UMI counts, not normalised or log values"
        )


# ----------------------------------------------------------------------------- labels
def type_order(names) -> list[str]:
    """Cell-type names in code order: numeric order when all are integers (Leiden ids), else sorted."""
    unique = pd.unique(pd.Series(list(names), dtype=str))
    if all(name.lstrip("-").isdigit() for name in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def encode_labels(cell_types, order: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Return (partition codes 0..K-1, type names) for an array of cell-type names."""
    cell_types = pd.Series(list(cell_types), dtype=str)
    order = list(order) if order is not None else type_order(cell_types)
    codes = pd.Categorical(cell_types, categories=order).codes.astype(np.int64)
    if (codes < 0).any():
        unknown = sorted(set(cell_types[codes < 0]))
        raise InputError(f"cell types {unknown[:5]} are not among the known types {order}")
    return codes, order


# ----------------------------------------------------------------------------- MTX
def write_mtx(path: Path, genes_by_cells: sp.spmatrix) -> None:
    """Write an integer Matrix Market file (genes x cells), atomically."""
    matrix = sp.coo_matrix(genes_by_cells)
    if np.issubdtype(matrix.dtype, np.floating):
        matrix = matrix.astype(np.int64)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            scipy.io.mmwrite(handle, matrix, field="integer")


def read_mtx(path: Path, fix: str = "rerun the stage that wrote it") -> sp.csr_matrix:
    """Read a Matrix Market file (plain or .gz) as CSR, exactly as stored; ``fix`` ends the error."""
    try:
        return sp.csr_matrix(scipy.io.mmread(str(path)))
    except (ValueError, OSError, EOFError, IndexError, TypeError, OverflowError) as err:
        raise InputError(f"{path}: cannot read Matrix Market file, it may be truncated or corrupt "
                         f"({one_line(err)[:200]}); {fix}") from None


# ----------------------------------------------------------------------------- datasets
def make_anndata(cells_by_genes: sp.spmatrix, genes: Sequence[str], barcodes: Sequence[str],
                 cell_types=None, order: Sequence[str] | None = None, gene_ids: Sequence[str] | None = None):
    """AnnData of raw counts (CSR, float32) with ``obs['cell_type']`` (categorical) and ``obs['partition']``.

    ``gene_ids`` (e.g. Ensembl ids of the symbols in ``genes``) go to ``var['gene_ids']``, as scanpy keeps them.
    """
    import anndata as ad

    adata = ad.AnnData(
        X=sp.csr_matrix(cells_by_genes, dtype=np.float32),
        obs=pd.DataFrame(index=pd.Index(list(barcodes), dtype=str, name="barcode")),
        var=pd.DataFrame(index=pd.Index(list(genes), dtype=str, name="gene")),
    )
    if gene_ids is not None:
        adata.var["gene_ids"] = [str(g) for g in gene_ids]
    if cell_types is not None:
        set_labels(adata, cell_types, order)
    return adata


def set_labels(adata, cell_types, order: Sequence[str] | None = None) -> None:
    codes, order = encode_labels(cell_types, order)
    adata.obs["cell_type"] = pd.Categorical.from_codes(codes, categories=order)
    adata.obs["partition"] = codes


def write_dataset(adata, folder: Path, write_h5ad: bool = True) -> None:
    """Write a labelled AnnData as MTX + genes + barcodes + clusters.csv (+ cells.h5ad)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    counts = sp.csr_matrix(adata.X)
    write_mtx(folder / MATRIX, counts.T)
    gene_ids = None
    if "gene_ids" in adata.var:  # a missing id (NaN, "") falls back to the symbol
        ids = adata.var["gene_ids"]
        gene_ids = ids.astype(object).where(ids.notna(), "").astype(str).tolist()
    write_genes(folder / GENES, adata.var_names, gene_ids)
    write_lines(folder / BARCODES, adata.obs_names)
    clusters = pd.DataFrame({
        "partition": adata.obs["partition"].to_numpy(),
        "cell_type": adata.obs["cell_type"].astype(str).to_numpy(),
    })
    write_table(clusters, folder / CLUSTERS, index=False)
    if write_h5ad:
        out = adata.copy()
        out.X = sp.csr_matrix(counts, dtype=np.int32)
        with atomic_path(folder / H5AD) as tmp:
            out.write_h5ad(tmp)


def read_dataset(folder: Path, stage: str = "_1_split_train_test.py", prefer_h5ad: bool = True):
    """Read a labelled dataset folder as AnnData (cells x genes, float32 CSR raw counts).

    Uses ``cells.h5ad`` when present (fastest), else ``matrix.mtx`` + genes + barcodes +
    ``clusters.csv``. Missing files name ``stage`` as the one to run.
    """
    import anndata as ad

    folder = Path(folder)
    h5ad = folder / H5AD
    if prefer_h5ad and h5ad.exists():
        try:
            adata = ad.read_h5ad(h5ad)
        except Exception as err:  # h5py raises many types for damaged files
            raise InputError(f"{h5ad}: cannot read ({err}); rerun {stage}") from None
        adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
        if "cell_type" not in adata.obs:
            raise InputError(f"{h5ad}: obs['cell_type'] is missing; rerun {stage}")
        check_counts(adata.X, h5ad)
        order = list(adata.obs["cell_type"].cat.categories) if hasattr(adata.obs["cell_type"], "cat") else None
        set_labels(adata, adata.obs["cell_type"].astype(str), order)
        return adata

    files = [folder / MATRIX, folder / GENES, folder / BARCODES, folder / CLUSTERS]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise InputError(f"missing {', '.join(missing)}: run {stage} first")
    (genes, gene_ids), barcodes = read_genes(folder / GENES), read_lines(folder / BARCODES)
    counts = read_mtx(folder / MATRIX, f"rerun {stage}")
    if counts.shape != (len(genes), len(barcodes)):
        raise InputError(
            f"{folder / MATRIX}: shape {counts.shape} does not match {len(genes)} genes x "
            f"{len(barcodes)} barcodes (expected genes x cells); rerun {stage}"
        )
    check_counts(counts, folder / MATRIX)
    clusters = read_csv_checked(folder / CLUSTERS, f"rerun {stage}")
    if len(clusters) != len(barcodes):
        raise InputError(f"{folder / CLUSTERS}: {len(clusters)} rows for {len(barcodes)} barcodes; rerun {stage}")
    if "cell_type" in clusters:
        names = clusters["cell_type"].astype(str)
        order = _order_from_partition(clusters, folder / CLUSTERS)
    elif "partition" in clusters:
        names, order = clusters["partition"].astype(str), None
    else:
        raise InputError(f"{folder / CLUSTERS}: needs a 'partition' or 'cell_type' column; rerun {stage}")
    return make_anndata(counts.T, genes, barcodes, names, order, gene_ids=gene_ids)


def read_type_order(path: Path, stage: str = "_1_split_train_test.py") -> list[str]:
    """Cell-type names in code order (``partition``) from a ``clusters.csv``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"missing {path}: run {stage} first")
    clusters = pd.read_csv(path)
    if "cell_type" in clusters:
        order = _order_from_partition(clusters, path)
        return order if order is not None else type_order(clusters["cell_type"].astype(str))
    if "partition" in clusters:
        return type_order(clusters["partition"].astype(str))
    raise InputError(f"{path}: needs a 'partition' or 'cell_type' column")


def _order_from_partition(clusters: pd.DataFrame, source: Path) -> list[str] | None:
    """Recover the type order from (partition, cell_type) pairs, checking they agree."""
    if "partition" not in clusters:
        return None
    pairs = clusters[["partition", "cell_type"]].drop_duplicates()
    if pairs["partition"].duplicated().any() or pairs["cell_type"].duplicated().any():
        raise InputError(f"{source}: 'partition' and 'cell_type' do not map one to one")
    pairs = pairs.sort_values("partition")
    if list(pairs["partition"]) != list(range(len(pairs))):
        return None  # not every code present (e.g. a generated subset): fall back to sorting
    return pairs["cell_type"].astype(str).tolist()


# ----------------------------------------------------------------------------- gene lengths
def read_gene_lengths(path: Path) -> pd.Series:
    """Gene symbol -> longest transcript span (end - start, bp), as TAPE's ``counts2FPKM``.

    Reads TAPE's ``GeneLength.txt`` or ``gene_length_hg19.csv.gz`` (same columns), comma- or
    tab-separated.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"missing gene-length table {path}: run _0_download_data.py first")
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as handle:
            sep = "\t" if "\t" in handle.readline() else ","
        table = pd.read_csv(path, sep=sep)
    except (OSError, EOFError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as err:
        raise InputError(f"{path}: cannot read the gene-length table, it may be truncated or corrupt "
                         f"({type(err).__name__}: {one_line(err)[:200]}); delete it and rerun _0_download_data.py, "
                         "or place TAPE's GeneLength.txt there") from None
    needed = ["Gene name", "Transcript start (bp)", "Transcript end (bp)"]
    if not set(needed) <= set(table.columns):
        raise InputError(f"{path}: gene-length table needs columns {needed}, found {list(table.columns)}")
    span = table["Transcript end (bp)"] - table["Transcript start (bp)"]
    lengths = span.groupby(table["Gene name"].astype(str)).max()
    return lengths[lengths > 0].astype(np.float64)
