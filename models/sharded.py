"""Generation split over torchrun ranks, merged into the files one process writes, byte for byte.

Stage 5 draws each cell's counts in RNG blocks seeded by (SEED, sample, block)
(:func:`models.generate.block_generator`), and writes them in chunks of whole blocks. Under
torchrun each rank takes a contiguous run of those chunks, draws them, and writes its part
next to the output: the chunks' CSR arrays (``.part-<rank>.h5``) and their ``matrix.mtx`` lines,
already formatted with the cells' global numbers (``.part-<rank>.mtx``). One rank (sample *s*
goes to rank *s* mod N, so a cohort's merges spread too) then replays the same chunks, in the
same order, into the same :class:`models.generate.DatasetWriter` a single process uses, and
copies the mtx lines behind the header. The HDF5 writes are the single process's writes, so
``cells.h5ad`` comes out byte-identical, and so do ``matrix.mtx`` and ``clusters.csv``.

Why not ``anndata.experimental.concat_on_disk``: it writes a new file with its own layout.
Checked with anndata 0.12.19: two halves of an h5ad concatenated on disk hold the same matrix
and obs as the whole, but not the same bytes (one input alone is merely copied), so a merged
file would differ from one process's. Writing one process's output through it as well would
cost that run a second full copy of the matrix. The replay reads each part once.

The parts live in the output folder, so with several machines ``DATA_DIR`` must be a shared
filesystem (every rank writes its part there; the merging rank reads them).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp
from models import distributed
from models.generate import (BLOCK_CELLS, DatasetWriter, evaluation_subset, generate_chunks, mtx_lines,
                             type_codes_from_counts)

log = logging.getLogger(__name__)


def rank_blocks(n_cells: int, chunk_cells: int, rank: int, world_size: int,
                block_cells: int = BLOCK_CELLS) -> range:
    """The RNG blocks of ``rank``: a contiguous run of whole chunks (so every rank's chunks are
    the single process's chunks), as even as the chunks allow."""
    n_blocks = -(-n_cells // block_cells)
    per_chunk = max(1, -(-int(chunk_cells) // block_cells))
    n_chunks = -(-n_blocks // per_chunk)
    first, last = rank * n_chunks // world_size, (rank + 1) * n_chunks // world_size
    return range(min(first * per_chunk, n_blocks), min(last * per_chunk, n_blocks))


def part_paths(folder: Path, rank: int) -> tuple[Path, Path]:
    return folder / f".part-{rank}.h5", folder / f".part-{rank}.mtx"


def write_part(folder: Path, sampler, type_codes: np.ndarray, n_genes: int, seed: int, chunk_cells: int,
               stream: int, rank: int, world_size: int, device="cpu", block_cells: int = BLOCK_CELLS,
               progress: bool = False) -> None:
    """Draw this rank's chunks of one sample and write them as its part files."""
    import h5py

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    blocks = rank_blocks(len(type_codes), chunk_cells, rank, world_size, block_cells)
    h5_path, mtx_path = part_paths(folder, rank)
    first_cell = blocks.start * block_cells
    with h5py.File(h5_path, "w") as part, open(mtx_path, "wb") as lines:
        data = part.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 18,))
        indices = part.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 18,))
        row_nnz, chunk_rows = [], []
        for chunk in generate_chunks(sampler, type_codes, seed, chunk_cells, stream=stream, block_cells=block_cells,
                                     device=device, progress=progress, blocks=blocks):
            chunk = sp.csr_matrix(chunk)
            chunk.sort_indices()
            start = data.shape[0]
            data.resize((start + chunk.nnz,))
            indices.resize((start + chunk.nnz,))
            data[start:] = chunk.data.astype(np.int32, copy=False)
            indices[start:] = chunk.indices.astype(np.int32, copy=False)
            row_nnz.append(np.diff(chunk.indptr))
            chunk_rows.append(chunk.shape[0])
            lines.write(mtx_lines(chunk, first_cell))
            first_cell += chunk.shape[0]
        part["row_nnz"] = np.concatenate(row_nnz) if row_nnz else np.zeros(0, dtype=np.int64)
        part["chunk_rows"] = np.asarray(chunk_rows, dtype=np.int64)
        part.attrs["n_genes"] = n_genes


def merge_parts(folder: Path, genes: Sequence[str], type_codes: np.ndarray, cell_types: Sequence[str],
                sample: str, world_size: int, gene_ids: Sequence[str] | None = None) -> None:
    """Replay every rank's chunks, in order, into the single-process writer; remove the parts."""
    import h5py

    folder = Path(folder)
    with DatasetWriter(folder, genes, type_codes, cell_types, sample=sample, gene_ids=gene_ids) as writer:
        for rank in range(world_size):
            h5_path, mtx_path = part_paths(folder, rank)
            with h5py.File(h5_path, "r") as part:
                row_nnz, offset, row = part["row_nnz"][:], 0, 0
                for n_rows in part["chunk_rows"][:]:
                    nnz = row_nnz[row:row + n_rows]
                    indptr = np.concatenate([[0], np.cumsum(nnz)]).astype(np.int64)
                    stop = offset + int(indptr[-1])
                    chunk = sp.csr_matrix((part["data"][offset:stop], part["indices"][offset:stop], indptr),
                                          shape=(int(n_rows), len(genes)))
                    writer.append(chunk, mtx=False)
                    offset, row = stop, row + n_rows
            writer.append_mtx_lines(mtx_path)
    for rank in range(world_size):
        for path in part_paths(folder, rank):
            path.unlink()


def write_generated_sharded(folders: Sequence[Path], samplers: Sequence, genes: Sequence[str], cell_types: Sequence[str],
                            counts_per_sample: Sequence[Sequence[int]], samples: Sequence[str], seed: int,
                            chunk_cells: int, ctx: distributed.Context, device="cpu",
                            block_cells: int = BLOCK_CELLS, gene_ids: Sequence[str] | None = None) -> None:
    """Every sample's folder, drawn by all ranks (with that sample's sampler) and merged by rank
    (sample index mod N).

    Collective: every rank calls it with the same arguments; it returns when every folder is
    complete on disk.
    """
    for stream, (folder, sampler, per_type, sample) in enumerate(zip(folders, samplers, counts_per_sample, samples)):
        type_codes = type_codes_from_counts(per_type)
        write_part(folder, sampler, type_codes, len(genes), seed, chunk_cells, stream, ctx.rank, ctx.world_size,
                   device, block_cells, progress=ctx.is_main)
        distributed.barrier(ctx)  # every part of this sample is on disk
        if ctx.rank == stream % ctx.world_size:
            merge_parts(folder, genes, type_codes, cell_types, str(sample), ctx.world_size, gene_ids)
    distributed.barrier(ctx)


def read_kept(folder: Path, counts_per_type: Sequence[int], keep_cells: int, seed: int):
    """(type codes, CSR counts) of the cells :func:`models.generate.write_generated` keeps for the
    metrics, read back from a written ``cells.h5ad``."""
    import anndata as ad

    type_codes = type_codes_from_counts(counts_per_type)
    keep = evaluation_subset(len(type_codes), keep_cells, seed)
    if len(keep) == 0:
        return type_codes[keep], sp.csr_matrix((0, 0), dtype=np.int32)
    backed = ad.read_h5ad(Path(folder) / "cells.h5ad", backed="r")
    try:
        kept = sp.csr_matrix(backed.X[keep])
    finally:
        backed.file.close()
    return type_codes[keep], kept

