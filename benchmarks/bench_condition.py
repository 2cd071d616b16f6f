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
at lung scale (16,000 genes, 17 types, a randomly initialised model). ``--part=ceiling``: cells
drawn through each type's true change, matched in mean count (what a bulk gives) or in mean
log-normalised expression, scored against held-out stimulated cells: how far any fit of a bulk
can take the AUROC.

By default the true cell counts of each bulk go to stage 5 (as deconvolution/proportions.csv);
``--stage4`` runs _2_ and _4_ (TAPE, minutes) on the bulks instead, once for the record
(``--reuse-stage4``: keep an earlier run's, when they are of the same bulks).

Run (heavy: take the shared lock):
    flock /tmp/bulk2sc_heavy.lock .venv/bin/python benchmarks/bench_condition.py
    flock /tmp/bulk2sc_heavy.lock .venv/bin/python benchmarks/bench_condition.py --part=timing
    flock /tmp/bulk2sc_heavy.lock .venv/bin/python benchmarks/bench_condition.py --part=ceiling
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
    genes, barcodes = io.read_gene_names(source / "genes.tsv"), io.read_lines(source / "barcodes.tsv")
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
    counted = [t for t in cell_types if (real_types == t).sum() >= MIN_TYPE_CELLS and t in generated_means
               and t in unconditioned_means]  # a type the unconditioned shares left out has no LFC
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


# ----------------------------------------------------------------------------- runs
def stage5(root: Path, work: Path, name: str, extra: list[str]) -> tuple[Path, float]:
    """Run _5_ on ``root`` (EVALUATE=false), move generated/ to work/<name>; (folder, wall s)."""
    from models.paths import Paths

    paths = Paths(root)
    shutil.rmtree(paths.generated_dir, ignore_errors=True)
    wall = run([sys.executable, str(REPO / "_5_generate_sc.py"), f"--DATA_DIR={root}", f"--FIG_DIR={work / 'fig'}",
                "--EVALUATE=false", "--TORCH_THREADS=2", *extra], work / f"{name}.log")
    target = work / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.move(str(paths.generated_dir), target)
    return target, wall


def score_run(folder: Path, unconditioned: Path, groups, counts, obs, control_means, top, cell_types, gene_index,
              several: bool) -> pd.DataFrame:
    from models import evaluation

    rows = {}
    stim_types = obs["cell_type"].to_numpy()
    for name, idx in groups.items():
        sub = (lambda f: f / name) if several else (lambda f: f)
        generated, generated_types = read_generated(sub(folder))
        plain, plain_types = read_generated(sub(unconditioned))
        plain_means = type_means(evaluation.log_normalize(plain), plain_types, cell_types)
        rows[name] = score_sample(counts[idx], stim_types[idx], control_means, generated, generated_types,
                                  plain_means, top, cell_types, gene_index)
    return pd.DataFrame(rows).T


VARIANTS = ("auto", "shared", "relative", "platform_relative", "platform_absolute")


def stage4(root: Path, work: Path, bulk: Path, truth: pd.DataFrame, reuse: bool = False,
           extra: tuple[str, ...] = ()) -> None:
    """_2_ and _4_ (TAPE, at their defaults) on ``bulk``: stage 5 then reads stage 4's proportions and bulk.json.

    ``reuse``: keep the proportions of an earlier run when bulk.json names this bulk and they cover its samples.
    """
    from models.metrics import proportion_metrics
    from models.paths import Paths

    paths = Paths(root)
    if reuse and paths.bulk_record.exists() and json.loads(paths.bulk_record.read_text())["path"] == str(bulk):
        predicted = pd.read_csv(paths.proportions, index_col=0)
        if set(truth.index) <= set(predicted.index.astype(str)):
            metrics = proportion_metrics(predicted.loc[truth.index, truth.columns], truth)
            print(f"_4_'s proportions of an earlier run reused (--reuse-stage4): MAE "
                  f"{metrics.loc['overall', 'mae']:.4f}; {departing(paths)}", flush=True)
            return
    paths.gene_length.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(SHARED / "gene_length_hg19.csv.gz", paths.gene_length.with_name("GeneLength.txt.gz"))
    with __import__("gzip").open(paths.gene_length.with_name("GeneLength.txt.gz"), "rb") as source, \
            open(paths.gene_length, "wb") as target:
        shutil.copyfileobj(source, target)
    wall2 = run([sys.executable, str(REPO / "_2_prepare_sctape.py"), f"--DATA_DIR={root}"], work / "stage2.log")
    wall4 = run([sys.executable, str(REPO / "_4_deconvolve_bulk.py"), f"--DATA_DIR={root}", f"--FIG_DIR={work / 'fig'}",
                 f"--BULK={bulk}", "--BULK_UNIT=counts", "--TORCH_THREADS=2", *extra], work / "stage4.log")
    predicted = pd.read_csv(paths.proportions, index_col=0)
    metrics = proportion_metrics(predicted.loc[truth.index, truth.columns], truth)
    print(f"_2_ {wall2:.0f} s, _4_ (TAPE) {wall4:.0f} s on the {len(truth)} bulks; stage 4's proportions vs the "
          f"truth: MAE {metrics.loc['overall', 'mae']:.4f}; {departing(paths)}; bulk.json: "
          f"{paths.bulk_record.read_text()}", flush=True)


def departing(paths) -> str:
    """How many bulks _4_ found departing beyond every simulated bulk (stage 5 re-reads their composition)."""
    if not paths.departure.exists():
        return "no departure.csv (a _4_ run from before it existed: stage 5 keeps every composition)"
    from models.deconvolution import read_departure

    departure = read_departure(paths.departure, "--stage4 without --reuse-stage4")
    return (f"{int(departure['departs'].sum())} of {len(departure)} bulks depart beyond every simulated bulk "
            f"(score median {departure['score'].median():.1f})")


def fidelity(work: Path, retrain: bool, n_cohort: int, cells_per_bulk: int, variants=VARIANTS,
             extra_args: tuple[str, ...] = (), own: bool = True, with_stage4: bool = False,
             reuse_stage4: bool = False, stage4_args: tuple[str, ...] = ()) -> None:
    from models import evaluation
    from models.paths import Paths

    root, test, cell_types = reference(work, retrain)
    paths = Paths(root)
    counts, genes, obs = read_kang()
    control_types = test.obs["cell_type"].astype(str).to_numpy()
    control_means = type_means(evaluation.log_normalize(test.X), control_types, cell_types)
    stim = np.flatnonzero(obs["condition"].to_numpy() == "stim")
    stim_means = type_means(evaluation.log_normalize(counts[stim]), obs["cell_type"].to_numpy()[stim], cell_types)
    top = {t: np.argsort(-np.abs(stim_means[t] - control_means[t]), kind="stable")[:N_TOP_RESPONSE]
           for t in cell_types}
    gene_index = {g: i for i, g in enumerate(genes)}

    groups = make_bulks(counts, genes, obs, n_cohort, cells_per_bulk)
    bulks = work / "bulks"
    bulks.mkdir(exist_ok=True)
    bulk_table(counts, genes, groups).to_csv(bulks / "stim.csv")
    rng = np.random.default_rng(7)
    platform_factor = np.exp(rng.normal(0.0, 1.0, len(genes)))  # a simulated other platform: one factor per gene
    bulk_table(counts, genes, groups, platform_factor).to_csv(bulks / "stim_platform.csv")
    control = {"control_test": np.flatnonzero(obs.index.isin(test.obs_names))}
    bulk_table(counts, genes, control).to_csv(bulks / "control.csv")
    bulk_table(counts, genes, control, platform_factor).to_csv(bulks / "control_platform.csv")
    # the true proportions stand in for stage 4's (see the docstring); bulk.json as stage 4 writes it
    shares = type_shares(obs, groups, cell_types)
    shares.index.name = "sample"
    if with_stage4:
        stage4(root, work, bulks / "stim.csv", shares, reuse_stage4, stage4_args)
    else:
        shutil.rmtree(paths.deconvolution_dir, ignore_errors=True)
        paths.deconvolution_dir.mkdir(parents=True, exist_ok=True)
        shares.to_csv(paths.proportions)
        paths.bulk_record.write_text(json.dumps({"path": str(bulks / "stim.csv"), "unit": "counts",
                                                 "protocol": "umi", "reference_protocol": "umi"}))
    common = [f"--N_CELLS={cells_per_bulk}", *extra_args]
    runs = {}
    none, wall = stage5(root, work, "none", common + ["--CONDITION=none", "--FIGURES=false"])
    print(f"_5_ CONDITION=none: {wall:.0f} s ({len(groups)} samples x {cells_per_bulk} cells)", flush=True)
    every = {
        "auto (absolute)": common,
        "shared factor only": common + ["--CONDITION_TYPE_PENALTY=1e6", "--FIGURES=false"],
        "relative, baseline = control test bulk": common + [f"--BULK_BASELINE={bulks / 'control.csv'}",
                                                            "--FIGURES=false"],
        "platform x factor: relative": common + [f"--BULK={bulks / 'stim_platform.csv'}",
                                                 f"--BULK_BASELINE={bulks / 'control_platform.csv'}",
                                                 "--FIGURES=false"],
        "platform x factor: absolute": common + [f"--BULK={bulks / 'stim_platform.csv'}", "--CONDITION=absolute",
                                                 "--FIGURES=false"],
    }
    chosen = {label: extra for key, (label, extra) in zip(VARIANTS, every.items()) if key in variants}
    for label, extra in chosen.items():
        folder, wall = stage5(root, work, label.split()[0].strip(",:") + str(len(runs)), extra)
        runs[label] = score_run(folder, none, groups, counts, obs, control_means, top, cell_types, gene_index, True)
        print(f"_5_ {label}: {wall:.0f} s", flush=True)
        if (folder / "composition.csv").exists():  # the shares re-estimated beside the shifts (CONDITION_COMPOSITION)
            generated = pd.read_csv(folder / "composition.csv", index_col=0).loc[shares.index, shares.columns]
            given = pd.read_csv(paths.proportions, index_col=0).loc[shares.index, shares.columns]
            print(f"    composition vs the truth, MAE: {(given - shares).abs().to_numpy().mean():.4f} given to _5_, "
                  f"{(generated - shares).abs().to_numpy().mean():.4f} generated (stim_all "
                  f"{(given - shares).abs().loc['stim_all'].mean():.4f} -> "
                  f"{(generated - shares).abs().loc['stim_all'].mean():.4f})", flush=True)
    runs["unconditioned"] = score_run(none, none, groups, counts, obs, control_means, top, cell_types, gene_index,
                                      True)
    real_auroc = {name: real_vs_real_auroc(counts[idx]) for name, idx in list(groups.items())[:3]}

    print(f"\nKang IFN-beta: GMVAE on {test.n_obs * 3} control cells (75 %), bulks of stimulated cells: stim_all "
          f"(all {len(groups['stim_all'])}) and {n_cohort} Dirichlet pseudo-bulks of {cells_per_bulk} cells; "
          f"{cells_per_bulk} cells generated per sample with {'stage 4' if with_stage4 else 'the true'} proportions")
    print("| run | AUROC stim_all | AUROC cohort | per-type mean r (cohort) | LFC r stim_all | LFC r cohort | "
          "type-specific r stim_all | type-specific r cohort |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, table in runs.items():
        cohort = table.drop(index="stim_all")
        lfc = "" if label == "unconditioned" else (f"{table.loc['stim_all', 'lfc_r']:.3f} | "
                                                  f"{cohort['lfc_r'].astype(float).mean():.3f} | "
                                                  f"{table.loc['stim_all', 'specific_r']:.3f} | "
                                                  f"{cohort['specific_r'].astype(float).mean():.3f}")
        print(f"| {label} | {table.loc['stim_all', 'auroc']:.3f} | {cohort['auroc'].astype(float).mean():.3f} | "
              f"{cohort['per_type_mean_r'].astype(float).mean():.3f} | {lfc or ' | | | '} |")
    print(f"| real vs real (halves) | {real_auroc['stim_all']:.3f} | "
          f"{np.mean([v for k, v in real_auroc.items() if k != 'stim_all']):.3f} (2 samples) | | | | | |")
    if "auto (absolute)" in runs:
        auto = runs["auto (absolute)"]
        print("\nper type, stim_all (auto): LFC r / type-specific r / interferon-gene recovery (generated / real LFC)")
        for t in cell_types:
            if t in auto.loc["stim_all", "lfc_r_types"]:
                print(f"  {t:16s} {auto.loc['stim_all', 'lfc_r_types'][t]:.3f} / "
                      f"{auto.loc['stim_all', 'specific_r_types'][t]:.3f} / "
                      f"{auto.loc['stim_all', 'isg_recovery'][t]:.2f}")
    if own:
        own_bulk(root, work, test, cell_types, extra_args)


def reference(work: Path, retrain: bool):
    """(root, test AnnData, cell types) of the GMVAE trained on the control cells (trained when missing)."""
    from models import io
    from models.paths import Paths

    root = work / "kang"
    paths = Paths(root)
    if retrain or not paths.gmvae_checkpoint.exists():
        counts, genes, obs = read_kang()
        shutil.rmtree(root, ignore_errors=True)
        prepare_reference(root, counts, genes, obs)
        wall = run([sys.executable, str(REPO / "_3_train_gmvae.py"), f"--DATA_DIR={root}",
                    f"--FIG_DIR={work / 'fig'}"], work / "train.log")
        print(f"_3_train_gmvae.py (defaults) on the control cells: {wall:.0f} s", flush=True)
    return root, io.read_dataset(paths.test_dir), io.read_type_order(paths.train_dir / "clusters.csv")


def own_bulk(root: Path, work: Path, test, cell_types, extra_args: tuple[str, ...] = ()) -> None:
    """The reference's own test-cell bulk: conditioning must change the AUROC against the test cells by <= 0.01."""
    import scipy.sparse as sp

    bulk = pd.DataFrame(np.asarray(sp.csr_matrix(test.X).sum(axis=0)), index=["control_test"],
                        columns=[str(g) for g in test.var_names])
    (work / "bulks").mkdir(parents=True, exist_ok=True)
    bulk.to_csv(work / "bulks" / "own.csv")
    counts = test.obs["cell_type"].astype(str).value_counts().rename_axis("cell_type").reset_index(name="n_cells")
    counts.to_csv(work / "bulks" / "own_counts.csv", index=False)
    result = {}
    for condition in ("none", "auto"):
        from models.paths import Paths

        shutil.rmtree(Paths(root).generated_dir, ignore_errors=True)
        run([sys.executable, str(REPO / "_5_generate_sc.py"), f"--DATA_DIR={root}", f"--FIG_DIR={work / 'fig'}",
             f"--CELL_COUNTS={work / 'bulks' / 'own_counts.csv'}", f"--BULK={work / 'bulks' / 'own.csv'}",
             f"--CONDITION={condition}", "--FIGURES=false", "--TORCH_THREADS=2", *extra_args],
            work / f"own_{condition}.log")
        result[condition] = json.loads(Paths(root).generated_metrics.read_text())
    fit = result["auto"]["condition"]
    print(f"\nthe reference's own test-cell bulk ({test.n_obs} cells): AUROC vs the test cells "
          f"{result['none']['gmvae']['auroc']:.4f} unconditioned -> {result['auto']['gmvae']['auroc']:.4f} "
          f"conditioned; r(bulk, pseudo-bulk) {fit['r_before']:.4f} -> {fit['r_after']:.4f}; "
          f"mean |log fold change| {fit['mean_abs_log_fold_change']:.4f}; "
          f"{fit.get('genes_beyond_noise', 'n/a')} of {fit['n_shared_genes']} genes beyond their sampling noise")


RULES = {  # how a type's log mean shift s moves the ZINB: (log theta += a s, dropout logit -= b s)
    "stage 5's rule (burst frequency: theta and the dropout odds move with the mean)": (1.0, 1.0),
    "the mean alone": (0.0, 0.0),
    "theta alone moves with the mean": (1.0, 0.0),
    "both at half the rate": (0.5, 0.5),
    "both at 1.5x the rate": (1.5, 1.5),
    "both at 2x the rate": (2.0, 2.0),
}


def ceiling(work: Path, retrain: bool, n_cells: int, draws_per_type: int = 1500, seed: int = 0) -> None:
    """How close the generator gets to the stimulated cells given each type's TRUE change.

    The stimulated cells are halved at random: half A gives the targets, half B is what the cells
    are scored against (real-vs-real = A against B). Each type's per-gene log shift is found by
    fixed-point iteration on ``draws_per_type`` generated cells per type, to match half A's
    - per-type mean count (what a bulk sums, and all stage 5 can fit), under stage 5's rule and
      under other rules of how the distribution moves with the mean (``RULES``);
    - per-type mean log-normalised expression (what the classifier reads; no bulk gives it).
    Then ``n_cells`` cells at half B's composition are scored as the fidelity part scores a sample.
    """
    import scipy.sparse as sp
    import torch

    from models import evaluation, generate
    from models.train import load_gmvae

    root, _, _ = reference(work, retrain)
    model, meta = load_gmvae(root / "checkpoints" / "gmvae.pt")
    genes, cell_types = [str(g) for g in meta["genes"]], [str(t) for t in meta["cell_types"]]
    counts, all_genes, obs = read_kang()
    index = {g: i for i, g in enumerate(all_genes)}
    stim = np.flatnonzero(obs["condition"].to_numpy() == "stim")
    matrix = counts[stim][:, [index[g] for g in genes]].tocsr()
    codes = pd.Categorical(obs["cell_type"].to_numpy()[stim], categories=cell_types).codes
    half_a, half_b = evaluation.halves(len(stim), seed)
    n_types = len(cell_types)

    def type_mean_rows(rows, row_codes) -> np.ndarray:  # [K, G]: type_means, in the model's type order
        means = type_means(rows, np.asarray(cell_types)[row_codes], cell_types)
        return np.vstack([means[t] for t in cell_types])

    target_counts = type_mean_rows(matrix[half_a], codes[half_a])
    target_logs = type_mean_rows(evaluation.log_normalize(matrix[half_a]), codes[half_a])
    real_b = evaluation.log_normalize(matrix[half_b])
    hvg = evaluation.top_variable_genes(real_b, 2000)
    generated_n = generate.largest_remainder(np.bincount(codes[half_b], minlength=n_types) / len(half_b), n_cells)

    def draw(shift, rule, per_type, stream):
        generator = torch.Generator().manual_seed(seed + stream)
        cell_codes = torch.as_tensor(np.repeat(np.arange(n_types), per_type))
        with torch.no_grad():
            if shift is None or rule == (1.0, 1.0):  # stage 5's own sampler
                sampler = generate.gmvae_sampler(model, prior="posterior", calibrate=True,
                                                 log_mean_shift=None if shift is None else torch.as_tensor(shift))
                cells = sampler(cell_codes, generator)
            else:
                shift_t = torch.as_tensor(shift)
                log_mu, log_theta, logits = model.generative_params(cell_codes, generator, 1.0, "posterior", True,
                                                                    log_mean_shift=shift_t, frequency=False)
                moved = shift_t[cell_codes]
                cells = generate.sample_zinb_inversion(log_mu, log_theta + rule[0] * moved,
                                                       None if logits is None else logits - rule[1] * moved, generator)
        return sp.csr_matrix(cells), cell_codes.numpy()

    def fitted(rule, logs, iterations=4):
        shift = np.zeros((n_types, len(genes)), np.float32)
        for it in range(iterations * (2 if logs else 1)):
            cells, cell_codes = draw(shift, rule, np.full(n_types, draws_per_type), 100 + it)
            if logs and it >= iterations:  # the log means move about as the log shift does: damped steps
                step = np.clip(target_logs - type_mean_rows(evaluation.log_normalize(cells), cell_codes),
                               -1.0, 1.0) * 1.5
            else:
                step = np.log((target_counts + 0.01) / (type_mean_rows(cells, cell_codes) + 0.01))
            shift = (shift + step).astype(np.float32)
        return shift

    def score(name, shift, rule=(1.0, 1.0)):
        cells, cell_codes = draw(shift, rule, generated_n, 7)
        normed = evaluation.log_normalize(cells)
        auroc = evaluation.classifier_auroc(real_b[:, hvg], normed[:, hvg], seed=seed)
        means, real_means = type_mean_rows(normed, cell_codes), type_mean_rows(real_b, codes[half_b])
        variance = (type_mean_rows(normed.power(2), cell_codes) - means ** 2
                    + type_mean_rows(real_b.power(2), codes[half_b]) - real_means ** 2)
        smd = (means - real_means) / (np.sqrt(variance.clip(0.0) / 2.0) + 1e-3)  # in pooled sds
        # the classifier's evidence grows with a type's cells: rank by |smd| x sqrt(share)
        weight = np.sqrt(np.bincount(codes[half_b], minlength=n_types) / len(half_b))[:, None]
        worst = np.dstack(np.unravel_index(np.argsort(-np.abs(smd[:, hvg]) * weight, axis=None)[:6],
                                           smd[:, hvg].shape))[0]
        off = ", ".join(f"{genes[hvg[g]]} in {cell_types[k]} {smd[k, hvg[g]]:+.2f}" for k, g in worst)
        print(f"| {name} | {auroc:.3f} | {np.abs(smd[:, hvg]).mean():.3f} | {off} |", flush=True)

    print(f"\n## what the generator can reach given each type's true change (stimulated cells halved: "
          f"targets from {len(half_a)}, scored against {len(half_b)}; {n_cells} cells at their composition)")
    real_a = evaluation.log_normalize(matrix[half_a])
    print(f"real vs real (half A against half B): AUROC "
          f"{evaluation.classifier_auroc(real_b[:, hvg], real_a[:, hvg], seed=seed):.3f}")
    print("| generator | AUROC | mean abs standardised mean difference per type (2,000 genes) | "
          "most off (ranked by abs smd x sqrt(type share)) |\n|---|---:|---:|---|")
    start = time.perf_counter()
    score("unconditioned", None)
    for name, rule in RULES.items():
        score(f"true per-type mean counts, {name}", fitted(rule, False), rule)
    score("true per-type mean log-normalised expression, stage 5's rule (no bulk gives it)",
          fitted((1.0, 1.0), True))
    print(f"[{time.perf_counter() - start:.0f} s]")


def timing(n_samples: int) -> None:
    """The fit alone at lung scale: a randomly initialised GMVAE (16,000 genes, 17 types), random bulks."""
    import torch

    from models import condition, generate
    from models.gmvae import GMVAE

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = GMVAE(LUNG_GENES, LUNG_TYPES)
    rng = np.random.default_rng(0)
    cells = np.vstack([generate.largest_remainder(rng.dirichlet(np.ones(LUNG_TYPES)), 2500) for _ in range(n_samples)])
    profiles = rng.gamma(0.5, 1.0, (n_samples, LUNG_GENES))
    profiles /= profiles.sum(1, keepdims=True)
    shared = np.ones(LUNG_GENES, bool)
    print(f"\nfit time at lung scale ({LUNG_GENES:,} genes, {LUNG_TYPES} types, 2 threads):")
    import _5_generate_sc as stage5

    runs = [(False, 0, n) for n in (1, n_samples)] + [(False, stage5.COMPOSITION_ROUNDS, n) for n in (1, n_samples)]
    for latent, rounds, n in runs + [(True, 0, 1)]:
        start = time.perf_counter()
        fits = condition.fit_conditions(model, cells[:n], profiles[:n], shared, "absolute",
                                        generate.block_generator(0, 2_000_000, 0),
                                        condition.ConditionSettings(latent=latent, composition_rounds=rounds),
                                        prior="learned")
        wall = time.perf_counter() - start
        done = max(len(fit.diagnostics["composition_moves"]) for fit in fits)
        what = f"CONDITION_COMPOSITION=true ({done} of {rounds} rounds run)" if rounds else "default"
        print(f"  CONDITION_LATENT={latent}, {what}: {n:3d} samples in {wall:6.1f} s = {wall / n:5.2f} s per sample",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["fidelity", "own", "ceiling", "timing", "all"], default="all",
                        help="own: only the reference's own test-cell bulk (AUROC change); ceiling: cells drawn "
                             "through each type's true change (not in all)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated conditioned runs of the fidelity part, of {','.join(VARIANTS)}")
    parser.add_argument("--stage4", action="store_true",
                        help="stage 5 gets _4_'s proportions of the bulks (TAPE, minutes), not the true ones")
    parser.add_argument("--reuse-stage4", action="store_true",
                        help="with --stage4: keep an earlier run's proportions of the same bulks (in --work)")
    parser.add_argument("--stage4-args", default="",
                        help="space-separated settings given to the _4_ run of --stage4, e.g. '--SEED=1'")
    parser.add_argument("--stage5-args", default="",
                        help="space-separated settings given to every _5_ run, e.g. '--CONDITION_NOISE=0'")
    parser.add_argument("--work", default="/tmp/bulk2sc_bench_condition")
    parser.add_argument("--retrain", action="store_true", help="rebuild the control split and retrain the GMVAE")
    parser.add_argument("--cohort", type=int, default=20, help="Dirichlet pseudo-bulks")
    parser.add_argument("--cells", type=int, default=1000, help="cells per cohort bulk and generated per sample")
    parser.add_argument("--timing-samples", type=int, default=20)
    parser.add_argument("--ceiling-seed", type=int, default=0,
                        help="--part=ceiling: the random halving of the stimulated cells and the draws")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    extra_args = tuple(args.stage5_args.split())
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        sys.exit(f"--variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {machine()}\n", flush=True)
    if args.part in ("fidelity", "all"):
        if not (SHARED / "kang_ifnb").is_dir():
            sys.exit(f"{SHARED / 'kang_ifnb'} is absent")
        fidelity(work, args.retrain, args.cohort, args.cells, args.variants.split(","), extra_args,
                 with_stage4=args.stage4, reuse_stage4=args.reuse_stage4,
                 stage4_args=tuple(args.stage4_args.split()))
    if args.part == "own":
        root, test, cell_types = reference(work, args.retrain)
        own_bulk(root, work, test, cell_types, extra_args)
    if args.part == "ceiling":
        if not (SHARED / "kang_ifnb").is_dir():
            sys.exit(f"{SHARED / 'kang_ifnb'} is absent")
        ceiling(work, args.retrain, args.cells, seed=args.ceiling_seed)
    if args.part in ("timing", "all"):
        timing(args.timing_samples)


if __name__ == "__main__":
    main()
