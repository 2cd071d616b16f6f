"""torch.distributed: sharding, streaming, and _3_ / _5_ under torchrun on CPU (gloo).

The torchrun tests start real launchers (``python -m torch.distributed.run``) with
``CUDA_VISIBLE_DEVICES=""``; each takes a few seconds on the tiny data.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from models import distributed, io
from models.paths import Paths
from models.streaming import H5adCells, InMemoryCells, eval_batches, train_batches, type_sums

REPO = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).parent / "helpers"
SMALL = ["--Z_DIM=4", "--ENC_HIDDEN1=16", "--ENC_HIDDEN2=8", "--CLS_HIDDEN=16", "--PRIOR_HIDDEN=8",
         "--DEC_HIDDEN1=8", "--DEC_HIDDEN2=16", "--BATCH_SIZE=32", "--CLS_WARMUP_EPOCHS=1", "--DEVICE=cpu"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args, audit: Path | None = None, root: Path | None = None, launcher=("--standalone",),
             nproc: int = 2, wait: bool = True):
    """Run ``python -m torch.distributed.run`` on CPU; with ``audit``, each rank lists the files it
    wrote under ``root`` in audit/rank<N>.txt (tests/helpers/sitecustomize.py)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HELPERS), str(REPO), os.environ.get("PYTHONPATH", "")])}
    if audit is not None:
        audit.mkdir(parents=True, exist_ok=True)
        env.update(BULK2SC_AUDIT_ROOT=str(root), BULK2SC_AUDIT_DIR=str(audit))
    command = [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc_per_node={nproc}", *map(str, args)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return process
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    return output


def written(audit: Path) -> dict[str, set[str]]:
    return {p.stem: set(p.read_text().split()) for p in audit.glob("rank*.txt")}


# ----------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("world_size", ["2", None])
def test_a_finished_torchrun_rank_leaves_without_interpreter_teardown(world_size):
    """run_stage ends a torchrun rank (WORLD_SIZE > 1) with os._exit(0) once main returns: its logs are flushed,
    and nothing after it runs (no teardown for gloo's threads to abort in); a single process returns as usual."""
    code = ("import atexit, logging, sys; from models.utils import run_stage, setup_logging; "
            "atexit.register(lambda: print('teardown ran', flush=True)); "
            "run_stage(lambda argv: (setup_logging(), logging.getLogger('bulk2sc').info('stage done'))); "
            "print('returned', flush=True)")
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    if world_size:
        env["WORLD_SIZE"] = world_size
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "stage done" in done.stderr
    assert ("returned" in done.stdout and "teardown ran" in done.stdout) == (world_size is None)


def test_ranks_on_one_machine_share_its_cores_unless_threads_are_set():
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        assert distributed.set_rank_threads(0, distributed.Context()) == cores
        two = distributed.Context(rank=1, world_size=2, local_rank=1, local_world_size=2)
        assert distributed.set_rank_threads(0, two) == max(1, cores // 2) == torch.get_num_threads()
        assert distributed.set_rank_threads(3, two) == 3 == torch.get_num_threads()  # a set number is kept
    finally:
        torch.set_num_threads(before)


def test_shards_are_disjoint_equal_and_seeded_per_epoch():
    rows = np.arange(103) * 2
    shards = [distributed.shard_order(rows, 7, 1, rank, 3) for rank in range(3)]
    assert [len(s) for s in shards] == [34, 34, 34]
    assert len(set(np.concatenate(shards))) == 102 and set(np.concatenate(shards)) <= set(rows)
    assert not np.array_equal(distributed.shard_order(rows, 7, 2, 0, 3), shards[0])  # another epoch
    assert np.array_equal(distributed.shard_order(rows, 7, 1, 0, 3), shards[0])  # same seed and epoch
    whole = distributed.shard_order(rows, 7, 1)
    assert sorted(whole) == list(rows)  # one process: every row once


@pytest.fixture(scope="module")
def h5ad_cells(tmp_path_factory):
    """Cells written as an h5ad (CSR X), with the same matrix in memory."""
    rng = np.random.default_rng(1)
    counts = sp.csr_matrix(rng.negative_binomial(1, 0.6, size=(203, 25)))
    types = np.array(["a", "b", "c"])[rng.integers(0, 3, size=203)]
    adata = io.make_anndata(counts, [f"g{i}" for i in range(25)], [f"c{i}" for i in range(203)], types)
    folder = tmp_path_factory.mktemp("h5ad")
    io.write_dataset(adata, folder)
    return folder / "cells.h5ad", adata


def test_streamed_blocks_match_memory_and_shard_with_equal_batch_counts(h5ad_cells):
    path, adata = h5ad_cells
    streamed = H5adCells(path, block_cells=16)
    memory = InMemoryCells(adata.X, adata.obs["partition"].to_numpy(), block_cells=16)
    assert streamed.cell_types == ["a", "b", "c"] and np.array_equal(streamed.labels, memory.labels)
    for block in (0, 5, streamed.n_blocks - 1):
        assert (streamed.read_block(block) != memory.read_block(block)).nnz == 0
    mask = np.random.default_rng(2).random(203) < 0.8
    for got, want in zip(type_sums(streamed, mask, 3), type_sums(memory, mask, 3)):
        np.testing.assert_allclose(got, want)

    # streamed epochs: disjoint shards, equal batch counts and sizes per rank, reshuffled per epoch
    dense = adata.X.toarray()
    for world in (1, 2, 3):
        shards = [list(train_batches(streamed, mask, 10, 0, 1, "cpu", r, world, buffer_blocks=2))
                  for r in range(world)]
        assert len({len(s) for s in shards}) == 1
        assert len({tuple(b.dense.shape[0] for b in s) for s in shards}) == 1
        rows = [dense_row_ids(dense, b.dense.numpy()) for s in shards for b in s]
        rows = np.concatenate(rows)
        assert len(set(rows)) == len(rows) and set(rows) <= set(np.flatnonzero(mask))
        assert len(rows) >= mask.sum() - world * 16  # the cut to the shortest rank: about a block per rank
        if world == 1:
            assert len(rows) == mask.sum()
    first = np.concatenate([b.labels.numpy() for b in train_batches(streamed, mask, 10, 0, 1, "cpu")])
    second = np.concatenate([b.labels.numpy() for b in train_batches(streamed, mask, 10, 0, 2, "cpu")])
    assert not np.array_equal(first, second)

    # validation batches: every masked row once, in any number of ranks
    for world in (1, 2):
        seen = [k for r in range(world) for k, _ in eval_batches(streamed, ~mask, 7, "cpu", r, world)]
        n_rows = sum(b.dense.shape[0] for r in range(world) for _, b in eval_batches(streamed, ~mask, 7, "cpu", r, world))
        assert n_rows == (~mask).sum() and len(set(seen)) == len(seen)


def dense_row_ids(dense: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Row index in ``dense`` of each row of ``rows`` (the test matrix has no duplicate rows)."""
    return np.array([int(np.flatnonzero((dense == row).all(axis=1))[0]) for row in rows])


# ----------------------------------------------------------------------------- torchrun
@pytest.mark.parametrize("phase", ["train", "warmup"])
def test_two_rank_step_equals_one_process_step_on_the_global_batch(tmp_path, phase):
    """DDP averages the gradients: the 2-rank step equals one process stepping on both halves."""
    sys.path.insert(0, str(HELPERS))
    import ddp_step
    from models.train import make_optimizer

    out = tmp_path / "step.pt"
    torchrun([HELPERS / "ddp_step.py", out, phase])
    ranked = torch.load(out, weights_only=True)

    model, cells, mask = ddp_step.step_setup()
    halves = [next(iter(train_batches(cells, mask, ddp_step.BATCH, ddp_step.SEED, ddp_step.EPOCH, "cpu", r, 2)))
              for r in range(2)]
    assert set(halves[0].labels.shape) == {ddp_step.BATCH}
    if phase == "train":
        params = model
        optimizer = make_optimizer(model, 1e-2)
        losses = [model(b, pi_min=1e-3, pi_grad=True, generator=torch.Generator().manual_seed(
            distributed.rank_seed(ddp_step.SEED, ddp_step.EPOCH, r)))["loss"].mean() for r, b in enumerate(halves)]
    else:
        params = model.classifier
        optimizer = torch.optim.Adam(model.classifier.parameters(), lr=1e-2)
        losses = [torch.nn.functional.cross_entropy(model.class_logits(b.dense), b.labels) for b in halves]
    optimizer.zero_grad()
    (sum(losses) / 2).backward()  # mean over the global batch of 2 x BATCH cells
    optimizer.step()
    for name, param in params.named_parameters():
        assert torch.allclose(ranked["grads"][name], param.grad, rtol=1e-4, atol=1e-6), name
        assert torch.allclose(ranked["params"][name], param.detach(), rtol=1e-4, atol=1e-6), name


@pytest.fixture()
def data_dir(tiny_split_dir, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(tiny_split_dir, target)
    return target


def test_torchrun_training_writes_on_rank_0_only_resumes_and_loads_in_stage_5(data_dir, tmp_path):
    paths = Paths(data_dir, tmp_path / "fig")
    audit = tmp_path / "audit"
    args = [REPO / "_3_train_gmvae.py", f"--DATA_DIR={data_dir}", f"--FIG_DIR={paths.fig_dir}", *SMALL,
            "--EPOCHS=2", "--SAVE_EVERY=1", "--MEMORY_BUDGET_GB=0", "--BLOCK_CELLS=32"]  # streamed, 2 ranks
    output = torchrun(args, audit, tmp_path)
    assert "2 ranks" in output and "streaming" in output
    files = written(audit)
    assert {p for p in files["rank0"] if not Path(p).name.startswith(".")} >= {
        str(paths.gmvae_checkpoint), str(paths.gmvae_history), str(paths.fig_dir / "gmvae_loss.png")}
    assert files.get("rank1", set()) == set()  # rank 1 wrote nothing
    checkpoint = torch.load(paths.gmvae_checkpoint, weights_only=True)
    assert not any(k.startswith("module.") for k in checkpoint["state_dict"])
    assert checkpoint["epoch"] == 2 and bool(checkpoint["state_dict"]["post_fitted"])
    steps = float(checkpoint["optimizer"]["state"][0]["step"])

    torchrun([*args[:-3], "--EPOCHS=3", "--RESUME=true"])  # resumed under torchrun, in memory this time
    history = pd.read_csv(paths.gmvae_history)
    assert list(history["epoch"]) == [1, 2, 3] and history["val_loss"].notna().all()
    resumed = torch.load(paths.gmvae_checkpoint, weights_only=True)
    assert resumed["epoch"] == 3 and float(resumed["optimizer"]["state"][0]["step"]) > steps

    import _5_generate_sc as stage5

    counts = tmp_path / "counts.csv"
    pd.DataFrame({"cell_type": ["alpha", "gamma"], "n_cells": [30, 20]}).to_csv(counts, index=False)
    stage5.main([f"--DATA_DIR={data_dir}", f"--FIG_DIR={paths.fig_dir}", f"--CELL_COUNTS={counts}",
                 "--EVALUATE=false", "--FIGURES=false"])
    assert io.read_dataset(paths.generated_dir).n_obs == 50


def test_two_launchers_meet_at_a_local_c10d_rendezvous(data_dir, tmp_path):
    """Multi-node on one machine: two torchrun launchers, one rank each, rendezvous over c10d."""
    port = free_port()
    launcher = ("--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=bulk2sc-test")
    args = [REPO / "_3_train_gmvae.py", f"--DATA_DIR={data_dir}", f"--FIG_DIR={tmp_path / 'fig'}", *SMALL,
            "--EPOCHS=1"]
    nodes = [torchrun(args, launcher=launcher, nproc=1, wait=False) for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-2000:] + outputs[1][-2000:]
    assert any("2 ranks" in out for out in outputs)
    assert Paths(data_dir).gmvae_checkpoint.exists()


def test_sharded_generation_is_byte_identical_to_one_process(data_dir, tmp_path):
    """torchrun with 2 ranks writes the same bytes as one process, for a cohort of 3 samples."""
    import _3_train_gmvae as stage3
    import _5_generate_sc as stage5

    stage3.main([f"--DATA_DIR={data_dir}", f"--FIG_DIR={tmp_path / 'fig'}", *SMALL, "--EPOCHS=1"])
    paths = Paths(data_dir)
    paths.proportions.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [1.0, 0.0, 0.0]], index=["s1", "s2", "s3"],
                 columns=["alpha", "beta", "gamma"]).to_csv(paths.proportions)
    other = tmp_path / "other"
    shutil.copytree(data_dir, other)
    args = ["--N_CELLS=1300", "--CHUNK_CELLS=512", "--FIGURES=false", "--N_TOP_GENES=50", "--N_PCS=5",
            "--N_CORR_GENES=10"]  # 6 RNG blocks in 3 chunks per sample: rank 0 takes 1 chunk, rank 1 two
    stage5.main([f"--DATA_DIR={data_dir}", *args])
    assert "2 ranks" in torchrun([REPO / "_5_generate_sc.py", f"--DATA_DIR={other}", *args])
    for sample in ("s1", "s2", "s3"):
        for name in ("matrix.mtx", "cells.h5ad", "clusters.csv", "barcodes.tsv", "genes.tsv"):
            one, two = paths.generated_dir / sample / name, Paths(other).generated_dir / sample / name
            assert one.read_bytes() == two.read_bytes(), f"{sample}/{name}"
        assert not list((Paths(other).generated_dir / sample).glob(".*"))  # no part files left
        # The scores come from PCA and a classifier on BLAS, whose thread count differs (torchrun
        # sets OMP_NUM_THREADS=1): equal to float rounding, not to the byte.
        assert_same_numbers(paths.generated_dir / sample / "metrics.json",
                            Paths(other).generated_dir / sample / "metrics.json")
    assert_same_numbers(Paths(other).generated_dir / "metrics.json", paths.generated_metrics)


def assert_same_numbers(first: Path, second: Path, rel: float = 1e-4) -> None:
    """Two JSON files with the same structure and strings, and numbers equal within ``rel``."""
    def flat(value, key=""):
        if isinstance(value, dict):
            return {k: v for name, item in value.items() for k, v in flat(item, f"{key}/{name}").items()}
        if isinstance(value, list):
            return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{key}[{i}]").items()}
        return {key: value}

    one, two = flat(json.loads(first.read_text())), flat(json.loads(second.read_text()))
    assert one.keys() == two.keys(), first
    for key, value in one.items():
        if isinstance(value, float) and isinstance(two[key], float):
            assert two[key] == pytest.approx(value, rel=rel, abs=1e-9), f"{first}: {key}"
        else:
            assert two[key] == value, f"{first}: {key}"


def test_conditioned_generation_under_torchrun_equals_one_process(tmp_path):
    """Conditioning on a bulk (with the composition re-estimated) is fitted on rank 0 and broadcast: the
    2-rank files equal one process's at one thread (float reductions depend on the thread count)."""
    from test_condition import stage5_dir

    paths = {name: stage5_dir(tmp_path / name, with_bulk=True) for name in ("one", "two")}
    args = ["--N_CELLS=300", "--CONDITION_MIN_GENES=50", "--EVALUATE=false", "--FIGURES=false",
            "--CONDITION_COMPOSITION=true", "--CHUNK_CELLS=128"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(REPO / "_5_generate_sc.py"), f"--DATA_DIR={paths['one'].data_dir}",
                    f"--FIG_DIR={tmp_path / 'fig'}", "--TORCH_THREADS=1", *args], cwd=REPO, env=env, check=True,
                   capture_output=True)
    assert "2 ranks" in torchrun([REPO / "_5_generate_sc.py", f"--DATA_DIR={paths['two'].data_dir}",
                                  f"--FIG_DIR={tmp_path / 'fig2'}", *args])
    one, two = paths["one"].generated_dir, paths["two"].generated_dir
    assert (one / "composition.csv").read_bytes() == (two / "composition.csv").read_bytes()
    for sample in ("s1", "s2"):
        for name in ("matrix.mtx", "clusters.csv", "condition.npz"):
            assert (one / sample / name).read_bytes() == (two / sample / name).read_bytes(), f"{sample}/{name}"
