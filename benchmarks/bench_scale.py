"""Atlas-scale figures: streamed training input, and generation over torchrun ranks.

    python benchmarks/bench_scale.py --PART=stream --CELLS=100000 --MEMORY=true   # + the in-memory path
    python benchmarks/bench_scale.py --PART=stream --CELLS=400000
    python benchmarks/bench_scale.py --PART=generate --CELLS=1000000 --GENES=2000

``stream``: writes a synthetic train/cells.h5ad (CELLS x 16,000 genes, 500-1,000 nonzeros per
cell, 10 types; written chunk by chunk, never whole in memory) into a temporary folder, then
measures, each in a fresh process so peak RSS is its own:
  * one full streamed epoch of stage 3's input pipeline (models.streaming.train_batches over the
    training cells, blocks in shuffled order, cells shuffled within 4 blocks, each batch built as
    the model receives it) plus the streamed validation pass: cells/s and peak RSS;
  * training steps of the default GMVAE on streamed batches, after 100 batches of the assignment
    MLP's warm-up (as stage 3 does), for a fixed number of batches (``--BATCHES``; not a whole
    epoch, which takes minutes per 100,000 cells on 2 cores): cells/s;
  * with ``--memory=true``, the same steps with the matrix loaded whole (stage 3's in-memory path).
``generate``: a GMVAE with random weights (GENES genes, 10 types) saved as a checkpoint, then
_5_generate_sc.py for CELLS cells with 1 process and with ``torchrun --nproc_per_node=2``:
wall time, parallel efficiency and each rank's peak RSS; the two outputs are compared byte for byte.

Run heavy parts under ``flock /tmp/bulk2sc_heavy.lock``. Temporary files are removed at the end.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.config import load_config  # noqa: E402

# -----------------------------------------------------------------------------
PART = "stream"  # "stream" or "generate"
CELLS = 100_000  # synthetic training cells (stream) or generated cells (generate)
GENES = 16_000  # genes of the synthetic data (the generation run may use fewer: say so)
TYPES = 10  # cell types
BATCHES = 160  # training steps timed per path (a part of an epoch): more than one shuffle buffer of 4 x 4,096 cells
MEMORY = False  # stream: also time the in-memory path on the same file
TMP = "/tmp"  # where the synthetic files go (removed afterwards)
SEED = 0
WORKER = ""  # internal: run one measurement in this process
WORKDIR = ""  # internal
# -----------------------------------------------------------------------------


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {cores} cores, Python {platform.python_version()}"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- synthetic h5ad
def write_synthetic_h5ad(path: Path, n_cells: int, n_genes: int, n_types: int, seed: int,
                         chunk: int = 10_000) -> int:
    """A train/cells.h5ad of sparse integer counts, appended chunk by chunk; returns the nnz."""
    import anndata as ad
    import h5py

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_types, size=n_cells)
    names = [f"type{k}" for k in range(n_types)]
    obs = pd.DataFrame({"cell_type": pd.Categorical.from_codes(labels, categories=names), "partition": labels},
                       index=pd.Index([f"cell{i}" for i in range(n_cells)], name="barcode"))
    ad.AnnData(obs=obs, var=pd.DataFrame(index=pd.Index([f"G{i}" for i in range(n_genes)], name="gene"))
               ).write_h5ad(path)
    nnz = 0
    with h5py.File(path, "a") as handle:
        group = handle.create_group("X")
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = np.array([n_cells, n_genes], dtype=np.int64)
        data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 18,))
        indices = group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 18,))
        indptr = group.create_dataset("indptr", shape=(n_cells + 1,), dtype=np.int64)
        indptr[0] = 0
        for start in range(0, n_cells, chunk):
            stop = min(start + chunk, n_cells)
            per_cell = rng.integers(500, 1001, size=stop - start)
            rows = np.repeat(np.arange(stop - start), per_cell)
            # skewed gene popularity, shifted per type, so types differ; duplicates merged below
            genes = (np.floor(n_genes * rng.random(len(rows)) ** 2).astype(np.int64)
                     + labels[start:stop][rows] * (n_genes // n_types)) % n_genes
            keys = np.unique(rows * n_genes + genes)
            rows, genes = keys // n_genes, keys % n_genes
            values = rng.geometric(0.5, size=len(keys)).astype(np.int32)
            counts = np.bincount(rows, minlength=stop - start)
            data.resize((nnz + len(keys),))
            indices.resize((nnz + len(keys),))
            data[nnz:] = values
            indices[nnz:] = genes.astype(np.int32)
            indptr[start + 1:stop + 1] = nnz + np.cumsum(counts)
            nnz += len(keys)
    return nnz


# ----------------------------------------------------------------------------- stream workers
def stream_worker(cfg, h5ad: Path, mode: str) -> dict:
    """One measurement in this process: 'loader' (full epoch, no model), 'stream' or 'memory' steps."""
    import torch

    from models.gmvae import GMVAE
    from models.streaming import H5adCells, InMemoryCells, eval_batches, train_batches
    from models.train import make_optimizer, train_steps, warm_up_steps
    from models.utils import set_torch_threads

    set_torch_threads(0)
    started = time.perf_counter()
    if mode == "memory":
        from models import io

        train = io.read_dataset(h5ad.parent)
        source = InMemoryCells(train.X, train.obs["partition"].to_numpy())
        del train
    else:
        source = H5adCells(h5ad)
    load_s = time.perf_counter() - started
    mask = np.random.default_rng(cfg.SEED).random(source.n_cells) >= 0.1  # 10 % validation
    result = {"mode": mode, "cells": source.n_cells, "load_s": round(load_s, 1)}
    if mode == "loader":
        started, seen = time.perf_counter(), 0
        for batch in train_batches(source, mask, 128, cfg.SEED, 1, "cpu"):
            seen += batch.dense.shape[0]
        epoch_s = time.perf_counter() - started
        started, validated = time.perf_counter(), 0
        for _, batch in eval_batches(source, ~mask, 256, "cpu"):
            validated += batch.dense.shape[0]
        result.update(epoch_cells=seen, epoch_s=round(epoch_s, 1), cells_per_s=round(seen / epoch_s),
                      val_cells=validated, val_s=round(time.perf_counter() - started, 1))
    else:
        torch.manual_seed(cfg.SEED)
        model = GMVAE(n_genes=source.n_genes, n_types=int(source.labels.max()) + 1, chunk_elements=1 << 22)
        optimizer = make_optimizer(model, 1e-3)

        def limited(epoch: int, n_batches: int):
            for index, batch in enumerate(train_batches(source, mask, 128, cfg.SEED, epoch, "cpu")):
                if index >= n_batches:
                    return
                yield batch

        # as stage 3 does: the assignment MLP first (cheap), so PI_MIN prunes the pairs from the first step
        warm_up_steps(model, lambda e: limited(100 + e, 60), 3, 1e-2)
        train_steps(model, optimizer, limited(50, 3), 1e-3, 1)  # first steps (allocations) not timed
        started = time.perf_counter()
        parts = train_steps(model, optimizer, limited(1, cfg.BATCHES), 1e-3, 1)
        elapsed = time.perf_counter() - started
        result["pairs_per_cell"] = round(parts["pairs"], 2)
        result.update(steps=cfg.BATCHES, step_cells_per_s=round(cfg.BATCHES * 128 / elapsed))
    result["peak_rss_mb"] = round(peak_rss_mb())
    return result


def run_worker(args) -> dict:
    output = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=REPO)
    if output.returncode != 0:
        raise SystemExit(output.stderr[-3000:])
    return json.loads(output.stdout.strip().splitlines()[-1])


def bench_stream(cfg) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bulk2sc_scale_", dir=cfg.TMP))
    try:
        h5ad = workdir / "train" / "cells.h5ad"
        h5ad.parent.mkdir(parents=True)
        started = time.perf_counter()
        nnz = write_synthetic_h5ad(h5ad, cfg.CELLS, cfg.GENES, cfg.TYPES, cfg.SEED)
        print(f"wrote {h5ad.name}: {cfg.CELLS:,} cells x {cfg.GENES:,} genes, {nnz / cfg.CELLS:.0f} nonzeros/cell, "
              f"{h5ad.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - started:.0f} s", flush=True)
        modes = ["loader", "stream"] + (["memory"] if cfg.MEMORY else [])
        for mode in modes:
            result = run_worker([f"--WORKER={mode}", f"--WORKDIR={workdir}", f"--SEED={cfg.SEED}",
                                 f"--BATCHES={cfg.BATCHES}"])
            print(json.dumps(result), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ----------------------------------------------------------------------------- generation
def rss_worker(script: str, argv: list[str], out: Path) -> None:
    """Run a stage script here (as torchrun's rank), then record this rank's peak RSS."""
    sys.argv = [script, *argv]
    started = time.perf_counter()
    runpy.run_path(script, run_name="__main__")
    rank = os.environ.get("RANK", "0")
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": int(rank), "peak_rss_mb": round(peak_rss_mb()),
                                                      "seconds": round(time.perf_counter() - started, 1)}))


def bench_generate(cfg) -> None:
    import torch

    from models.gmvae import GMVAE
    from models.train import save_checkpoint

    workdir = Path(tempfile.mkdtemp(prefix="bulk2sc_gen_", dir=cfg.TMP))
    try:
        torch.manual_seed(cfg.SEED)
        model = GMVAE(n_genes=cfg.GENES, n_types=cfg.TYPES)
        genes, types = [f"G{i}" for i in range(cfg.GENES)], [f"type{k}" for k in range(cfg.TYPES)]
        counts = workdir / "counts.csv"
        per_type = np.full(cfg.TYPES, cfg.CELLS // cfg.TYPES)
        per_type[0] += cfg.CELLS - per_type.sum()
        pd.DataFrame({"cell_type": types, "n_cells": per_type}).to_csv(counts, index=False)
        timings = {}
        for ranks in (1, 2):
            data_dir = workdir / f"ranks{ranks}"
            save_checkpoint(data_dir / "checkpoints" / "gmvae.pt", model, None, 0, genes, types)
            rss_dir = workdir / f"rss{ranks}"
            rss_dir.mkdir()
            argv = [f"--DATA_DIR={data_dir}", f"--CELL_COUNTS={counts}", "--EVALUATE=false", "--FIGURES=false",
                    "--PRIOR=learned", "--CALIBRATE=false", f"--SEED={cfg.SEED}"]
            launcher = [sys.executable] if ranks == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
            command = [*launcher, __file__, "--WORKER=rss", f"--WORKDIR={rss_dir}", "::", "_5_generate_sc.py", *argv]
            started = time.perf_counter()
            subprocess.run(command, cwd=REPO, check=True, capture_output=True,
                           env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
            timings[ranks] = time.perf_counter() - started
            per_rank = [json.loads(p.read_text()) for p in sorted(rss_dir.glob("rank*.json"))]
            print(f"{ranks} rank(s): {timings[ranks]:.1f} s wall for {cfg.CELLS:,} cells x {cfg.GENES:,} genes "
                  f"({cfg.CELLS / timings[ranks]:,.0f} cells/s); per rank: "
                  + ", ".join(f"rank {r['rank']} peak RSS {r['peak_rss_mb']} MB" for r in per_rank), flush=True)
        speedup = timings[1] / timings[2]
        same = all((workdir / "ranks1" / "generated" / name).read_bytes()
                   == (workdir / "ranks2" / "generated" / name).read_bytes()
                   for name in ("matrix.mtx", "cells.h5ad", "clusters.csv"))
        print(f"2 ranks vs 1: {speedup:.2f}x, parallel efficiency {speedup / 2:.0%}; "
              f"matrix.mtx, cells.h5ad, clusters.csv byte-identical: {same}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "::" in argv:  # rss worker: after "::", the stage script and its arguments
        split = argv.index("::")
        cfg = load_config(globals(), argv[:split])
        return rss_worker(argv[split + 1], argv[split + 2:], Path(cfg.WORKDIR))
    cfg = load_config(globals(), argv)
    if cfg.WORKER:
        print(json.dumps(stream_worker(cfg, Path(cfg.WORKDIR) / "train" / "cells.h5ad", cfg.WORKER)))
        return
    print(f"command: python benchmarks/bench_scale.py {' '.join(argv)}")
    print(f"machine: {machine()}; torch threads = cores", flush=True)
    if cfg.PART == "stream":
        bench_stream(cfg)
    elif cfg.PART == "generate":
        bench_generate(cfg)
    else:
        raise SystemExit(f"PART must be 'stream' or 'generate', got {cfg.PART!r}")


if __name__ == "__main__":
    main()
