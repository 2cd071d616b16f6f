"""The training cells as blocks of rows: in memory, or streamed from ``train/cells.h5ad``.

Stage 3 sees the training matrix through a :class:`CellSource`: ``read_block(b)`` returns rows
``[b * block_cells, (b + 1) * block_cells)`` as a scipy CSR. :class:`InMemoryCells` slices a
loaded matrix; :class:`H5adCells` reads the same rows from the h5ad's CSR ``X`` with h5py
(an ``indptr`` slice, then the matching ``data``/``indices`` slices), so memory holds a few
blocks, never the matrix. Everything built on it (training batches, validation batches, the
per-type sums) is the same code for both.

Streamed epochs shuffle at two levels, as webdataset-style loaders do: the blocks in a
(seed, epoch)-seeded order, dealt out to the ranks (each rank reads only its own blocks), then
the cells within a buffer of ``buffer_blocks`` blocks. Each rank's share is cut to the shortest
rank's, so all ranks run the same number of steps.

Why h5py rather than annbatch: annbatch (scverse, 0.3.1) needs Python >= 3.12 (this stack is on
3.11, see README) and reads its own pre-shuffled zarr collections, so an atlas would be
converted first; ``anndata.read_h5ad(backed="r")`` on a CSR ``X`` goes through the same h5py
slices with per-call overhead. Reading contiguous row blocks of the CSR needs no conversion and
keeps ``train/cells.h5ad`` the one file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import scipy.sparse as sp

from models.distributed import shard_order
from models.gmvae import Batch
from models.io import check_counts
from models.utils import InputError

BLOCK_CELLS = 4096  # rows per block: ~4 MB of a 1,000-nonzero-per-cell matrix, one h5py read each


class CellSource:
    """Labelled training cells as row blocks. Subclasses set ``labels``, ``n_genes`` and ``read_block``."""

    labels: np.ndarray  # [n_cells] int64 type codes
    n_genes: int
    block_cells: int = BLOCK_CELLS
    in_memory: bool = True

    @property
    def n_cells(self) -> int:
        return len(self.labels)

    @property
    def n_blocks(self) -> int:
        return -(-self.n_cells // self.block_cells)

    def read_block(self, block: int) -> sp.csr_matrix:
        raise NotImplementedError

    def block_of(self, block: int, mask: np.ndarray) -> tuple[np.ndarray, sp.csr_matrix]:
        """(global row ids, CSR) of the rows of ``block`` selected by the boolean ``mask``."""
        start = block * self.block_cells
        keep = np.flatnonzero(mask[start:start + self.block_cells])
        return keep + start, self.read_block(block)[keep]

    def rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """Arbitrary rows (in-memory sources only)."""
        raise NotImplementedError


class InMemoryCells(CellSource):
    """A loaded CSR (cells x genes) and its labels."""

    def __init__(self, counts: sp.csr_matrix, labels: np.ndarray, block_cells: int = BLOCK_CELLS):
        self.counts = sp.csr_matrix(counts)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.n_genes = self.counts.shape[1]
        self.block_cells = int(block_cells)

    def read_block(self, block: int) -> sp.csr_matrix:
        return self.counts[block * self.block_cells:(block + 1) * self.block_cells]

    def rows(self, rows: np.ndarray) -> sp.csr_matrix:
        return self.counts[rows]


class H5adCells(CellSource):
    """Rows of an h5ad's CSR ``X`` read on demand (float32 counts), labels from ``obs['cell_type']``."""

    in_memory = False

    def __init__(self, path: Path, block_cells: int = BLOCK_CELLS, stage: str = "_1_split_train_test.py"):
        import h5py
        from anndata.io import read_elem

        self.path = Path(path)
        self.block_cells = int(block_cells)
        try:
            self._file = h5py.File(self.path, "r")
            x = self._file["X"]
            encoding = x.attrs.get("encoding-type", "array") if isinstance(x, h5py.Group) else "array"
            if encoding != "csr_matrix":
                raise InputError(f"{self.path}: X is stored as {encoding!r}, not CSR, so it cannot be streamed by "
                                 f"rows; rewrite it with X as a CSR matrix (rerun {stage}) or raise MEMORY_BUDGET_GB")
            self.shape = tuple(int(n) for n in x.attrs["shape"])
            self._indptr, self._indices, self._data = x["indptr"], x["indices"], x["data"]
            obs = self._file["obs"]
            if "cell_type" not in obs:
                raise InputError(f"{self.path}: obs['cell_type'] is missing; rerun {stage}")
            cell_type = read_elem(obs["cell_type"])
            self.var_names = [str(g) for g in read_elem(self._file["var"]).index]
        except InputError:
            raise
        except Exception as err:  # h5py raises many types for damaged files
            raise InputError(f"{self.path}: cannot read ({err}); rerun {stage}") from None
        if not hasattr(cell_type, "cat"):
            import pandas as pd

            cell_type = pd.Categorical(np.asarray(cell_type).astype(str))
        cell_type = getattr(cell_type, "cat", cell_type)
        self.cell_types = [str(c) for c in cell_type.categories]
        self.labels = np.asarray(cell_type.codes, dtype=np.int64)
        self.n_genes = self.shape[1]

    def read_block(self, block: int) -> sp.csr_matrix:
        start = block * self.block_cells
        stop = min(start + self.block_cells, self.shape[0])
        indptr = self._indptr[start:stop + 1].astype(np.int64)
        first, last = int(indptr[0]), int(indptr[-1])
        return sp.csr_matrix((self._data[first:last].astype(np.float32), self._indices[first:last],
                              indptr - first), shape=(stop - start, self.shape[1]))

    def close(self) -> None:
        self._file.close()


def csr_nbytes(path: Path, stage: str = "_1_split_train_test.py") -> int:
    """Bytes the h5ad's X takes in memory as a float32/int32 CSR (without reading it)."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            x = handle["X"]
            if not isinstance(x, h5py.Group):
                return int(np.prod(x.shape)) * 4
            return int(x["data"].shape[0]) * 8 + int(x["indptr"].shape[0]) * 8
    except (OSError, KeyError) as err:  # h5py: a truncated or foreign file, or no X
        raise InputError(f"{path}: cannot read, it may be truncated or corrupt ({err}); rerun {stage}") from None


def memory_budget_bytes(setting, local_world_size: int = 1) -> float:
    """``MEMORY_BUDGET_GB`` in bytes: a number of GB, or ``"auto"`` = a quarter of the memory
    available now, shared by the ranks on this machine."""
    if isinstance(setting, str) and setting.strip().lower() == "auto":
        available = _available_memory()
        return 0.25 * available / max(local_world_size, 1)
    try:
        return float(setting) * 1e9
    except (TypeError, ValueError):
        raise InputError(f"MEMORY_BUDGET_GB must be 'auto' or a number of GB, got {setting!r}") from None


def _available_memory() -> float:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


# ----------------------------------------------------------------------------- batches
def train_batches(source: CellSource, mask: np.ndarray, batch_size: int, seed: int, epoch: int, device,
                  rank: int = 0, world_size: int = 1, buffer_blocks: int = 4) -> Iterator[Batch]:
    """One epoch of this rank's training batches over the rows selected by ``mask``.

    In memory: a (seed, epoch) shuffle of all the rows, sharded by :func:`shard_order`.
    Streamed: blocks in a (seed, epoch)-seeded order, block ``i`` of it to rank ``i % world_size``,
    cells shuffled within ``buffer_blocks`` blocks at a time; every rank stops after the shortest
    rank's number of cells, so the batch counts are equal.
    """
    if source.in_memory:
        order = shard_order(np.flatnonzero(mask), seed, epoch, rank, world_size)
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            yield Batch.from_csr(source.rows(index), source.labels[index], device)
        return
    counts_per_block = np.add.reduceat(mask.astype(np.int64), np.arange(0, source.n_cells, source.block_cells))
    blocks = np.random.default_rng([int(seed), int(epoch)]).permutation(source.n_blocks)
    shares = [blocks[r::world_size] for r in range(world_size)]
    quota = min(int(counts_per_block[share].sum()) for share in shares)
    rng = np.random.default_rng([int(seed), int(epoch), int(rank)])
    pending_rows, pending = np.zeros(0, dtype=np.int64), []
    emitted = 0
    mine = shares[rank]
    for position, block in enumerate(mine):
        rows, csr = source.block_of(int(block), mask)
        pending.append(csr)
        pending_rows = np.concatenate([pending_rows, rows])
        if (position + 1) % buffer_blocks and position != len(mine) - 1:
            continue
        buffer = sp.vstack(pending, format="csr") if len(pending) > 1 else pending[0]
        shuffle = rng.permutation(len(pending_rows))
        buffer, buffer_rows = buffer[shuffle], pending_rows[shuffle]
        last = position == len(mine) - 1
        n_out = len(buffer_rows) if last else (len(buffer_rows) // batch_size) * batch_size
        n_out = min(n_out, quota - emitted)
        for start in range(0, n_out, batch_size):
            stop = min(start + batch_size, n_out)
            yield Batch.from_csr(buffer[start:stop], source.labels[buffer_rows[start:stop]], device)
        emitted += n_out
        pending, pending_rows = [buffer[n_out:]], buffer_rows[n_out:]
        if emitted >= quota:
            return


def eval_batches(source: CellSource, mask: np.ndarray, batch_size: int, device, rank: int = 0,
                 world_size: int = 1) -> Iterator[tuple[tuple[int, int], Batch]]:
    """((block, index) key, batch) over the ``mask`` rows in stored order; the blocks that hold
    any of them are dealt out to the ranks in turn. The key seeds the batch's z draws, so the
    summed loss does not depend on the number of ranks."""
    counts_per_block = np.add.reduceat(mask.astype(np.int64), np.arange(0, source.n_cells, source.block_cells))
    for block in np.flatnonzero(counts_per_block)[rank::world_size]:
        rows, csr = source.block_of(int(block), mask)
        for index, start in enumerate(range(0, len(rows), batch_size)):
            stop = start + batch_size
            yield (int(block), index), Batch.from_csr(csr[start:stop], source.labels[rows[start:stop]], device)


def type_sums(source: CellSource, mask: np.ndarray, n_types: int, check_source=None):
    """One pass over the ``mask`` rows: per-type gene sums [K, G], cell counts [K], and per-type
    sum and sum of squares of log library size (for :func:`models.train.library_prior`)."""
    sums = np.zeros((n_types, source.n_genes))
    n_cells = np.zeros(n_types, dtype=np.int64)
    log_lib = np.zeros((2, n_types))
    for block in range(source.n_blocks):
        rows, csr = source.block_of(block, mask)
        if check_source is not None:
            check_counts(csr, check_source)
        labels = source.labels[rows]
        indicator = sp.csr_matrix((np.ones(len(rows)), (labels, np.arange(len(rows)))), shape=(n_types, len(rows)))
        sums += np.asarray((indicator @ csr).todense())
        n_cells += np.bincount(labels, minlength=n_types)
        library = np.log(np.maximum(np.asarray(csr.sum(axis=1)).ravel(), 1.0))
        log_lib[0] += np.bincount(labels, weights=library, minlength=n_types)
        log_lib[1] += np.bincount(labels, weights=library ** 2, minlength=n_types)
    return sums, n_cells, log_lib


def fit_batches(source: CellSource, mask: np.ndarray, batch_size: int, device) -> Iterator[Batch]:
    """Every ``mask`` row once, in stored order (for fitting the generation buffers)."""
    for _, batch in eval_batches(source, mask, batch_size, device):
        yield batch
