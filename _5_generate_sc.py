"""Stage 5: synthetic single cells from bulk, scored against the held-out real test cells.

How many cells of each type: ``N_CELLS`` x each bulk sample's proportions (largest-remainder
rounding, so they sum exactly to ``N_CELLS``), or an explicit ``CELL_COUNTS`` table. With
``COUNTS_FROM=draw``, each of ``REPLICATES`` sets per sample draws its composition from _4_'s 90 %
intervals (Dirichlet, then a multinomial of ``N_CELLS``), written side by side as
``generated/<sample>_rep<r>/``. Each cell
draws z ~ p(z | type) (sd scaled by ``NOISE_SCALE``) and counts from the GMVAE decoder's
(ZI)NB, in seeded RNG blocks, so the same ``SEED`` gives identical files for any
``CHUNK_CELLS``. Chunks are written as they are drawn: a million cells run in bounded memory.

Conditioning (``CONDITION``, models/condition/): with a bulk (the one stage 4 deconvolved, or
``BULK``), each sample's cell types get per-gene log factors, fitted through the frozen decoder
so that the expected pseudo-bulk of its cells matches the bulk ("absolute", same platform) or
its log-ratio to a baseline ("relative", another platform: ``BULK_BASELINE`` or the samples'
mean). The mode and why are logged. What the bulk differs by within its sampling noise is not
fitted (``CONDITION_NOISE``). With ``CONDITION_COMPOSITION`` (absolute mode, _4_'s point
proportions; by default for the samples whose bulk _4_ found departing beyond every bulk it simulated),
each sample's type shares are re-estimated beside its shifts: a state shift that _4_ read as a change of
composition moves back into the shifts. ``CONDITION=none``, or ``CELL_COUNTS``
without ``BULK``, gives the cells of the proportions alone.

Reads:
    DATA_DIR/checkpoints/gmvae.pt              trained GMVAE, genes and cell types (_3_)
    DATA_DIR/deconvolution/proportions.csv     samples x cell types, first column = sample (_4_)
    DATA_DIR/deconvolution/proportions_lower.csv, _upper.csv   COUNTS_FROM=draw: the 90 % intervals (_4_)
    CELL_COUNTS                                optional cell_type,n_cells CSV (skips proportions)
    DATA_DIR/deconvolution/bulk.json           the bulk stage 4 deconvolved (path, unit, protocol), or BULK:
                                               each sample's cells are conditioned on its bulk (CONDITION)
    DATA_DIR/deconvolution/departure.csv       the samples whose bulk departs from _4_'s simulated bulks
                                               (CONDITION_COMPOSITION=auto re-estimates their shares)
    DATA_DIR/test/, DATA_DIR/train/            held-out cells to score against; training cells
                                               for the NB baseline (_1_), when present
Writes (DATA_DIR/generated/, or generated/<sample>/ per bulk sample when there are several):
    matrix.mtx        integer counts, genes x cells (Matrix Market)
    clusters.csv      partition, cell_type per generated cell
    genes.tsv, barcodes.tsv
    cells.h5ad        X = sparse int32 counts, obs cell_type / partition / sample, var_names = genes
    metrics.json      when DATA_DIR/test exists: GMVAE, NB baseline and real-vs-real metrics
    config.json       the settings of this run (generated/)
    condition.npz     when conditioned on a bulk: the fitted shifts (z_shift [K, Z], log_mean_shift and
                      log_fold_change [K, G], genes, cell_types); the fit's r goes to the log and metrics.json
    composition.csv   when the shares were re-estimated with the conditioning: samples x types, the shares
                      generated (generated/); before and after in metrics.json and the log
    FIG_DIR/condition_shifts[_<sample>].png   each type's most-shifted genes
    FIG_DIR/generated_proportions.png   real vs generated proportions (every sample)
    FIG_DIR/generated_umap.png, generated_gene_correlation.png  with DATA_DIR/test: the UMAP
                      overlay and gene-gene correlation heatmaps of the first sample's cells
                      (suffixed _<sample> when there are several samples)

Run:
    python _5_generate_sc.py
    python _5_generate_sc.py --CELL_COUNTS=counts.csv --SEED=7 --NOISE_SCALE=0.8
    torchrun --standalone --nproc_per_node=4 _5_generate_sc.py --N_CELLS=1e7   # ranks share each sample's
                                                                               # RNG blocks; same files
    python _5_generate_sc.py --CONDITION=relative --BULK_BASELINE=control_bulks.tsv
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from models import condition, distributed, evaluation, generate, plots, sharded
from models.baseline import fit_nb_per_type
from models.config import load_config, save_config
from models.io import atomic_path, encode_labels, known_gene_ids, read_dataset
from models.metrics import proportion_metrics
from models.paths import CLUSTERS, Paths, resolve
from models.train import load_gmvae
from models.utils import (InputError, peak_rss_mb, run_stage, set_seed,
                          setup_logging)

log = logging.getLogger("bulk2sc.generate")

# -----------------------------------------------------------------------------
DATA_DIR = "data"  # root of every stage's inputs and outputs; relative paths are from the repo root
FIG_DIR = "fig"  # generated_*.png go here
SEED = 0  # one seed for every draw: the same seed gives byte-identical output files
N_CELLS = None  # cells per bulk sample; None = as many as DATA_DIR/test holds (the original's choice)
CELL_COUNTS = ""  # CSV with cell_type,n_cells: generate exactly these, skipping the proportions
COUNTS_FROM = "point"  # "point": N_CELLS x the proportions; "draw": REPLICATES sets per sample, each drawing its
#                       composition from _4_'s 90 % intervals (Dirichlet, then multinomial), to show how the cells vary
REPLICATES = 3  # COUNTS_FROM=draw: sets per sample, written side by side as generated/<sample>_rep<r>/
NOISE_SCALE = 1.0  # scales the prior sd of z (the original's `factor`); < 1 gives more typical cells
PRIOR = "posterior"  # z per type from: "posterior" = full-covariance Gaussian fitted to the training cells'
#                     encodings (keeps latent correlations); "learned" = the GMVAE's diagonal p(z|k) (original)
CALIBRATE = True  # scale each type's gene means to the training cells' (factors fitted at the end of stage 3)
SAMPLER = "inversion"  # "inversion": exact, draws values only where a count is nonzero (~3x faster);
#                       "model": the GMVAE's own Gamma-Poisson sample_counts (same distribution)
CHUNK_CELLS = 8192  # cells drawn and written per step: bounds memory (~CHUNK_CELLS x genes floats)
DEVICE = "cpu"  # "auto" uses CUDA when present; the draws are cheap, CPU is the portable default
TORCH_THREADS = 0  # 0 = one per core
EVALUATE = True  # score against DATA_DIR/test (and the NB baseline) when the test split exists
EVAL_MAX_CELLS = 20000  # generated cells kept in memory for the metrics (a seeded subset beyond)
N_TOP_GENES = 2000  # top variable genes (of the real test cells) for PCA, classifier and UMAP
N_PCS = 30  # principal components for the classifier, MMD and UMAP
N_CORR_GENES = 100  # top variable genes in the gene-gene correlation comparison and heatmaps
FIGURES = True  # write the figures
UMAP = True  # false: the overlay uses the first two PCs instead (skips umap-learn's ~30 s JIT compile)
CONDITION = "auto"  # "auto": fit each sample's per-type shift to its bulk whenever there is one, the mode from
#                    stage 4's protocol; "absolute" / "relative" force a mode; "none": proportions only (as before)
BULK = ""  # bulk table to condition on (samples x genes, counts/CPM/TPM); "" = the one stage 4 deconvolved
BULK_BASELINE = ""  # relative mode: control bulks in the reference's state (their mean = the baseline); "" = samples' mean
CONDITION_TYPE_PENALTY = 0.003  # ridge on the per-type deviations from the shared per-gene factor (README: 0.03-0.0003)
CONDITION_LATENT = False  # also fit a per-type latent shift through the decoder: 10x slower, no gain on Kang (README)
CONDITION_MIN_GENES = 1000  # fewer bulk genes shared with the GMVAE than this is an error
CONDITION_NOISE = 2.0  # a gene is moved only where the bulk differs from the model by more than this many sds of
#                       its sampling noise (fitted in full beyond twice that); 0 = fit the noise too (README)
CONDITION_COMPOSITION = "auto"  # absolute mode, counts from _4_'s point proportions: re-estimate a sample's type
#                                shares beside its shifts. "auto": the samples whose bulk _4_ found departing beyond
#                                every simulated bulk (deconvolution/departure.csv: a state the reference lacks, which
#                                _4_ reads partly as composition; Kang stimulated: MAE 0.061 -> 0.049); "true": every
#                                sample (on bulks in the reference's own state it is worse: Zheng 0.024 -> 0.040);
#                                "false": keep _4_'s shares (README)
CONDITION_LIBRARY = 0.0  # weight keeping each type's expected library size (total count per cell) as the reference's
#                         (genes that rise take their share from the others); 0 = free (README)
# -----------------------------------------------------------------------------

BASELINE_STREAM = 1_000_000  # RNG streams of the NB baseline: apart from the GMVAE's (one per sample)
CONDITION_STREAM = 2_000_000  # RNG streams of the conditioning's z draws and its pi check
COMPOSITION_ROUNDS = 3  # CONDITION_COMPOSITION: re-estimates of the shares, each followed by a warm refit of the shifts
COMPOSITION_CHOICES = {"auto": "auto", "true": "all", "all": "all", "false": "none", "none": "none"}


def safe_name(name: str) -> str:
    """A sample name usable as a folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._") or "sample"


def check_genes(model_genes: list[str], data_genes, source: Path) -> None:
    """The test/train genes must be the checkpoint's, in the same order."""
    data_genes = [str(g) for g in data_genes]
    if data_genes == model_genes:
        return
    only_model = [g for g in model_genes if g not in set(data_genes)]
    only_data = [g for g in data_genes if g not in set(model_genes)]
    detail = (f"{len(model_genes)} genes in the checkpoint, {len(data_genes)} in {source}; "
              f"only in the checkpoint: {only_model[:3]}, only in the data: {only_data[:3]}")
    if not only_model and not only_data:
        detail += " (same genes, different order)"
    raise InputError(f"the GMVAE checkpoint's genes differ from {source}'s ({detail}): "
                     "retrain with _3_train_gmvae.py on this DATA_DIR, or point DATA_DIR at the split it was trained on")


def cell_counts_table(cfg, paths: Paths, cell_types: list[str], test) -> pd.DataFrame:
    """Samples x cell types integer counts to generate."""
    if cfg.CELL_COUNTS:
        counts = generate.read_cell_counts(resolve(cfg.CELL_COUNTS), cell_types)
        if cfg.N_CELLS is not None:
            log.info("CELL_COUNTS given: N_CELLS=%s is ignored", cfg.N_CELLS)
        return counts.to_frame(Path(cfg.CELL_COUNTS).stem).T
    proportions = generate.read_proportions(paths.proportions, cell_types)
    n_cells = cfg.N_CELLS
    if n_cells is None:
        if test is None:
            raise InputError(f"N_CELLS is not set and {paths.test_dir} is missing: pass --N_CELLS=<number> "
                             "or run _1_split_train_test.py")
        n_cells = test.n_obs
    if isinstance(n_cells, float) and n_cells.is_integer():
        n_cells = int(n_cells)  # --N_CELLS=1e6
    if not isinstance(n_cells, (int, np.integer)) or isinstance(n_cells, bool):
        raise InputError(f"N_CELLS must be a whole number of cells, got {n_cells!r}")
    if cfg.COUNTS_FROM == "point":
        return generate.cell_counts_from_proportions(proportions, int(n_cells))
    if cfg.COUNTS_FROM != "draw":
        raise InputError(f"COUNTS_FROM must be 'point' or 'draw', got {cfg.COUNTS_FROM!r}")
    lower = generate.read_interval(paths.proportions_lower, proportions)
    upper = generate.read_interval(paths.proportions_upper, proportions)
    return generate.replicate_cell_counts(proportions, lower, upper, int(n_cells), cfg.REPLICATES, cfg.SEED)


def read_bulk(path: Path, genes: list[str], gene_ids: list[str] | None = None) -> pd.DataFrame:
    """samples x genes, its genes matched to the GMVAE's (case, Ensembl versions, ids: models.genes)."""
    from models.deconvolution import check_bulk_values, orient_bulk, read_table

    return check_bulk_values(orient_bulk(read_table(path), genes, str(path), gene_ids)[0], str(path))


def fit_conditioning(cfg, paths: Paths, model, genes, counts: pd.DataFrame, prior: str, calibrate: bool,
                     gene_ids: list[str] | None = None) -> tuple[dict, pd.DataFrame]:
    """(sample -> models.condition.SampleCondition fitted to its bulk, or {} (no bulk, or CONDITION=none);
    the cell counts to generate: ``counts``, or re-apportioned to the compositions re-estimated with the shifts).

    ``gene_ids``: the genes' ids (train/genes.tsv), so a bulk named by id matches too.
    """
    record = json.loads(paths.bulk_record.read_text()) if paths.bulk_record.exists() else None
    bulk_path = resolve(cfg.BULK) if cfg.BULK else None
    if bulk_path is None and record is not None and not cfg.CELL_COUNTS:
        bulk_path = Path(record["path"])
    if record is not None and (bulk_path is None or Path(record["path"]) != bulk_path):
        record = None  # stage 4 read another bulk
    mode, why = condition.choose_mode(cfg.CONDITION, record, bool(cfg.BULK_BASELINE), len(counts))
    if cfg.CONDITION == "none" or bulk_path is None:
        log.info("cells from the proportions only (%s)", "CONDITION=none" if cfg.CONDITION == "none" else "no bulk")
        return {}, counts
    if mode is None:
        log.warning("not conditioning on %s: %s", bulk_path, why)
        return {}, counts
    log.info("conditioning on the bulk %s: %s mode, because %s", bulk_path, mode, why)
    bulk_samples = counts.attrs.get("bulk_sample", list(counts.index))  # COUNTS_FROM=draw: replicates share a bulk
    bulk = condition.align_samples(read_bulk(bulk_path, genes, gene_ids), bulk_samples, str(bulk_path))
    bulk = bulk.set_axis([str(s) for s in counts.index], axis=0)
    baseline = None
    if cfg.BULK_BASELINE:
        baseline_table = read_bulk(resolve(cfg.BULK_BASELINE), genes, gene_ids)
        common = bulk.columns.intersection(baseline_table.columns)
        baseline = condition.bulk_profiles(baseline_table[common], genes, cfg.CONDITION_MIN_GENES,
                                           cfg.BULK_BASELINE)[0].mean(0)
        bulk = bulk[common]
    profiles, shared = condition.bulk_profiles(bulk, genes, cfg.CONDITION_MIN_GENES, str(bulk_path))
    depths = condition.bulk_depths(bulk, genes, None if record is None else record.get("unit"))
    log.info("sampling noise of the bulk: %s", "Poisson at its counts' depth (median %.3g) and the cells' spread"
             % np.median(depths) if depths is not None else
             "not in counts: Poisson at the depth the model expects of the cells, and the cells' spread")
    reference_cells = None  # the training cells per type: the model's means carry their sampling error
    if (paths.train_dir / CLUSTERS).exists():
        labels = pd.read_csv(paths.train_dir / CLUSTERS)
        if "cell_type" in labels:
            reference_cells = labels["cell_type"].astype(str).value_counts().reindex(
                [str(t) for t in counts.columns], fill_value=0).to_numpy()
    recompose = composition_refit(cfg, paths, mode, counts.index, record is not None)
    settings = condition.ConditionSettings(latent=cfg.CONDITION_LATENT, type_penalty=cfg.CONDITION_TYPE_PENALTY,
                                           noise_threshold=cfg.CONDITION_NOISE, library_weight=cfg.CONDITION_LIBRARY,
                                           composition_rounds=COMPOSITION_ROUNDS if recompose is not None else 0)
    fits = condition.fit_conditions(model, counts.to_numpy(), profiles, shared, mode,
                                    generate.block_generator(cfg.SEED, CONDITION_STREAM, 0), settings,
                                    cfg.NOISE_SCALE, prior, calibrate, baseline=baseline, depths=depths,
                                    reference_cells=reference_cells, recompose=recompose)
    for sample, fit in zip(counts.index, fits):
        log.info("sample %s: r(bulk, generated pseudo-bulk) %.4f -> %.4f over %d genes, %d of them beyond their "
                 "sampling noise (%.1f s)", sample, fit.r_before, fit.r_after, int(shared.sum()),
                 fit.diagnostics["genes_beyond_noise"], fit.diagnostics["seconds"])
        if not fit.converged:
            log.warning("sample %s: the conditioning did not converge (mean squared log residual %.4g)",
                        sample, fit.residual)
    if recompose is not None:
        counts = reapportion(counts, fits)
    return dict(zip([str(s) for s in counts.index], fits)), counts


def composition_choice(value) -> str:
    """CONDITION_COMPOSITION as "auto", "all" or "none" (True/"true" = all, False/"false" = none)."""
    key = str(value).strip().lower()
    if key not in COMPOSITION_CHOICES:
        raise InputError(f"CONDITION_COMPOSITION must be auto, true or false, got {value!r}")
    return COMPOSITION_CHOICES[key]


def composition_refit(cfg, paths: Paths, mode: str, samples, from_stage4: bool) -> np.ndarray | None:
    """Which samples' shares are re-estimated with the shifts (CONDITION_COMPOSITION): a bool per sample, or
    None for none, logged with why. "auto" takes the samples that _4_ found departing beyond every simulated
    bulk (``deconvolution/departure.csv``, written with the bulk stage 5 conditions on: ``from_stage4``)."""
    choice = composition_choice(cfg.CONDITION_COMPOSITION)
    if choice == "none":
        return None
    why_not = ("the bulk is from another platform (relative mode): its shares stay _4_'s" if mode != "absolute" else
               "CELL_COUNTS fixes the cells" if cfg.CELL_COUNTS else
               "COUNTS_FROM=draw draws them from _4_'s intervals" if cfg.COUNTS_FROM != "point" else "")
    if not why_not and choice == "auto":
        from models.deconvolution import read_departure

        departure = (read_departure(paths.departure, "CONDITION_COMPOSITION=true or false, which do not read it")
                     if from_stage4 and paths.departure.exists() else None)
        if departure is None:
            why_not = (f"CONDITION_COMPOSITION=auto re-reads the bulks that _4_ found departing from its simulated "
                       f"bulks, and {paths.departure} {'is missing' if from_stage4 else 'describes another bulk'} "
                       "(rerun _4_deconvolve_bulk.py on this bulk, or set CONDITION_COMPOSITION=true or false)")
        else:
            departs = departure["departs"].set_axis(departure.index.astype(str)).reindex([str(s) for s in samples])
            if departs.isna().any():
                why_not = (f"{paths.departure} lacks samples {list(departs.index[departs.isna()])[:5]} "
                           "(rerun _4_deconvolve_bulk.py on this bulk)")
            elif not departs.any():
                why_not = (f"no sample departs from _4_'s simulated bulks ({paths.departure}): _4_'s reading of "
                           "bulks like those it was trained on is kept")
            else:
                log.info("composition re-estimated with the shifts for the %d of %d samples that depart beyond "
                         "every bulk _4_ simulated (%s): %s", int(departs.sum()), len(departs), paths.departure,
                         ", ".join(list(departs.index[departs.to_numpy(bool)])[:10]))
                return departs.to_numpy(bool)
    if why_not:
        log.info("composition kept as given: %s", why_not)
        return None
    return np.ones(len(samples), dtype=bool)


def reapportion(counts: pd.DataFrame, fits) -> pd.DataFrame:
    """Each sample's cells split by the composition re-estimated beside its shifts (same total), logged."""
    rows = []
    for sample, fit in zip(counts.index, fits):
        if fit.composition is None:  # kept as given
            rows.append(counts.loc[sample].to_numpy())
            continue
        before = counts.loc[sample] / counts.loc[sample].sum()
        after = pd.Series(fit.composition.numpy().astype(np.float64), index=counts.columns)
        fit.diagnostics["composition_before"] = {str(t): float(v) for t, v in before.items()}
        fit.diagnostics["composition_after"] = {str(t): float(v) for t, v in after.items()}
        moved = (after - before).abs().sort_values(ascending=False)
        log.info("sample %s: composition re-estimated with the shifts (mean |change| %.3f): %s", sample,
                 float(moved.mean()), ", ".join(f"{t} {before[t]:.3f} -> {after[t]:.3f}" for t in moved.index[:4]))
        rows.append(generate.largest_remainder(after.to_numpy(), int(counts.loc[sample].sum())))
    return pd.DataFrame(np.vstack(rows), index=counts.index, columns=counts.columns).astype(counts.dtypes.iloc[0])


def write_condition(cfg, paths: Paths, folder: Path, suffix: str, sample: str, fit, own_share: dict, genes,
                    cell_types) -> dict:
    """condition.npz (the shifts), the most-shifted-genes figure; returns the fit's summary for metrics.json."""
    with atomic_path(folder / "condition.npz") as tmp:
        condition.save_npz(tmp, {"z_shift": fit.z_shift.numpy(), "log_mean_shift": fit.log_mean_shift.numpy(),
                                 "log_fold_change": fit.log_fold_change.numpy(), "genes": np.asarray(genes),
                                 "cell_types": np.asarray(cell_types)})
    summary = {**fit.summary(), **own_share}
    log.info("sample %s: share of cells the GMVAE's pi calls their type, worst type: %.3f unconditioned, "
             "%.3f conditioned", sample, min(own_share["own_type_share_before"].values()),
             min(own_share["own_type_share_after"].values()))
    if cfg.FIGURES:
        top = condition.top_shifted_genes(fit.log_fold_change.numpy(), genes, cell_types)
        path = plots.plot_condition_shifts(top, paths.fig_dir / f"condition_shifts{suffix}.png",
                                           title=f"{sample}: most-shifted genes per type ({fit.diagnostics['mode']})")
        log.info("wrote %s", path)
    return summary


def nb_baseline(paths: Paths, genes: list[str], cell_types: list[str]):
    """The per-type, per-gene NB fitted by moments on the training cells, or None without them."""
    try:
        train = read_dataset(paths.train_dir, stage="_1_split_train_test.py")
    except InputError as err:
        log.warning("no NB baseline: %s", err)
        return None
    check_genes(genes, train.var_names, paths.train_dir)
    codes, _ = encode_labels(train.obs["cell_type"].astype(str), cell_types)
    mu, theta = fit_nb_per_type(train.X, codes, len(cell_types), method="moments")
    return generate.NBBaselineSampler(torch.as_tensor(mu, dtype=torch.float32),
                                      torch.as_tensor(theta, dtype=torch.float32))


def score_sample(cfg, test, test_types, codes, kept, baseline, cell_types, stream, exact_mae) -> dict:
    """Metrics of the GMVAE cells (and the NB baseline's, same type counts) against the test cells."""
    settings = dict(seed=cfg.SEED, n_top_genes=cfg.N_TOP_GENES, n_comps=cfg.N_PCS, n_corr_genes=cfg.N_CORR_GENES)
    generated_types = np.asarray(cell_types)[codes]
    result = {"gmvae": evaluation.evaluate(test.X, test_types, kept, generated_types, cell_types, **settings)}
    result["gmvae"]["proportion_mae"] = exact_mae
    baseline_counts = None
    if baseline is not None:
        baseline_counts = generate.sample_in_memory(baseline, codes, cfg.SEED, stream=BASELINE_STREAM + stream)
        result["nb_baseline"] = evaluation.evaluate(test.X, test_types, baseline_counts, generated_types,
                                                    cell_types, **settings)
        result["nb_baseline"]["proportion_mae"] = exact_mae
    return result, baseline_counts


def draw_figures(cfg, paths: Paths, suffix: str, test, test_types, kept, generated_types, baseline_counts,
                 cell_types) -> None:
    """UMAP overlay and gene-gene correlation heatmaps of one sample's cells against the test cells."""
    counts = {"real (test)": test.X, "GMVAE": kept}
    embedding = plots.umap_embedding(counts, n_top_genes=cfg.N_TOP_GENES, n_comps=cfg.N_PCS, seed=cfg.SEED,
                                     method="umap" if cfg.UMAP else "pca")
    path = plots.plot_umap(embedding, {"real (test)": test_types, "GMVAE": generated_types},
                           paths.fig_dir / f"generated_umap{suffix}.png", type_order=cell_types,
                           axis_name="UMAP" if cfg.UMAP else "PC")
    log.info("wrote %s", path)
    real_normed = evaluation.log_normalize(test.X)
    genes = evaluation.top_variable_genes(real_normed, cfg.N_CORR_GENES)
    corr = {"real (test)": evaluation.gene_correlation(real_normed[:, genes]),
            "GMVAE": evaluation.gene_correlation(evaluation.log_normalize(kept)[:, genes])}
    if baseline_counts is not None:
        corr["NB baseline"] = evaluation.gene_correlation(evaluation.log_normalize(baseline_counts)[:, genes])
    path = plots.plot_correlation_heatmaps(corr, paths.fig_dir / f"generated_gene_correlation{suffix}.png",
                                           genes=np.asarray(test.var_names)[genes])
    log.info("wrote %s", path)


def write_json(payload: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n")


def log_summary(name: str, metrics: dict) -> None:
    keys = ["proportion_mae", "per_type_mean_r_median", "auroc", "auroc_quadratic", "mmd", "ks_library_size",
            "ks_zero_fraction", "gene_correlation_r", "gene_correlation_r_within_type"]
    for model_name, values in metrics.items():
        if isinstance(values, dict) and "auroc" in values:
            log.info("%s %-12s %s", name, model_name, "  ".join(f"{k}={values[k]:.4f}" for k in keys))


def main(argv=None) -> dict:
    cfg = load_config(globals(), argv)
    setup_logging()
    ctx = distributed.init(cfg.DEVICE)  # a world of one unless started by torchrun
    try:
        return generate_all(cfg, ctx)
    finally:
        distributed.teardown(ctx)


def generate_all(cfg, ctx) -> dict:
    paths = Paths(cfg.DATA_DIR, cfg.FIG_DIR)
    set_seed(cfg.SEED)
    distributed.set_rank_threads(cfg.TORCH_THREADS, ctx)
    if cfg.CHUNK_CELLS <= 0:
        raise InputError(f"CHUNK_CELLS must be positive, got {cfg.CHUNK_CELLS}")
    composition_choice(cfg.CONDITION_COMPOSITION)  # a bad value fails before any work
    device = ctx.device

    model, meta = load_gmvae(paths.gmvae_checkpoint, device)
    genes, cell_types = [str(g) for g in meta["genes"]], [str(c) for c in meta["cell_types"]]
    log.info("loaded %s: %d genes, %d cell types", paths.gmvae_checkpoint, len(genes), len(cell_types))

    test = None
    if paths.test_dir.exists():
        test = read_dataset(paths.test_dir, stage="_1_split_train_test.py")
        check_genes(genes, test.var_names, paths.test_dir)
    counts = cell_counts_table(cfg, paths, cell_types, test)
    evaluate_now = cfg.EVALUATE and test is not None
    test_types = test.obs["cell_type"].astype(str).to_numpy() if test is not None else None
    baseline = nb_baseline(paths, genes, cell_types) if evaluate_now and ctx.is_main else None

    several = len(counts) > 1
    if cfg.SAMPLER not in ("inversion", "model"):
        raise InputError(f"SAMPLER must be 'inversion' or 'model', got {cfg.SAMPLER!r}")
    if cfg.PRIOR not in ("posterior", "learned"):
        raise InputError(f"PRIOR must be 'posterior' or 'learned', got {cfg.PRIOR!r}")
    prior = cfg.PRIOR
    if prior == "posterior" and not bool(model.post_fitted):
        log.warning("%s has no fitted posterior prior (written before it existed); using the learned p(z|k). "
                    "Rerun _3_train_gmvae.py to get it", paths.gmvae_checkpoint)
        prior = "learned"
    log.info("z drawn from the %s prior", "fitted posterior" if prior == "posterior" else "learned")
    calibrate = cfg.CALIBRATE and bool(model.mean_log_ratio.abs().sum() > 0)
    if cfg.CALIBRATE and not calibrate:
        log.warning("%s has no gene-mean calibration (written before it existed); generating uncalibrated. "
                    "Rerun _3_train_gmvae.py to get it", paths.gmvae_checkpoint)
    sampler = generate.gmvae_sampler(model, cfg.NOISE_SCALE, method=cfg.SAMPLER, prior=prior, calibrate=calibrate)
    gene_ids = known_gene_ids(paths.train_dir, genes)  # genes.tsv's id column, where _1_ had ids
    # on rank 0 alone, broadcast: every rank then draws from the same shifts and cell counts
    conditions, counts = distributed.on_main(
        ctx, lambda: fit_conditioning(cfg, paths, model, genes, counts, prior, calibrate, gene_ids))
    if any(fit.composition is not None for fit in conditions.values()) and ctx.is_main:
        paths.generated_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(paths.generated_dir / "composition.csv") as tmp:
            (counts / counts.sum(1).to_numpy()[:, None]).rename_axis("sample").to_csv(tmp)
        log.info("wrote %s (the shares generated, re-estimated with the conditioning)",
                 paths.generated_dir / "composition.csv")
    samplers = {}
    for sample in counts.index:  # a conditioned sample draws through its own shifts
        fit = conditions.get(str(sample))
        samplers[str(sample)] = sampler if fit is None else generate.gmvae_sampler(
            model, cfg.NOISE_SCALE, method=cfg.SAMPLER, prior=prior, calibrate=calibrate, z_shift=fit.z_shift,
            log_mean_shift=fit.log_mean_shift)
    condition_summary = {}

    def folder_of(sample):
        return paths.generated_dir / safe_name(sample) if several else paths.generated_dir

    if ctx.distributed:  # every rank draws its share of every sample; the files equal one process's
        sharded.write_generated_sharded([folder_of(s) for s in counts.index], [samplers[str(s)] for s in counts.index],
                                        genes, cell_types, [counts.loc[s].to_numpy() for s in counts.index],
                                        list(map(str, counts.index)), cfg.SEED, cfg.CHUNK_CELLS, ctx, device=device,
                                        gene_ids=gene_ids)
        if not ctx.is_main:  # rank 0 alone scores, draws the figures and writes config.json
            return {}
    summary, shares = {}, {}
    for stream, sample in enumerate(counts.index):
        folder = folder_of(sample)
        suffix = f"_{safe_name(sample)}" if several else ""
        per_type = counts.loc[sample]
        log.info("sample %s: %d cells -> %s (%s)", sample, per_type.sum(), folder,
                 ", ".join(f"{t}={n}" for t, n in per_type.items() if n))
        fit = conditions.get(str(sample))
        sample_sampler = samplers[str(sample)]
        keep_cells = cfg.EVAL_MAX_CELLS if evaluate_now else 0
        if ctx.distributed:
            codes, kept = sharded.read_kept(folder, per_type.to_numpy(), keep_cells, cfg.SEED)
        else:
            codes, kept = generate.write_generated(
                folder, sample_sampler, genes, cell_types, per_type.to_numpy(), cfg.SEED, cfg.CHUNK_CELLS,
                stream=stream, sample=str(sample), keep_cells=keep_cells, device=device, gene_ids=gene_ids)
        shares[str(sample)] = per_type / per_type.sum()
        log.info("wrote %s (matrix.mtx, cells.h5ad, clusters.csv); peak RSS %.0f MiB", folder, peak_rss_mb())
        if fit is not None:
            own = {f"own_type_share_{when}": dict(zip(cell_types, condition.own_type_share(
                model, chosen, len(cell_types), 32, generate.block_generator(cfg.SEED, CONDITION_STREAM + 1, stream))))
                for when, chosen in (("before", sampler), ("after", sample_sampler))}
            condition_summary[str(sample)] = write_condition(cfg, paths, folder, suffix, str(sample), fit, own,
                                                             genes, cell_types)
        if not evaluate_now:
            continue
        real_shares = evaluation.type_proportions(test_types, cell_types)
        exact_mae = float(proportion_metrics(shares[str(sample)].to_frame("s").T,
                                             real_shares.to_frame("s").T).loc["overall", "mae"])
        metrics, baseline_counts = score_sample(cfg, test, test_types, codes, kept, baseline, cell_types,
                                                stream, exact_mae)
        metrics = {"sample": str(sample), "n_cells": int(per_type.sum()), **metrics}
        if fit is not None:
            metrics["condition"] = condition_summary[str(sample)]
        summary[str(sample)] = metrics
        log_summary(str(sample), metrics)
        if cfg.FIGURES and stream == 0:  # one UMAP / heatmap set: the first sample's
            draw_figures(cfg, paths, suffix, test, test_types, kept, np.asarray(cell_types)[codes],
                         baseline_counts, cell_types)
        if several:
            write_json(metrics, folder / "metrics.json")

    if evaluate_now:
        reference = evaluation.real_vs_real(test.X, test_types, cell_types, seed=cfg.SEED, n_top_genes=cfg.N_TOP_GENES,
                                            n_comps=cfg.N_PCS, n_corr_genes=cfg.N_CORR_GENES)
        log_summary("test halves", {"real_vs_real": reference})
        payload = (dict(next(iter(summary.values()))) if not several else {"samples": summary})
        payload["real_vs_real"] = reference
        payload["n_test_cells"] = int(test.n_obs)
        write_json(payload, paths.generated_metrics)
        log.info("wrote %s", paths.generated_metrics)
    elif condition_summary:  # no test cells to score against: metrics.json holds the fits alone
        write_json({"condition": condition_summary}, paths.generated_metrics)
    if cfg.FIGURES:
        real = evaluation.type_proportions(test_types, cell_types) if test is not None else None
        path = plots.plot_proportions(pd.DataFrame(shares).T, paths.fig_dir / "generated_proportions.png", real=real)
        log.info("wrote %s", path)
    save_config(cfg, paths.generated_dir / "config.json")
    log.info("done; peak RSS %.0f MiB", peak_rss_mb())
    return summary


if __name__ == "__main__":
    run_stage(main)
