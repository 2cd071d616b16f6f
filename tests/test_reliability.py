"""The stages as a user meets them: bad inputs, crashes mid-write, and the same SEED twice.

Every stage runs in a subprocess (``python _N_....py --DATA_DIR=...``, cwd = the repository
root), as a user runs it, on the tiny R-made RData of tests/data (300 cells x 150 genes). One
session-scoped chain of all six stages makes a complete DATA_DIR; each bad-input case copies
it, damages one input, runs the stage that reads it (44 cases; 12 run by default, the rest with --run-slow), and checks

- a non-zero exit, and one ``ERROR`` log line, the last of stderr, naming the file, the problem
  and a fix, with no traceback;
- every other file under DATA_DIR (and FIG_DIR) byte-identical before and after (sha256).

The crash tests SIGKILL stage 3 while it writes a checkpoint and stage 5 while it writes 100,000
cells; the determinism test runs the chain a second time in another DATA_DIR and compares every
output file. Tests marked ``slow`` (the crash and determinism runs, and the bad-input cases outside
REPRESENTATIVE) are skipped unless ``--run-slow``: the default suite, which CI runs, stays within
its few minutes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from conftest import gene_length_table
from test_scripts import TINY_ARGS
from models import io
from models.paths import Paths

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"

# Tiny settings per stage: test_scripts.TINY_ARGS, but two pseudo-bulks, a small calibration set,
# and stage 5 skips scoring and figures (the reliability suite checks files and messages, not metrics).
STAGE_ARGS = {
    **TINY_ARGS,
    "_2_prepare_sctape.py": ["--N_PSEUDOBULK=2"],
    "_4_deconvolve_bulk.py": [*TINY_ARGS["_4_deconvolve_bulk.py"], "--CALIBRATION_SAMPLES=40"],
    "_5_generate_sc.py": ["--EVALUATE=false", "--FIGURES=false", "--CONDITION_MIN_GENES=50"],
}
STAGES = list(STAGE_ARGS)
ERROR_LINE = re.compile(r"^\d\d:\d\d:\d\d ERROR bulk2sc: (.+)$")


# ----------------------------------------------------------------------------- running stages
def stage_command(script: str, root: Path, extra=()) -> list[str]:
    args = [f"--DATA_DIR={root}", *STAGE_ARGS[script], *extra]
    if script not in ("_0_download_data.py", "_2_prepare_sctape.py"):
        args.append(f"--FIG_DIR={root / 'fig'}")
    return [sys.executable, script, *args]


def run_stage(script: str, root: Path, extra=(), **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(stage_command(script, root, extra), cwd=REPO, capture_output=True, text=True,
                          timeout=600, **kwargs)


def run_ok(script: str, root: Path, extra=()) -> subprocess.CompletedProcess:
    done = run_stage(script, root, extra)
    assert done.returncode == 0, f"{script} failed:\n{done.stderr[-3000:]}"
    return done


def run_chain(root: Path) -> Path:
    """A DATA_DIR made by all six stages from the tiny RData, offline (inputs placed in raw/)."""
    from models.geo import read_rdata_counts

    paths = Paths(root)
    paths.raw_dir.mkdir(parents=True)
    shutil.copy(DATA / "sim_counts.RData.gz", paths.rdata)
    _, genes, barcodes = read_rdata_counts(paths.rdata)
    gene_length_table(genes).to_csv(paths.gene_length, index=False)
    labels = pd.DataFrame({"barcode": barcodes, "cell_type": [b.split("_")[0] for b in barcodes]})
    labels.to_csv(paths.raw_cell_types, index=False)
    for script in STAGES:
        run_ok(script, root)
    return root


def checksums(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def error_message(done: subprocess.CompletedProcess) -> str:
    """The one-line error of a failed stage (asserting the shape: last line, one ERROR, no traceback)."""
    assert done.returncode != 0, f"expected a refusal, got exit 0:\n{done.stderr[-2000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    match = ERROR_LINE.match(lines[-1]) if lines else None
    assert match, f"last stderr line is not an ERROR log line:\n{done.stderr[-2000:]}"
    assert sum(" ERROR " in line for line in lines) == 1, done.stderr[-2000:]
    return match.group(1)


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Path:
    """A complete DATA_DIR (raw/ .. generated/), made once. Read-only: copy it to change it."""
    return run_chain(tmp_path_factory.mktemp("reliability") / "data")


def copy_of(pipeline: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(pipeline, root)
    return root


# ----------------------------------------------------------------------------- bad inputs
def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def raw_adata(root: Path):
    paths = Paths(root)
    counts = io.read_mtx(paths.raw_matrix).T.tocsr()
    return io.make_anndata(counts, io.read_lines(paths.raw_genes), io.read_lines(paths.raw_barcodes))


def write_raw_mtx(root: Path, genes_by_cells, field: str = "integer") -> None:
    with open(Paths(root).raw_matrix, "wb") as handle:
        scipy.io.mmwrite(handle, sp.coo_matrix(genes_by_cells), field=field)


def write_raw_h5ad(root: Path, values=None, n_cells=None) -> None:
    adata = raw_adata(root)
    if n_cells is not None:
        adata = adata[:n_cells].copy()
    if values is not None:
        adata.X = sp.csr_matrix(values(adata.X.toarray()))
    adata.write_h5ad(Paths(root).raw_h5ad)


def with_value(value):
    def change(dense):
        dense = dense.astype(np.float64)
        dense[0, np.flatnonzero(dense[0])[0]] = value
        return dense
    return change


def bulk_table(root: Path) -> pd.DataFrame:
    return pd.read_csv(Paths(root).pseudobulk_tpm, sep="\t", index_col=0)


def write_bulk(root: Path, table: pd.DataFrame) -> Path:
    path = root / "my_bulk.tsv"
    table.to_csv(path, sep="\t")
    return path


def bulk_with(change):
    def setup(root):
        return write_bulk(root, change(bulk_table(root))), ["--BULK={input}", "--BULK_UNIT=TPM"]
    return setup


def setup_labels(change):
    def setup(root):
        path = Paths(root).raw_cell_types
        change(path)
        return path, []
    return setup


def other_test_genes(root):
    """test/ rewritten without its last gene: train/test (and checkpoint) genes differ."""
    paths = Paths(root)
    test = io.read_dataset(paths.test_dir)
    shutil.rmtree(paths.test_dir)
    io.write_dataset(test[:, :-1].copy(), paths.test_dir)
    return paths.test_dir, []


def pickled_module(which: str, extra=()):
    """A checkpoint whose unpickling would create a marker file (a whole-module torch.save does
    the same kind of thing: it runs code on load unless weights_only=True refuses it)."""
    def setup(root):
        import torch

        marker = root.parent / "unpickled_marker"

        class Payload:
            def __reduce__(self):
                return (open, (str(marker), "w"))

        path = getattr(Paths(root), which)
        torch.save({"state_dict": Payload(), "config": {}, "genes": [], "cell_types": []}, path)
        return path, list(extra)
    return setup


def gmvae_other_dims(root):
    """A GMVAE checkpoint whose config does not fit its weights (another z_dim)."""
    import torch

    path = Paths(root).gmvae_checkpoint
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["config"]["z_dim"] = 7
    torch.save(checkpoint, path)
    return path, []


def tape_as_gmvae(root):
    paths = Paths(root)
    shutil.copy(paths.tape_checkpoint, paths.gmvae_checkpoint)
    return paths.gmvae_checkpoint, []


def gmvae_as_tape(root):
    paths = Paths(root)
    shutil.copy(paths.gmvae_checkpoint, paths.tape_checkpoint)
    return paths.tape_checkpoint, ["--RETRAIN=false"]


def write_file(relative: str, text: str, extra=()):
    def setup(root):
        path = root / relative
        path.write_text(text)
        return path, [a.format(input=path) for a in extra]
    return setup


def damage(relative: str, how, extra=()):
    def setup(root):
        path = root / relative
        how(path)
        return path, list(extra)
    return setup


def then_rm(relative: str, setup):
    """``setup``, after removing ``relative`` (e.g. cells.h5ad, so the MTX is read)."""
    def run(root):
        (root / relative).unlink()
        return setup(root)
    return run


def raw_h5ad_case(**kwargs):
    def setup(root):
        write_raw_h5ad(root, **kwargs)
        return Paths(root).raw_h5ad, []
    return setup


def raw_mtx_case(make):
    def setup(root):
        write_raw_mtx(root, *make(io.read_mtx(Paths(root).raw_matrix)))
        return Paths(root).raw_matrix, []
    return setup


def mtx_with_value(value):
    def make(matrix):
        matrix = matrix.astype(np.float64).tocoo()
        matrix.data[0] = value
        return matrix, "real"
    return make


def empty_mtx(matrix):
    return sp.coo_matrix(matrix.shape, dtype=np.int64), "integer"


def unknown_barcodes(path):
    labels = pd.read_csv(path)
    labels["barcode"] = "NOPE_" + labels["barcode"]
    labels.to_csv(path, index=False)


def cell_counts(text):
    return write_file("counts.csv", text, ["--CELL_COUNTS={input}"])


def proportions_with(change):
    def setup(root):
        path = Paths(root).proportions
        table = pd.read_csv(path, index_col=0)
        change(table).to_csv(path)
        return path, []
    return setup


def rename_first_type(table):
    return table.rename(columns={table.columns[0]: "martian"})


def set_first(value):
    def change(table):
        table.iloc[0, 0] = value
        return table
    return change


# (case id, stage, setup(root) -> (damaged input, extra args), words the message must hold besides
# the input's file name). Setup args may contain {input}, the damaged file's path.
CASES = [
    ("rdata-truncated", "_0_download_data.py", damage("raw/GSE130148_raw_counts.RData.gz", truncate, ["--FORCE=true"]),
     ["truncated", "Delete it and rerun"]),
    ("rdata-garbage", "_0_download_data.py", damage("raw/GSE130148_raw_counts.RData.gz", garbage, ["--FORCE=true"]),
     ["cannot read", "Delete it and rerun"]),
    ("rdata-non-integer", "_0_download_data.py",
     damage("raw/GSE130148_raw_counts.RData.gz", lambda p: shutil.copy(DATA / "fractional_counts.RData.gz", p),
            ["--FORCE=true"]), ["not integers", "raw UMI counts"]),
    ("rdata-no-matrix", "_0_download_data.py",
     damage("raw/GSE130148_raw_counts.RData.gz", lambda p: shutil.copy(DATA / "no_matrix.RData.gz", p),
            ["--FORCE=true"]), ["no sparse count matrix"]),
    ("mtx-truncated", "_1_split_train_test.py", damage("raw/matrix.mtx", truncate), ["Matrix Market", "rerun"]),
    ("mtx-garbage", "_1_split_train_test.py", damage("raw/matrix.mtx", garbage), ["Matrix Market", "rerun"]),
    ("mtx-non-integer", "_1_split_train_test.py", raw_mtx_case(mtx_with_value(0.5)), ["not integers", "raw UMI"]),
    ("mtx-negative", "_1_split_train_test.py", raw_mtx_case(mtx_with_value(-3)), ["negative", "raw integer"]),
    ("mtx-empty", "_1_split_train_test.py", raw_mtx_case(empty_mtx), ["matrix is empty", "raw counts"]),
    ("h5ad-truncated", "_1_split_train_test.py", damage("raw/cells.h5ad", lambda p: (
        write_raw_h5ad(p.parents[1]), truncate(p))), ["cannot read", "raw counts"]),
    ("h5ad-garbage", "_1_split_train_test.py", damage("raw/cells.h5ad", garbage), ["cannot read", "raw counts"]),
    ("h5ad-nan", "_1_split_train_test.py", raw_h5ad_case(values=with_value(np.nan)), ["NaN", "raw integer"]),
    ("h5ad-negative", "_1_split_train_test.py", raw_h5ad_case(values=with_value(-1.0)), ["negative"]),
    ("h5ad-non-integer", "_1_split_train_test.py", raw_h5ad_case(values=with_value(0.25)), ["not integers"]),
    ("h5ad-no-cells", "_1_split_train_test.py", raw_h5ad_case(n_cells=0), ["matrix is empty", "raw counts"]),
    ("labels-unknown-barcodes", "_1_split_train_test.py", setup_labels(unknown_barcodes),
     ["none of its barcodes", "barcodes.tsv"]),
    ("labels-garbage", "_1_split_train_test.py", write_file("raw/cell_types.csv", "a;b\n1;2\n"),
     ["barcode,cell_type"]),
    ("train-test-genes-differ", "_2_prepare_sctape.py", other_test_genes, ["different genes", "rerun _1_"]),
    ("gene-lengths-garbage", "_2_prepare_sctape.py", damage("raw/GeneLength.txt", garbage), ["gene-length", "_0_"]),
    ("train-h5ad-truncated", "_3_train_gmvae.py", damage("train/cells.h5ad", truncate), ["cannot read", "rerun _1_"]),
    ("train-clusters-garbage", "_3_train_gmvae.py", then_rm("train/cells.h5ad", write_file(
        "train/clusters.csv", "x\n1\n")), ["rows", "rerun _1_"]),
    ("resume-from-tape", "_3_train_gmvae.py", lambda root: (tape_as_gmvae(root)[0], ["--RESUME=true"]),
     ["not a GMVAE checkpoint", "RESUME=false"]),
    ("reference-garbage", "_4_deconvolve_bulk.py", damage("sctape/reference.txt.gz", garbage),
     ["cannot read", "rerun _2_"]),
    ("bulk-garbage", "_4_deconvolve_bulk.py", write_file("my_bulk.tsv", "\x00\x01 garbage\n\x02", ["--BULK={input}"]),
     ["genes shared", "check the species"]),
    ("bulk-no-shared-genes", "_4_deconvolve_bulk.py", bulk_with(lambda t: t.add_prefix("other_")),
     ["only 0 genes shared", "check the species"]),
    ("bulk-nan", "_4_deconvolve_bulk.py", bulk_with(set_first(np.nan)), ["NaN", "fill or drop"]),
    ("bulk-duplicated-sample", "_4_deconvolve_bulk.py",
     bulk_with(lambda t: t.set_axis([t.index[0]] * len(t), axis=0)), ["duplicated sample", "unique name"]),
    ("bulk-all-zero-sample", "_4_deconvolve_bulk.py", bulk_with(lambda t: t.mul(0.0)), ["no counts", "drop"]),
    ("bulk-single-gene", "_4_deconvolve_bulk.py", bulk_with(lambda t: t.iloc[:, :1]), ["genes", "MIN_SHARED_GENES"]),
    ("tape-is-gmvae", "_4_deconvolve_bulk.py", gmvae_as_tape, ["not a bulk2sc TAPE checkpoint", "RETRAIN=true"]),
    ("truth-unknown-types", "_4_deconvolve_bulk.py", damage("sctape/pseudobulk_truth.csv", lambda p: (
        pd.read_csv(p, index_col=0).add_prefix("x").to_csv(p))), ["cell types", "pseudobulk_truth"]),
    ("test-genes-differ-from-checkpoint", "_5_generate_sc.py", other_test_genes,
     ["genes differ", "retrain with _3_"]),
    ("proportions-unknown-type", "_5_generate_sc.py", proportions_with(rename_first_type),
     ["martian", "valid names"]),
    ("proportions-nan", "_5_generate_sc.py", proportions_with(set_first(np.nan)), ["NaN", "rerun _4_"]),
    ("proportions-negative", "_5_generate_sc.py", proportions_with(set_first(-0.5)), ["negative", ">= 0"]),
    ("cell-counts-unknown-type", "_5_generate_sc.py", cell_counts("cell_type,n_cells\nalpha,10\nmartian,5\n"),
     ["martian", "valid names"]),
    ("cell-counts-garbage", "_5_generate_sc.py", cell_counts("\x00\x01\x02"), ["cell_type,n_cells"]),
    ("gmvae-garbage", "_5_generate_sc.py", damage("checkpoints/gmvae.pt", garbage), ["cannot read", "rerun _3_"]),
    ("gmvae-truncated", "_5_generate_sc.py", damage("checkpoints/gmvae.pt", truncate), ["cannot read", "rerun _3_"]),
    ("gmvae-is-tape", "_5_generate_sc.py", tape_as_gmvae, ["not a GMVAE checkpoint", "_3_train_gmvae.py"]),
    ("gmvae-other-dims", "_5_generate_sc.py", gmvae_other_dims, ["do not fit", "_3_train_gmvae.py"]),
    ("gmvae-pickled-module", "_5_generate_sc.py", pickled_module("gmvae_checkpoint"),
     ["weights_only", "_3_train_gmvae.py"]),
    ("resume-pickled-module", "_3_train_gmvae.py", pickled_module("gmvae_checkpoint", ["--RESUME=true"]),
     ["weights_only", "RESUME=false"]),
    ("tape-pickled-module", "_4_deconvolve_bulk.py", pickled_module("tape_checkpoint", ["--RETRAIN=false"]),
     ["weights_only", "RETRAIN=true"]),
]


# Run by default (and in CI): one case per stage and per kind of damage. The others are marked
# slow (each is a subprocess of a few seconds) and run with --run-slow.
REPRESENTATIVE = {"rdata-truncated", "mtx-garbage", "mtx-empty", "h5ad-nan", "labels-unknown-barcodes",
                  "train-test-genes-differ", "resume-from-tape", "bulk-duplicated-sample", "truth-unknown-types",
                  "cell-counts-unknown-type", "gmvae-other-dims", "gmvae-pickled-module"}


@pytest.mark.parametrize("stage,setup,words", [
    pytest.param(*case[1:], id=case[0], marks=() if case[0] in REPRESENTATIVE else pytest.mark.slow)
    for case in CASES])
def test_bad_input_is_refused_clearly(pipeline, tmp_path, stage, setup, words):
    root = copy_of(pipeline, tmp_path)
    damaged, extra = setup(root)
    damaged = Path(damaged)
    extra = [a.format(input=damaged) for a in extra]
    before = checksums(root)
    done = run_stage(stage, root, extra)
    message = error_message(done)
    shown = damaged.name if damaged.is_file() else damaged.name + "/"
    assert damaged.name in message or str(damaged) in message, f"{shown} not named in: {message}"
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    after = checksums(root)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert changed == [], f"{stage} changed {changed} while refusing {damaged.name}"
    assert not (root.parent / "unpickled_marker").exists(), "the pickled payload ran"


@pytest.mark.slow
def test_warned_but_accepted_inputs(pipeline, tmp_path):
    """Proportions off 1 are renormalised with a warning; a type of one cell is dropped, logged."""
    root = copy_of(pipeline, tmp_path)
    paths = Paths(root)
    table = pd.read_csv(paths.proportions, index_col=0)
    (table * 3).to_csv(paths.proportions)
    done = run_ok("_5_generate_sc.py", root, ["--CONDITION=none"])
    assert "not 1; renormalising" in done.stderr
    labels = pd.read_csv(paths.raw_cell_types)
    labels.loc[0, "cell_type"] = "loner"
    labels.to_csv(paths.raw_cell_types, index=False)
    done = run_ok("_1_split_train_test.py", root)
    assert "dropping types with < 30 cells: ['loner']" in done.stderr
    assert "loner" not in set(io.read_dataset(paths.train_dir).obs["cell_type"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_unwritable_data_dir(pipeline, tmp_path):
    root = copy_of(pipeline, tmp_path)
    shutil.rmtree(root / "generated")
    before = checksums(root)
    os.chmod(root, 0o500)
    try:
        done = run_stage("_5_generate_sc.py", root, ["--CONDITION=none"])
    finally:
        os.chmod(root, 0o755)
    message = error_message(done)
    assert "permission denied" in message and "DATA_DIR" in message and str(root) in message
    assert checksums(root) == before


def test_permission_error_is_one_line(pipeline, tmp_path):
    """What an unwritable DATA_DIR gives, also where the test runs as root (which chmod cannot stop):
    the stage's first mkdir under generated/ raises EACCES, as the kernel would."""
    root = copy_of(pipeline, tmp_path)
    shutil.rmtree(root / "generated")
    before = checksums(root)
    refuse = ("import errno, pathlib, runpy, sys\n"
              "real = pathlib.Path.mkdir\n"
              "def mkdir(self, *a, **k):\n"
              "    if 'generated' in str(self):\n"
              "        raise PermissionError(errno.EACCES, 'Permission denied', str(self))\n"
              "    return real(self, *a, **k)\n"
              "pathlib.Path.mkdir = mkdir\n"
              "sys.argv = sys.argv[1:]\n"
              "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    command = stage_command("_5_generate_sc.py", root, ["--CONDITION=none"])
    done = subprocess.run([command[0], "-c", refuse, *command[1:]], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    message = error_message(done)
    assert "permission denied" in message and "--DATA_DIR" in message and str(root / "generated") in message
    assert checksums(root) == before


# ----------------------------------------------------------------------------- crashes
# Runs a stage with torch.save writing half its bytes, then waiting to be killed: a SIGKILL
# then lands, deterministically, in the middle of a checkpoint write.
HALF_SAVE = """
import io, os, runpy, sys, time
import torch
real = torch.save
def half_save(obj, f, *args, **kwargs):
    buffer = io.BytesIO()
    real(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    open(os.environ["SAVING_MARKER"], "w").close()
    time.sleep(600)
torch.save = half_save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def wait_for(condition, process, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the stage ended (exit {process.returncode}) before the kill"
        assert time.monotonic() < deadline, "timed out waiting for the stage to start writing"
        time.sleep(0.05)


def kill(process) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


def assert_old_or_absent(before: dict, after: dict, root: Path, allowed_new=()) -> None:
    """After a crash: every final file is byte-identical to its old self, or absent; new files are
    only hidden temporaries (``.<name>...tmp``) or ``allowed_new`` (complete, checked by the caller)."""
    for name, digest in before.items():
        if name in allowed_new:
            continue
        assert after.get(name) == digest, f"{name} changed by the killed run"
    for name in set(after) - set(before):
        if name in allowed_new:
            continue
        leaf = Path(name).name
        assert leaf.startswith(".") and leaf.endswith(".tmp"), f"the killed run left {name} at a final path"


@pytest.fixture(scope="module")
def small_dir(pipeline, tmp_path_factory) -> Path:
    """train/ and test/ of the pipeline on its first 50 genes, and a GMVAE trained on them: cheap cells."""
    root = tmp_path_factory.mktemp("small") / "data"
    paths, source = Paths(root), Paths(pipeline)
    for split in ("train", "test"):
        io.write_dataset(io.read_dataset(source.split_dir(split))[:, :50].copy(), paths.split_dir(split))
    run_ok("_3_train_gmvae.py", root)
    return root


def test_kill_during_checkpoint_write(small_dir, tmp_path):
    root = copy_of(small_dir, tmp_path)
    paths = Paths(root)
    before = checksums(root)
    marker = tmp_path / "saving"
    command = stage_command("_3_train_gmvae.py", root, ["--SAVE_EVERY=1", "--SEED=1"])
    process = subprocess.Popen([command[0], "-c", HALF_SAVE, *command[1:]], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "SAVING_MARKER": str(marker)})
    wait_for(marker.exists, process)
    kill(process)
    after = checksums(root)
    history = "checkpoints/history.csv"  # rewritten whole after every epoch: complete, one row so far
    assert_old_or_absent(before, after, root, allowed_new=[history])
    assert len(pd.read_csv(paths.gmvae_history)) == 1
    leftovers = list(paths.checkpoints_dir.glob(".gmvae.pt.*.tmp"))
    assert len(leftovers) == 1 and 0 < leftovers[0].stat().st_size < paths.gmvae_checkpoint.stat().st_size
    from models.train import load_gmvae

    load_gmvae(paths.gmvae_checkpoint)  # the old checkpoint still loads
    run_ok("_3_train_gmvae.py", root, ["--SEED=1"])  # a rerun succeeds, and clears the dead run's temporary
    assert not list(paths.checkpoints_dir.glob(".*.tmp"))
    model, meta = load_gmvae(paths.gmvae_checkpoint)
    assert meta["epoch"] == 2 and meta["settings"]["SEED"] == 1


def mtx_header(path: Path) -> list[int]:
    with open(path) as handle:
        return [int(v) for v in next(line for line in handle if not line.startswith("%")).split()]


def test_kill_during_generation_and_concurrent_runs(small_dir, tmp_path):
    """Stage 5 killed while it writes 100,000 cells leaves the previous generated/ as it was; a
    rerun succeeds; two runs in two DATA_DIRs at once give each run's files alone."""
    root = copy_of(small_dir, tmp_path)
    paths = Paths(root)
    (root / "counts_small.csv").write_text("cell_type,n_cells\nalpha,12000\nbeta,5000\ngamma,3000\n")
    (root / "counts_large.csv").write_text("cell_type,n_cells\nalpha,60000\nbeta,25000\ngamma,15000\n")
    small = [f"--CELL_COUNTS={root / 'counts_small.csv'}", "--FIGURES=false"]
    large = [f"--CELL_COUNTS={root / 'counts_large.csv'}", "--FIGURES=false"]
    run_ok("_5_generate_sc.py", root, small)  # the previous outputs: 20,000 cells
    alone = checksums(paths.generated_dir)
    before = checksums(root)

    process = subprocess.Popen(stage_command("_5_generate_sc.py", root, large), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    body = paths.generated_dir / ".matrix.mtx.body.tmp"
    wait_for(lambda: body.exists() and body.stat().st_size > 2_000_000, process)  # ~20-40k cells in
    kill(process)
    assert_old_or_absent(before, checksums(root), root)
    assert mtx_header(paths.generated_dir / "matrix.mtx")[:2] == [50, 20_000]

    run_ok("_5_generate_sc.py", root, large)  # the rerun overwrites the dead run's temporaries
    assert mtx_header(paths.generated_dir / "matrix.mtx")[:2] == [50, 100_000]
    import anndata as ad

    generated = ad.read_h5ad(paths.generated_dir / "cells.h5ad", backed="r")
    assert generated.shape == (100_000, 50)
    assert len(io.read_lines(paths.generated_dir / "barcodes.tsv")) == 100_000
    assert not [p.name for p in paths.generated_dir.iterdir() if p.name.endswith(".tmp")]

    # two DATA_DIRs at once: each gets the files of the same run alone
    others = [copy_of(small_dir, tmp_path / name) for name in ("x", "y")]
    runs = [subprocess.Popen(stage_command("_5_generate_sc.py", other, small), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for other in others]
    for run in runs:
        _, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr[-2000:]
    for other in others:
        together = checksums(Paths(other).generated_dir)
        assert together.pop("config.json") != alone["config.json"]  # holds its own DATA_DIR
        assert together == {k: v for k, v in alone.items() if k != "config.json"}


# ----------------------------------------------------------------------------- determinism
def comparable(root: Path) -> dict[str, object]:
    """Every output file's sha256, except what legitimately differs between two DATA_DIRs:

    - config.json / bulk.json / the checkpoint's ``settings`` hold the DATA_DIR path: compared
      with the path replaced (checkpoints: tensors and values compared instead of bytes);
    - history.csv's ``seconds`` and metrics.json's ``seconds`` are wall times: dropped;
    - gmvae.pt: tensors compared, as the spec asks (its bytes differ only by the path).
    """
    import torch

    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = str(path.relative_to(root))
        if path.suffix == ".json":
            def scrub(value):
                if isinstance(value, dict):
                    return {k: scrub(v) for k, v in value.items() if k != "seconds"}
                if isinstance(value, list):
                    return [scrub(v) for v in value]
                return value.replace(str(root), "<DATA_DIR>") if isinstance(value, str) else value
            out[name] = scrub(json.loads(path.read_text()))
        elif path.name == "history.csv":
            out[name] = pd.read_csv(path).drop(columns="seconds").to_dict("list")
        elif path.name == "gmvae.pt":
            checkpoint = torch.load(path, weights_only=True)
            checkpoint["settings"] = {k: v.replace(str(root), "<DATA_DIR>") if isinstance(v, str) else v
                                      for k, v in checkpoint["settings"].items()}
            out[name] = {"tensors": {k: v.numpy().tobytes() for k, v in checkpoint.pop("state_dict").items()},
                         "optimizer": repr(checkpoint.pop("optimizer")), **checkpoint}
        else:
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def test_same_seed_same_outputs(pipeline, tmp_path):
    """All six stages again in another DATA_DIR: byte-identical files (stage 3: equal tensors)."""
    again = run_chain(tmp_path / "again")
    first, second = comparable(pipeline), comparable(again)
    assert sorted(first) == sorted(second)
    differ = [name for name in first if first[name] != second[name]]
    assert differ == []
    # byte-identical, not only equal after scrubbing, wherever no path or wall time is held
    raw = checksums(pipeline), checksums(again)
    exact = [n for n in raw[0] if not n.endswith((".json", "history.csv", "gmvae.pt"))]
    assert len(exact) > 30 and all(raw[0][n] == raw[1][n] for n in exact)
    assert "checkpoints/tape.pt" in exact and "sctape/reference.txt.gz" in exact


def test_the_pickled_payload_is_live(tmp_path):
    """The gmvae-pickled-module case means something: without weights_only the payload runs."""
    import torch

    root = tmp_path / "data"
    Paths(root).checkpoints_dir.mkdir(parents=True)
    path, _ = pickled_module("gmvae_checkpoint")(root)
    torch.load(path, weights_only=False)
    assert (tmp_path / "unpickled_marker").exists()
