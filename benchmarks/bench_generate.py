"""Stage 5 benchmark: generation throughput / peak RSS, and fidelity on held-out Zheng PBMC.

Throughput (``--part=throughput``): each size runs ``_5_generate_sc.py`` in its own process
(so the peak RSS is its own, read with /usr/bin/time) with an untrained GMVAE at 16,318
genes and 17 types (the lung data's shape). The decoder's mean bias is set so a cell has
~900 counts over ~700 genes, like the real lung test cells (2,267,906 counts / 2,547 cells),
because output size, not the weights, is what costs. The full files are written
(matrix.mtx, cells.h5ad, ...) and then deleted.

Fidelity (``--part=fidelity``): the shared Zheng PBMC (../shared/data/pbmc_zheng7, 3,500 cells,
7 sorted types) split 75/25 with ``stratified_split(..., 0.25, 123)``; ``_3_train_gmvae.py``
with its defaults trains the GMVAE on the 75%; ``_5_`` generates as many cells of each type as
the test split holds (``CELL_COUNTS``) and scores them against the test cells, beside the NB
baseline and the real-vs-real halves; then ``_5_`` again with SEED 1..``--seeds``-1 (the scores move
with the generated cells) for each score's mean and range. Figures go to ``--fig`` (default fig/bench_generate) and,
with ``--readme``, also to fig/readme/.

Run (heavy: take the shared lock so timings do not overlap other benchmarks):
    flock /tmp/bulk2sc_heavy.lock .venv/bin/python benchmarks/bench_generate.py --part=fidelity --readme
    flock /tmp/bulk2sc_heavy.lock .venv/bin/python benchmarks/bench_generate.py --part=throughput
Prints tables; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"

LUNG_GENES = 16_318
LUNG_TYPES = 17
TARGET_LIBRARY = 900.0  # mean counts per generated cell (the real lung test cells' mean is 890)


def machine() -> str:
    import torch

    return (f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def run(cmd: list[str], log_path: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a command in a fresh process; its output goes to ``log_path``.

    The log's last lines also hold its CPU seconds (user + system): on a shared machine the wall
    time of a run depends on its neighbours, CPU time much less.
    """
    start = time.perf_counter()
    with open(log_path, "w") as log:
        done = subprocess.run(["/usr/bin/time", "-f", "CPU_S %U %S\nPEAK_KIB %M", *cmd], stdout=log,
                              stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    text = log_path.read_text()
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (log {log_path}):\n{text[-3000:]}")
    peak = [line for line in text.splitlines() if line.startswith("PEAK_KIB")][-1]
    return wall, float(peak.split()[1]) / 1024


# ----------------------------------------------------------------------------- throughput
def make_throughput_dir(root: Path, n_cells: int) -> Path:
    """DATA_DIR with an untrained lung-shaped GMVAE checkpoint and a CELL_COUNTS table."""
    import numpy as np
    import pandas as pd
    import torch

    from models.gmvae import GMVAE
    from models.paths import Paths
    from models.train import save_checkpoint

    paths = Paths(root)
    torch.manual_seed(0)
    model = GMVAE(LUNG_GENES, LUNG_TYPES)
    with torch.no_grad():
        # lognormal-ish gene means summing to ~TARGET_LIBRARY per cell
        rng = np.random.default_rng(0)
        means = rng.lognormal(0.0, 2.0, LUNG_GENES)
        means *= TARGET_LIBRARY / means.sum()
        model.dec_mean.bias.copy_(torch.as_tensor(np.log(means), dtype=torch.float32))
        model.dec_theta.bias.fill_(0.0)  # theta ~ 1
        if model.dec_dropout is not None:
            model.dec_dropout.bias.fill_(-2.0)  # ~12% structural zeros
    types = [f"type{k}" for k in range(LUNG_TYPES)]
    save_checkpoint(paths.gmvae_checkpoint, model, None, 0, [f"GENE{i}" for i in range(LUNG_GENES)], types)
    proportions = rng.dirichlet(np.ones(LUNG_TYPES))
    from models.generate import largest_remainder

    counts = pd.DataFrame({"cell_type": types, "n_cells": largest_remainder(proportions, n_cells)})
    counts.to_csv(root / "cell_counts.csv", index=False)
    return root / "cell_counts.csv"


def throughput(sizes: list[int], work: Path, chunk_cells: int) -> None:
    rows = []
    for n_cells in sizes:
        root = work / f"throughput_{n_cells}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        counts = make_throughput_dir(root, n_cells)
        cmd = [sys.executable, str(REPO / "_5_generate_sc.py"), f"--DATA_DIR={root}", f"--CELL_COUNTS={counts}",
               "--EVALUATE=false", "--FIGURES=false", "--TORCH_THREADS=2", f"--CHUNK_CELLS={chunk_cells}"]
        wall, peak = run(cmd, root / "generate.log")
        cpu = [line for line in (root / "generate.log").read_text().splitlines() if line.startswith("CPU_S")][-1]
        cpu_s = sum(float(v) for v in cpu.split()[1:])
        out = root / "generated"
        sizes_mb = {name: (out / name).stat().st_size / 2**20 for name in ("matrix.mtx", "cells.h5ad")}
        import h5py

        with h5py.File(out / "cells.h5ad", "r") as h5:
            nnz = int(h5["X/data"].shape[0])
        rows.append((n_cells, wall, n_cells / wall, peak, sizes_mb["matrix.mtx"], sizes_mb["cells.h5ad"], nnz, cpu_s))
        print(f"{n_cells:>9,} cells: {wall:7.1f} s ({cpu_s:.0f} CPU s)  {n_cells / wall:8.0f} cells/s  "
              f"peak RSS {peak:6.0f} MiB  "
              f"matrix.mtx {sizes_mb['matrix.mtx']:8.0f} MiB  cells.h5ad {sizes_mb['cells.h5ad']:7.0f} MiB  "
              f"{nnz / n_cells:.0f} nonzero genes/cell", flush=True)
        shutil.rmtree(root)
    print(f"\nthroughput at {LUNG_GENES:,} genes, {LUNG_TYPES} types, CHUNK_CELLS={chunk_cells}, 2 torch threads")
    print("| cells | wall s | CPU s | cells/s (wall) | peak RSS MiB | matrix.mtx MiB | cells.h5ad MiB | nonzeros/cell |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n_cells, wall, rate, peak, mtx, h5ad, nnz, cpu_s in rows:
        print(f"| {n_cells:,} | {wall:.1f} | {cpu_s:.0f} | {rate:,.0f} | {peak:,.0f} | {mtx:,.0f} | {h5ad:,.0f} | "
              f"{nnz / n_cells:.0f} |")


# ----------------------------------------------------------------------------- fidelity
def prepare_pbmc(root: Path) -> None:
    """DATA_DIR/train and test from the shared Zheng PBMC with stratified_split(..., 0.25, 123)."""
    import pandas as pd

    from models import io
    from models.paths import Paths
    from models.split import stratified_split

    source = SHARED / "pbmc_zheng7"
    counts = io.read_mtx(source / "matrix.mtx.gz").T.tocsr()  # cells x genes
    genes, barcodes = io.read_gene_names(source / "genes.tsv"), io.read_lines(source / "barcodes.tsv")
    labels = pd.read_csv(source / "celltypes.csv").set_index("barcode").loc[barcodes, "cell_type"].astype(str)
    adata = io.make_anndata(counts, genes, barcodes, labels.to_numpy())
    train, test = stratified_split(adata.obs["cell_type"], 0.25, 123)
    paths = Paths(root)
    io.write_dataset(adata[train].copy(), paths.train_dir)
    io.write_dataset(adata[test].copy(), paths.test_dir)


def fidelity(work: Path, fig_dir: Path, readme: bool, retrain: bool, train_args: list[str], seeds: int = 4) -> None:
    import pandas as pd

    from models.paths import Paths

    root = work / "pbmc"
    paths = Paths(root)
    if retrain or not paths.gmvae_checkpoint.exists():
        shutil.rmtree(root, ignore_errors=True)
        prepare_pbmc(root)
        wall, peak = run([sys.executable, str(REPO / "_3_train_gmvae.py"), f"--DATA_DIR={root}",
                          f"--FIG_DIR={fig_dir}", *train_args], work / "train.log")
        print(f"_3_train_gmvae.py {' '.join(train_args) or '(defaults)'} on {root}: {wall:.0f} s, "
              f"peak RSS {peak:.0f} MiB", flush=True)
    print(f"held-out -ELBO per test cell (stage 3 never reads test/): {heldout_nelbo(paths):.1f} nats", flush=True)
    clusters = pd.read_csv(paths.test_dir / "clusters.csv")
    counts = clusters["cell_type"].value_counts().rename_axis("cell_type").reset_index(name="n_cells")
    counts.to_csv(work / "pbmc_test_counts.csv", index=False)
    wall, peak = run([sys.executable, str(REPO / "_5_generate_sc.py"), f"--DATA_DIR={root}", f"--FIG_DIR={fig_dir}",
                      f"--CELL_COUNTS={work / 'pbmc_test_counts.csv'}"], work / "generate.log")
    print(f"_5_generate_sc.py on {root}: {wall:.0f} s (with metrics and figures), peak RSS {peak:.0f} MiB")
    metrics = json.loads(paths.generated_metrics.read_text())
    keys = [("per_type_mean_r_median", "per-type mean r (median)", ">= 0.97"), ("per_type_mean_r_min",
            "per-type mean r (worst type)", ""), ("auroc", "real-vs-generated AUROC", "<= 0.55"),
            ("auroc_quadratic", "AUROC, PCs + squared PCs", ""),
            ("mmd", "MMD (PCA, RBF)", ""), ("ks_library_size", "KS library size", "<= 0.1"),
            ("ks_zero_fraction", "KS zero fraction", ""), ("gene_correlation_r", "gene-gene correlation r", ""),
            ("gene_correlation_r_within_type", "gene-gene correlation r within types", ""),
            ("mean_library_size_generated", "mean library size", "")]
    reference = dict(metrics["real_vs_real"])
    reference["mmd"] = metrics["gmvae"]["mmd_real_halves"]
    print(f"\nZheng PBMC held out: {metrics['n_test_cells']} test cells, {metrics['n_cells']} generated "
          "(the test split's counts per type)")
    print("| metric | GMVAE | NB baseline | real vs real (test halves) | target |")
    print("|---|---:|---:|---:|---|")
    for key, name, target in keys:
        print(f"| {name} | {metrics['gmvae'][key]:.4f} | {metrics['nb_baseline'][key]:.4f} | "
              f"{reference[key]:.4f} | {target} |")
    print(f"| mean library size, real test | {metrics['gmvae']['mean_library_size_real']:.1f} | | | |")
    print("\nper-type mean r (GMVAE / NB baseline):")
    for name, value in metrics["gmvae"]["per_type_r"].items():
        print(f"  {name:10s} {value:.4f} / {metrics['nb_baseline']['per_type_r'][name]:.4f}")
    if readme:
        target = REPO / "fig" / "readme"
        target.mkdir(parents=True, exist_ok=True)
        for name in ("generated_proportions.png", "generated_umap.png", "generated_gene_correlation.png"):
            shutil.copy(fig_dir / name, target / f"pbmc_{name}")
        print(f"copied the figures to {target}")
    if seeds > 1:
        seed_spread(root, work, fig_dir, metrics, seeds)


def heldout_nelbo(paths) -> float:
    """Mean -ELBO per cell of the test split under the saved GMVAE (z drawn with fixed seeds)."""
    import numpy as np

    from models import io
    from models.train import evaluate, load_gmvae

    model, meta = load_gmvae(paths.gmvae_checkpoint)
    test = io.read_dataset(paths.test_dir)[:, meta["genes"]]
    codes, _ = io.encode_labels(test.obs["cell_type"], meta["cell_types"])
    return evaluate(model, test.X.tocsr(), np.asarray(codes), 256, "cpu")["loss"]


def seed_spread(root: Path, work: Path, fig_dir: Path, first: dict, seeds: int) -> None:
    """The generated cells (GMVAE and NB baseline) differ with SEED; so do their scores, by about as
    much as the two generators differ. Rerun _5_ with SEEDs 1..seeds-1 (same models, same test
    cells) and print each score's mean and range over the seeds."""
    from models.paths import Paths

    runs = [first]
    for seed in range(1, seeds):
        run([sys.executable, str(REPO / "_5_generate_sc.py"), f"--DATA_DIR={root}", f"--FIG_DIR={fig_dir}",
             f"--CELL_COUNTS={work / 'pbmc_test_counts.csv'}", "--FIGURES=false", f"--SEED={seed}"],
            work / f"generate_seed{seed}.log")
        runs.append(json.loads(Paths(root).generated_metrics.read_text()))
    print(f"\nover SEED = 0..{seeds - 1} (mean, and min..max):")
    print("| metric | GMVAE | NB baseline | GMVAE lower in |")
    print("|---|---|---|---:|")
    for key in ("auroc", "auroc_quadratic", "mmd", "ks_library_size", "ks_zero_fraction"):
        ours = np.array([r["gmvae"][key] for r in runs])
        base = np.array([r["nb_baseline"][key] for r in runs])
        print(f"| {key} | {ours.mean():.4f} ({ours.min():.4f}..{ours.max():.4f}) | "
              f"{base.mean():.4f} ({base.min():.4f}..{base.max():.4f}) | {(ours < base).sum()}/{len(runs)} seeds |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["throughput", "fidelity", "all"], default="all")
    parser.add_argument("--sizes", default="100000,1000000", help="cells per throughput run, comma-separated")
    parser.add_argument("--chunk-cells", type=int, default=8192)
    parser.add_argument("--work", default="/tmp/bulk2sc_bench_generate")
    parser.add_argument("--fig", default=str(REPO / "fig" / "bench_generate"))
    parser.add_argument("--readme", action="store_true", help="also copy the PBMC figures to fig/readme/")
    parser.add_argument("--retrain", action="store_true", help="rebuild the PBMC split and retrain the GMVAE")
    parser.add_argument("--seeds", type=int, default=4, help="fidelity: also score SEEDs 1..seeds-1 of _5_")
    parser.add_argument("--train-args", default="", help="overrides for _3_train_gmvae.py, e.g. '--EPOCHS=15'")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {machine()}\n", flush=True)
    if args.part in ("fidelity", "all"):
        if not (SHARED / "pbmc_zheng7").is_dir():
            sys.exit(f"{SHARED / 'pbmc_zheng7'} is absent")
        fidelity(work, Path(args.fig), args.readme, args.retrain, args.train_args.split(), args.seeds)
    if args.part in ("throughput", "all"):
        throughput([int(s) for s in args.sizes.split(",")], work, args.chunk_cells)


if __name__ == "__main__":
    main()
