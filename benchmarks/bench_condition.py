"""Stage 5 benchmark: does conditioning on the bulk give cells that carry the bulk sample's state?

Kang et al. 2018 (../shared/data/kang_ifnb): PBMC, control and IFN-beta stimulated. The GMVAE
is trained on control cells only (a stratified 75/25 split of them, ``stratified_split(..., 0.25,
123)``, with their labels; ``_3_train_gmvae.py`` at its defaults). The bulks are made from the
stimulated cells: one of all of them ("stim_all") and ``--cohort`` pseudo-bulks whose type
proportions are Dirichlet draws (so type-specific shifts are identifiable across samples). Stage
5 runs with ``CONDITION=auto`` and ``CONDITION=none``; each sample's cells are scored against the
real stimulated cells that made its bulk.

Metrics (per sample; then the mean over samples):
- real-vs-generated classifier AUROC (models.evaluation.classifier_auroc), with real-vs-real (two
  halves of the sample's real cells) as the ceiling;
- per-type mean-expression r (models.evaluation.per_type_mean_r);
- LFC recovery: per type, over the 200 genes with the largest real response in that type
  (|mean log-normalised stim - control test|, from all stimulated cells of the type), the r
  between (generated conditioned - generated unconditioned) and (real stimulated cells of the
  sample - real control test cells); median over types with >= 10 cells in the sample;
- type-specific recovery: the same after removing, gene by gene, the cell-weighted mean over
  types from each type's LFC (a shared per-gene ratio scores 0 here);
- the interferon genes' recovery per type: mean generated LFC / mean real LFC over a named set
  (an evaluation gene list only: the method never sees it).
Also: the shared per-gene ratio (real stim / real control pseudo-bulk applied to every type) as
the floor of the LFC metric; the relative mode with the control test cells' pseudo-bulk as
BULK_BASELINE; the same under a simulated platform (every gene x a fixed log-normal factor, in
both sample and baseline); the reference's own test-cell bulk (AUROC change); and the fit's time
at lung scale (16,000 genes, 17 types, a randomly initialised model).

By default the true cell counts of each bulk go to stage 5 (as deconvolution/proportions.csv);
``--stage4`` runs _2_ and _4_ (TAPE, minutes) on the bulks instead, once for the record.

Run (heavy: take the shared lock):
    flock /tmp/bulk2sc_heavy.lock .venv/bin/python benchmarks/bench_condition.py
    flock /tmp/bulk2sc_heavy.lock .venv/bin/python benchmarks/bench_condition.py --part=timing
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
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"

LUNG_GENES = 16_000
LUNG_TYPES = 17
N_TOP_RESPONSE = 200  # genes with the largest real response per type (the metric)
MIN_TYPE_CELLS = 10  # a type needs this many real cells in a sample for its LFC to count
INTERFERON_GENES = ["ISG15", "IFI6", "IFIT1", "IFIT2", "IFIT3", "MX1", "OAS1", "LY6E", "IFITM3", "ISG20"]


def machine() -> str:
    import torch

    return (f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def run(cmd: list[str], log_path: Path) -> float:
    """Wall seconds of a command in a fresh process; its output goes to ``log_path``."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed (log {log_path}):\n{log_path.read_text()[-3000:]}")
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- data
def read_kang():
    """(cells x genes CSR counts, genes, obs with cell_type and condition)."""
    from models import io

    source = SHARED / "kang_ifnb"
    counts = io.read_mtx(source / "matrix.mtx.gz").T.tocsr()
    genes, barcodes = io.read_lines(source / "genes.tsv"), io.read_lines(source / "barcodes.tsv")
    obs = pd.read_csv(source / "celltypes.csv").set_index("barcode").loc[barcodes]
    return counts, genes, obs


def prepare_reference(root: Path, counts, genes, obs) -> None:
    """DATA_DIR/train and test: the control cells, stratified 75/25 with their labels."""
    from models import io
    from models.paths import Paths
    from models.split import stratified_split

    control = np.flatnonzero(obs["condition"].to_numpy() == "ctrl")
    adata = io.make_anndata(counts[control], genes, obs.index[control], obs["cell_type"].to_numpy()[control])
    train, test = stratified_split(adata.obs["cell_type"], 0.25, 123)
    paths = Paths(root)
    io.write_dataset(adata[train].copy(), paths.train_dir)
    io.write_dataset(adata[test].copy(), paths.test_dir)


def make_bulks(counts, genes, obs, n_cohort: int, cells_per_bulk: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Sample name -> indices of the stimulated cells behind it: all of them, then Dirichlet cohorts.

    Each cohort sample draws type shares from a flat Dirichlet and takes that many stimulated
    cells of each type without replacement (capped at what the type has).
    """
    rng = np.random.default_rng(seed)
    stim = obs["condition"].to_numpy() == "stim"
    types = obs["cell_type"].to_numpy()
    names = sorted(pd.unique(types[stim]))
    members = {name: np.flatnonzero(stim & (types == name)) for name in names}
    bulks = {"stim_all": np.flatnonzero(stim)}
    from models.generate import largest_remainder

    for s in range(n_cohort):
        wanted = largest_remainder(rng.dirichlet(np.ones(len(names))), cells_per_bulk)
        chosen = [rng.choice(members[n], size=min(int(w), len(members[n])), replace=False)
                  for n, w in zip(names, wanted)]
        bulks[f"cohort{s:02d}"] = np.sort(np.concatenate(chosen))
    return bulks


def bulk_table(counts, genes, groups: dict[str, np.ndarray], factor: np.ndarray | None = None) -> pd.DataFrame:
    """Samples x genes summed counts (times a per-gene ``factor``: a simulated platform)."""
    rows = np.vstack([np.asarray(counts[idx].sum(axis=0)).ravel() for idx in groups.values()]).astype(np.float64)
    if factor is not None:
        rows = rows * factor[None, :]
    return pd.DataFrame(rows, index=list(groups), columns=genes)


def type_shares(obs, groups: dict[str, np.ndarray], cell_types: list[str]) -> pd.DataFrame:
    types = obs["cell_type"].to_numpy()
    return pd.DataFrame([[np.mean(types[idx] == t) for t in cell_types] for idx in groups.values()],
                        index=list(groups), columns=cell_types)


# ----------------------------------------------------------------------------- scoring
def type_means(normed, types: np.ndarray, cell_types: list[str]) -> dict[str, np.ndarray]:
    return {t: np.asarray(normed[types == t].mean(axis=0)).ravel() for t in cell_types if (types == t).any()}


def read_generated(folder: Path):
    from models import io

    data = io.read_dataset(folder)
    return data.X, data.obs["cell_type"].astype(str).to_numpy()


def score_sample(real, real_types, control_means, generated, generated_types, unconditioned_means,
                 top_genes: dict[str, np.ndarray], cell_types, gene_index: dict[str, int], seed: int = 0) -> dict:
    """The issue's metrics of one sample's generated cells against its real stimulated cells."""
    from models import evaluation
    from models.metrics import pearson_r

    real_normed, generated_normed = evaluation.log_normalize(real), evaluation.log_normalize(generated)
    hvg = evaluation.top_variable_genes(real_normed, 2000)
    auroc = evaluation.classifier_auroc(real_normed[:, hvg], generated_normed[:, hvg], seed=seed)
    per_type = evaluation.per_type_mean_r(real_normed, real_types, generated_normed, generated_types)
    real_means = type_means(real_normed, real_types, cell_types)
    generated_means = type_means(generated_normed, generated_types, cell_types)
    counted = [t for t in cell_types if (real_types == t).sum() >= MIN_TYPE_CELLS and t in generated_means]
    real_lfc = {t: real_means[t] - control_means[t] for t in counted}
    generated_lfc = {t: generated_means[t] - unconditioned_means[t] for t in counted}
    weights = np.array([(real_types == t).sum() for t in counted], dtype=np.float64)
    weights /= weights.sum()
    real_mean_lfc = sum(w * real_lfc[t] for w, t in zip(weights, counted))
    generated_mean_lfc = sum(w * generated_lfc[t] for w, t in zip(weights, counted))
    lfc_r = {t: pearson_r(generated_lfc[t][top_genes[t]], real_lfc[t][top_genes[t]]) for t in counted}
    specific_r = {t: pearson_r((generated_lfc[t] - generated_mean_lfc)[top_genes[t]],
                               (real_lfc[t] - real_mean_lfc)[top_genes[t]]) for t in counted}
    isg = [gene_index[g] for g in INTERFERON_GENES if g in gene_index]
    isg_recovery = {t: float(generated_lfc[t][isg].mean() / real_lfc[t][isg].mean()) for t in counted}
    return {"auroc": auroc, "per_type_mean_r": float(np.median(list(per_type.values()))),
            "lfc_r": float(np.median(list(lfc_r.values()))), "specific_r": float(np.median(list(specific_r.values()))),
            "lfc_r_types": lfc_r, "specific_r_types": specific_r, "isg_recovery": isg_recovery}


def real_vs_real_auroc(real, seed: int = 0) -> float:
    from models import evaluation

    normed = evaluation.log_normalize(real)
    hvg = evaluation.top_variable_genes(normed, 2000)
    first, second = evaluation.halves(real.shape[0], seed)
    return evaluation.classifier_auroc(normed[first][:, hvg], normed[second][:, hvg], seed=seed)
