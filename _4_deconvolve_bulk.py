"""Stage 4: cell-type proportions of bulk RNA-seq with scTAPE, trained on the training reference.

Reads:
    DATA_DIR/sctape/reference.txt.gz     cells x genes raw counts, row index = cell-type name (_2_)
    DATA_DIR/sctape/config.json          _2_'s settings: PROTOCOL, how the reference was counted
    DATA_DIR/train/clusters.csv          cell-type names and their order (_1_)
    DATA_DIR/raw/GeneLength.txt          gene lengths for counts -> TPM (_0_)
    BULK                                 samples x genes or genes x samples, counts or TPM
                                         (default: DATA_DIR/sctape/pseudobulk_tpm.tsv from _2_)
    BULK_TRUTH                           optional samples x cell types proportions
                                         (default with the default BULK: sctape/pseudobulk_truth.csv)
Writes:
    DATA_DIR/checkpoints/tape.pt               TAPE state_dict + genes + cell types + settings (+ the
                                               interval calibration: half-widths and the simulated bulks)
    DATA_DIR/deconvolution/proportions.csv     samples x cell types (clusters.csv names), rows sum to 1
    DATA_DIR/deconvolution/proportions_lower.csv, proportions_upper.csv
                                               the 90 % interval of every proportion (split conformal,
                                               calibrated on simulated bulks with known truth; widened
                                               per sample for a bulk that departs from them)
    DATA_DIR/deconvolution/metrics.csv         with truth: MAE, RMSE, Pearson r, Lin's CCC, overall + per sample
    DATA_DIR/deconvolution/bulk.json           the bulk's path, unit and protocol (stage 5 conditions on it)
    DATA_DIR/deconvolution/departure.csv       per sample: TAPE's reconstruction residual, how far the bulk departs
                                               from the simulated bulks in its most departing genes (score,
                                               p_value) and whether beyond every one of them (departs)
    DATA_DIR/deconvolution/config.json         the settings of this run
    FIG_DIR/proportions_scatter.png            with truth: predicted vs true with the 90 % intervals as
                                               error bars, MAE and interval coverage in the title
    FIG_DIR/departure.png                      each sample's departure score against the simulated bulks'

Run:
    python _4_deconvolve_bulk.py                                   # train, then deconvolve _2_'s pseudo-bulks
    python _4_deconvolve_bulk.py --RETRAIN=false --BULK=my_bulk.tsv --BULK_UNIT=counts

Units: every bulk is first brought to transcripts per million as its protocol requires. UMI
counts (the 10x/Drop-seq reference, its pseudo-bulks) are one count per molecule, so their TPM is
CPM; reads from full-length bulk RNA-seq grow with gene length, so their TPM divides by it. Then
all tables get TAPE's input scale (TPM / gene length, what its datatype="TPM" makes of UMI
counts). TAPE itself gives a real bulk's TPM that scale unchanged, one gene length short of the
reference's, which costs accuracy (Finotello MAE 0.130 -> 0.099, mean of 2 seeds; README).
BULK_PROTOCOL="auto" tells bulk counts of either kind apart from the data (gene-length slope of
bulk/reference, logged).
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd

from models import deconvolution as tape
from models import io
from models.config import load_config, save_config
from models.metrics import proportion_metrics
from models.paths import CLUSTERS, Paths, resolve
from models.utils import InputError, peak_rss_mb, require_files, run_stage, set_seed, set_torch_threads, setup_logging

log = logging.getLogger("bulk2sc.deconvolve")

# -----------------------------------------------------------------------------
DATA_DIR = "data"  # root of every stage's inputs and outputs; relative paths are from the repo root
FIG_DIR = "fig"  # proportions_scatter.png goes here
SEED = 0  # seeds TAPE's simulation (numpy) and training (torch); same seed, same model
RETRAIN = True  # false: predict with checkpoints/tape.pt, no training
BULK = ""  # bulk table (CSV/TSV, optionally .gz, either orientation); "" = _2_'s pseudo-bulks
BULK_UNIT = "TPM"  # "counts" or "TPM" (used as is); TAPE needs TPM
BULK_PROTOCOL = "auto"  # counts only: "full_length" (RNA-seq reads: TPM with GeneLength.txt), "umi" (pseudo-bulk of UMI cells: CPM) or "auto" (from the gene-length slope vs the reference, logged)
BULK_TRUTH = ""  # samples x cell types proportions to score against; "" = _2_'s truth with the default BULK
MIN_SHARED_GENES = 1000  # fewer bulk genes shared with the reference than this is an error
SAMPLENUM = 2000  # simulated training bulks (TAPE: 5,000, the original: 15,000); ~5 min CPU at lung scale (README)
N_CELLS = 500  # cells per simulated bulk (TAPE's n); TAPE's default
EPOCHS = 64  # TAPE: 128, the original: 640 (1.7 h at lung scale). 128 here, mean of 3 seeds: lower pseudo-bulk MAE (Zheng 0.0155 vs 0.0215), worse on real bulks (Finotello 0.101 vs 0.096), 8 min vs 3.9 at lung scale (README)
BATCH_SIZE = 128  # TAPE's default; lr is fixed at 1e-4 inside TAPE, so larger batches learn slower
VARIANCE_THRESHOLD = 0.98  # TAPE keeps genes above the 98th-from-top variance rank (drops the lowest 2%)
ADAPTIVE = False  # TAPE's adaptive stage (300 x 3 steps on the bulk): minutes, and worse MAE on Zheng and Finotello (README)
SPARSE = True  # TAPE's default: half the simulated samples lack half the cell types
TORCH_THREADS = 0  # 0 = one per core; TAPE's speed scales with threads on 2 cores
PLATFORM_SD = 0.0  # augmentation: sd of per-(bulk, gene) log-normal factors on the simulated training bulks, so TAPE
#                   cannot lean on exact per-gene levels that another platform or a cell state shifts (README: measured)
LENGTH_SLOPE_SD = 0.0  # augmentation: sd of a per-bulk slope of log expression on log gene length (needs GeneLength)
GENE_SELECTION = "all"  # "all": every gene TAPE's variance filter keeps; "markers": only each type's MARKERS_PER_TYPE
#                        most specific genes in the reference (README: measured on real bulks)
MARKERS_PER_TYPE = 200  # with GENE_SELECTION="markers"
MARKER_MIN_DETECTION = 0.1  # with "markers": a marker is detected in at least this share of its type's cells
MEMBERS = 1  # TAPE fits averaged (an ensemble on the same simulated bulks, seeds SEED .. SEED+MEMBERS-1); each costs
#              one training run (3.9 min at lung scale with every gene)
CELL_CONTENT = ""  # "": TAPE's proportions as they are (cell fractions if a type's mRNA per cell is its mean library in
#                   the reference); a CSV cell_type,content of relative mRNA per cell (e.g. EPIC's for blood cells)
#                   converts them to cell fractions under that content (models/deconvolution/content.py; README)
CALIBRATION_SAMPLES = 400  # simulated bulks with known truth that set the 90 % intervals (split conformal): the
#                            coverage's sampling sd is ~1.5 % at 400; they cost one forward pass, seconds
# -----------------------------------------------------------------------------


def read_reference(path) -> pd.DataFrame:
    """TAPE's reference table: cells x genes counts (float32), index = cell-type name."""
    reference = io.read_csv_checked(path, "rerun _2_prepare_sctape.py", sep="\t", index_col=0)
    reference.index = reference.index.astype(str)
    reference.columns = reference.columns.astype(str)
    io.check_counts(reference.to_numpy(), path)
    return reference.astype(np.float32)


def reference_protocol(config_path) -> str:
    """How the reference was counted, as _2_ recorded it (its PROTOCOL setting)."""
    try:
        protocol = json.loads(config_path.read_text())["PROTOCOL"]
    except (OSError, ValueError, KeyError):
        raise InputError(f"{config_path} has no PROTOCOL (written by an older _2_): "
                         "rerun _2_prepare_sctape.py") from None
    if protocol not in tape.PROTOCOLS:
        raise InputError(f"{config_path}: PROTOCOL must be one of {tape.PROTOCOLS}, got {protocol!r}")
    return protocol


def order_like(pred: pd.DataFrame, type_names: list[str], source: str) -> pd.DataFrame:
    """Predicted proportions in clusters.csv's type order; the two sets of names must agree."""
    if set(pred.columns) != set(type_names):
        raise InputError(
            f"{source} has cell types {sorted(pred.columns)} but clusters.csv has {sorted(type_names)}; "
            "rerun _2_prepare_sctape.py (and retrain with --RETRAIN=true)")
    return pred[type_names]


def read_truth(path, samples, type_names: list[str], default_bulk: bool) -> pd.DataFrame:
    """BULK_TRUTH (samples x cell types), checked to score the bulk's ``samples`` over ``type_names``."""
    require_files([path], "_2_prepare_sctape.py" if default_bulk else "(BULK_TRUTH)")
    truth = tape.read_table(path)
    truth.index, truth.columns = truth.index.astype(str), truth.columns.astype(str)
    unknown = [c for c in truth.columns if c not in type_names]
    if unknown:
        raise InputError(f"{path}: cell types {unknown[:5]} are not those of clusters.csv ({', '.join(type_names)}); "
                         f"{'rerun _2_prepare_sctape.py' if default_bulk else 'name the columns as in clusters.csv'}")
    if not any(s in truth.index for s in map(str, samples)):
        raise InputError(f"{path}: no sample name in common with the bulk (truth: {list(truth.index[:3])}, bulk: "
                         f"{list(map(str, samples))[:3]}); name the rows as the bulk's samples")
    values = truth.apply(pd.to_numeric, errors="coerce")
    if values.isna().to_numpy().any() or (values.to_numpy() < 0).any():
        raise InputError(f"{path}: proportions must be numbers >= 0 (found NaN, text or negative values); fix the file")
    return values


def scatter_figure(pred: pd.DataFrame, truth: pd.DataFrame, mae: float, path,
                   bounds: tuple[pd.DataFrame, pd.DataFrame] | None = None) -> None:
    """Predicted vs true proportion per (sample, type), one colour per type, y = x line.

    bounds: (lower, upper) of the 90 % intervals, drawn as vertical error bars.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    title = f"MAE = {mae:.4f} ({len(truth)} samples x {truth.shape[1]} types)"
    for name in truth.columns:
        y = pred.loc[truth.index, name]
        if bounds is None:
            ax.scatter(truth[name], y, s=14, alpha=0.8, label=name)
        else:
            err = [y - bounds[0].loc[truth.index, name], bounds[1].loc[truth.index, name] - y]
            ax.errorbar(truth[name], y, yerr=err, fmt="o", ms=3.5, elinewidth=0.8, capsize=1.5, alpha=0.8,
                        label=name)
    if bounds is not None:
        title += f"\n90 % intervals cover {100 * tape.coverage(*bounds, truth):.0f} % of the truths"
    top = float(max(truth.to_numpy().max(), pred.to_numpy().max(), 1e-3)) * 1.05
    if bounds is not None:
        top = max(top, float(bounds[1].loc[truth.index, truth.columns].to_numpy().max()) * 1.02)
    ax.plot([0, top], [0, top], color="grey", lw=1, ls="--")
    ax.set(xlim=(0, top), ylim=(0, top), xlabel="true proportion", ylabel="predicted proportion (TAPE)",
           title=title)
    if truth.shape[1] <= 20:
        ax.legend(fontsize=6, markerscale=0.8, loc="upper left", frameon=False)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def departure_figure(departure: pd.DataFrame, simulated_scores: np.ndarray, path) -> None:
    """Each sample's departure score (departure.csv) against the simulated bulks' own: a histogram of
    theirs, a mark per sample (red where it departs beyond every simulated bulk), log x axis."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    scores = departure["score"].to_numpy(float)
    low = max(min(scores.min(), simulated_scores.min()) * 0.8, 1e-3)
    high = max(scores.max(), simulated_scores.max()) * 1.25
    ax.hist(simulated_scores, bins=np.geomspace(low, high, 40), color="0.75", label="simulated bulks (TAPE's kind)")
    ax.axvline(simulated_scores.max(), color="0.3", ls="--", lw=1, label="highest simulated")
    departs = departure["departs"].to_numpy(bool)
    for mask, colour, label in ((~departs, "tab:blue", "sample"), (departs, "tab:red", "sample that departs")):
        if mask.any():
            ax.plot(scores[mask], np.zeros(mask.sum()), "|", ms=18, mew=1.5, color=colour, label=label,
                    transform=ax.get_xaxis_transform())
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="departure score (mean squared z, top 1 % of genes)", ylabel="simulated bulks",
           title=f"{int(departs.sum())} of {len(departs)} samples depart from the bulks TAPE was trained on")
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def calibrate_intervals(fit, reference: pd.DataFrame, gene_lengths: pd.Series, cfg, paths: Paths,
                        n_threads: int) -> pd.Series:
    """Per-type half-width of the 90 % intervals: TAPE's errors on simulated bulks with known truth."""
    calib_tpm, calib_truth = tape.calibration_bulks(reference, fit.settings, cfg.CALIBRATION_SAMPLES, gene_lengths,
                                                    paths.checkpoints_dir, n_threads)
    calib_pred = tape.predict_proportions(tape.checkpoint_dict(fit), calib_tpm, gene_lengths, adaptive=False,
                                          source="calibration bulks", n_threads=n_threads, model=fit.members)
    halfwidth = tape.conformal_halfwidth(calib_pred, calib_truth)
    log.info("90 %% intervals from %d simulated bulks: half-width %s", len(calib_tpm),
             ", ".join(f"{t} {w:.3f}" for t, w in halfwidth.items()))
    # kept with the model: a bulk that departs from these gets its own, wider intervals (bulk_halfwidth)
    fit.calibration = (tape.model_inputs(tape.checkpoint_dict(fit), calib_tpm, gene_lengths).astype(np.float32),
                       calib_truth[list(fit.cell_types)].reset_index(drop=True))
    return halfwidth


def bulk_halfwidth(ckpt: dict, model, bulk_tpm: pd.DataFrame, gene_lengths: pd.Series, halfwidth: pd.Series,
                   n_threads: int, source: str) -> tuple[pd.DataFrame, pd.DataFrame | None, np.ndarray | None]:
    """(per-sample half-widths: the calibration's, widened for a bulk TAPE reconstructs worse than the
    simulated bulks (another platform; intervals.departure_halfwidth); per sample, how far the bulk departs
    from the simulated bulks (departure.csv); the simulated bulks' own departure scores), logged. Without
    calibration bulks: (the calibration's half-widths, None, None)."""
    calibration = tape.checkpoint_calibration(ckpt)
    index = bulk_tpm.index
    if calibration is None:
        log.info("%s has no calibration bulks (trained before they were kept): intervals from the simulated "
                 "bulks' errors alone, which a bulk from another platform exceeds; retrain to widen them", source)
        return pd.DataFrame([halfwidth.to_numpy()] * len(index), index=index, columns=halfwidth.index), None, None
    models = model if model is not None else tape.models_from_checkpoint(ckpt)
    x = tape.model_inputs(ckpt, bulk_tpm, gene_lengths)
    widths, info = tape.departure_halfwidth(tape.reconstruction(models, n_threads), calibration[0],
                                            calibration[1], x, halfwidth, index=index)
    log.info("TAPE's reconstruction residual (rms over genes, in its input scale): median %.4f over the bulk's "
             "samples, %.4f on the simulated bulks; %d of %d samples exceed it or depart in a few genes (below), "
             "their intervals widened (mean half-width %.3f, simulated bulks' %.3f)", float(np.median(info["rms"])), info["rms_simulated"],
             int((info["excess"] > 0).sum()), len(index), float(widths.to_numpy().mean()), float(halfwidth.mean()))
    departure = pd.DataFrame({"residual_rms": info["rms"], "score": info["score"], "p_value": info["p_value"],
                              "departs": info["score"] > info["score_simulated_max"]}, index=index)
    departure.index.name = "sample"
    log.info("departure in the genes that depart most (mean squared residual over the top %.0f %% of genes, in "
             "units of the simulated bulks' residual): median %.1f, the simulated bulks' highest %.1f; %d of %d "
             "samples depart beyond every simulated bulk (a state the reference lacks, or another platform: "
             "stage 5 re-reads their composition with CONDITION_COMPOSITION=auto)",
             100 * tape.DEPARTURE_TAIL, float(np.median(info["score"])), info["score_simulated_max"],
             int(departure["departs"].sum()), len(index))
    return widths, departure, info["scores_simulated"]


def main(argv=None) -> pd.DataFrame:
    cfg = load_config(globals(), argv)
    setup_logging()
    paths = Paths(cfg.DATA_DIR, cfg.FIG_DIR)
    set_seed(cfg.SEED)
    n_threads = set_torch_threads(cfg.TORCH_THREADS)
    log.info("torch threads: %d", n_threads)

    if cfg.GENE_SELECTION not in tape.GENE_SELECTIONS:
        raise InputError(f"GENE_SELECTION must be one of {tape.GENE_SELECTIONS}, got {cfg.GENE_SELECTION!r}")
    if cfg.PLATFORM_SD < 0 or cfg.LENGTH_SLOPE_SD < 0:
        raise InputError(f"PLATFORM_SD and LENGTH_SLOPE_SD must be >= 0, got {cfg.PLATFORM_SD} and {cfg.LENGTH_SLOPE_SD}")
    if cfg.MEMBERS < 1 or cfg.MARKERS_PER_TYPE < 1:
        raise InputError(f"MEMBERS and MARKERS_PER_TYPE must be at least 1, got {cfg.MEMBERS} and {cfg.MARKERS_PER_TYPE}")
    default_bulk = not cfg.BULK
    bulk_path = paths.pseudobulk_tpm if default_bulk else resolve(cfg.BULK)
    truth_path = resolve(cfg.BULK_TRUTH) if cfg.BULK_TRUTH else (paths.pseudobulk_truth if default_bulk else None)
    require_files([paths.train_dir / CLUSTERS], "_1_split_train_test.py")
    require_files([paths.gene_length], "_0_download_data.py")
    if default_bulk:
        require_files([bulk_path], "_2_prepare_sctape.py")
    type_names = io.read_type_order(paths.train_dir / CLUSTERS)
    gene_lengths = io.read_gene_lengths(paths.gene_length)
    content = tape.read_cell_content(resolve(cfg.CELL_CONTENT), type_names) if cfg.CELL_CONTENT else None

    if cfg.RETRAIN:
        require_files([paths.sctape_reference, paths.sctape_config], "_2_prepare_sctape.py")
        protocol = reference_protocol(paths.sctape_config)
        reference = read_reference(paths.sctape_reference)
        log.info("reference %s: %d cells x %d genes, %d types, %s counts", paths.sctape_reference,
                 reference.shape[0], reference.shape[1], reference.index.nunique(), protocol)
        reference_genes = reference.columns
        reference_ids = io.known_gene_ids(paths.train_dir, reference_genes)  # a 10x genes.tsv's id column
        profile = tape.reference_profile(reference, protocol, gene_lengths)
    else:
        ckpt = tape.load_checkpoint(paths.tape_checkpoint)
        reference_genes, protocol = ckpt["genes"], tape.checkpoint_protocol(ckpt)
        reference_ids = ckpt.get("gene_ids")
        profile = tape.checkpoint_profile(ckpt)
        if content is not None and tape.checkpoint_library(ckpt) is None:
            raise InputError(f"{paths.tape_checkpoint} has no reference library sizes (trained before CELL_CONTENT "
                             "existed), which the content conversion needs; retrain with --RETRAIN=true")
        log.info("loaded %s (%d genes, %d cell types, %s reference)", paths.tape_checkpoint, len(ckpt["genes"]),
                 len(ckpt["cell_types"]), protocol)

    bulk_tpm, bulk_report = tape.prepare_bulk(tape.read_table(bulk_path), cfg.BULK_UNIT, reference_genes,
                                              gene_lengths, cfg.MIN_SHARED_GENES, str(bulk_path),
                                              protocol=cfg.BULK_PROTOCOL, profile=profile,
                                              reference_ids=reference_ids)

    # the truth is checked before anything is written: a bad BULK_TRUTH must not cost a training
    truth = None if truth_path is None else read_truth(truth_path, bulk_tpm.index, type_names, default_bulk)

    model = None
    if cfg.RETRAIN:
        if set(reference.index) != set(type_names):
            raise InputError(f"{paths.sctape_reference} has cell types {sorted(set(reference.index))} but "
                             f"{paths.train_dir / CLUSTERS} has {sorted(type_names)}: rerun _2_prepare_sctape.py")
        settings = tape.TapeSettings(
            samplenum=cfg.SAMPLENUM, n_cells=cfg.N_CELLS, epochs=cfg.EPOCHS, batch_size=cfg.BATCH_SIZE,
            variance_threshold=cfg.VARIANCE_THRESHOLD, adaptive=cfg.ADAPTIVE, sparse=cfg.SPARSE, seed=cfg.SEED,
            reference_protocol=protocol, gene_selection=cfg.GENE_SELECTION, markers_per_type=cfg.MARKERS_PER_TYPE,
            marker_min_detection=cfg.MARKER_MIN_DETECTION, members=cfg.MEMBERS, platform_sd=cfg.PLATFORM_SD,
            length_slope_sd=cfg.LENGTH_SLOPE_SD)
        fit = tape.fit_tape(reference, bulk_tpm, gene_lengths, settings, paths.checkpoints_dir, n_threads)
        fit.halfwidth = calibrate_intervals(fit, reference, gene_lengths, cfg, paths, n_threads)
        if reference_ids is not None:
            fit.gene_ids = [dict(zip(map(str, reference_genes), reference_ids))[g] for g in fit.genes]
        del reference
        tape.save_checkpoint(fit, paths.tape_checkpoint)
        log.info("wrote %s (%d genes)", paths.tape_checkpoint, len(fit.genes))
        ckpt, model = tape.checkpoint_dict(fit), fit.members

    pred = tape.predict_proportions(ckpt, bulk_tpm, gene_lengths, adaptive=cfg.ADAPTIVE, min_shared_genes=cfg.MIN_SHARED_GENES,
                                    source=str(bulk_path), n_threads=n_threads,
                                    workdir=paths.deconvolution_dir, model=model)
    pred = order_like(pred, type_names, str(paths.tape_checkpoint))
    pred.index.name = "sample"
    halfwidth = tape.checkpoint_halfwidth(ckpt)
    bounds = departure = simulated_scores = None
    if halfwidth is None:
        log.warning("%s has no interval calibration (trained before it existed): no intervals written; "
                    "retrain with --RETRAIN=true to get them", paths.tape_checkpoint)
    elif cfg.ADAPTIVE:  # the adaptive stage refits the model per bulk: the departure check does not apply
        bounds = tape.intervals(pred, halfwidth)
    else:
        widths, departure, simulated_scores = bulk_halfwidth(ckpt, model, bulk_tpm, gene_lengths, halfwidth,
                                                             n_threads, str(paths.tape_checkpoint))
        bounds = tape.intervals(pred, pd.Series(1.0, index=pred.columns), widths[pred.columns])
    if content is not None:
        weights = tape.content_weights(tape.checkpoint_library(ckpt), content, type_names)
        pred, bounds = tape.to_cell_content(pred, weights, bounds)
        log.info("%s: proportions converted to cell fractions under the given mRNA per cell (x reference "
                 "library / content, renormalised): %s", cfg.CELL_CONTENT,
                 ", ".join(f"{t} x{w / weights.mean():.2f}" for t, w in zip(type_names, weights)))
    io.write_table(pred, paths.proportions)
    log.info("wrote %s (%d samples x %d cell types)", paths.proportions, *pred.shape)
    if bounds is not None:
        for bound, path in zip(bounds, (paths.proportions_lower, paths.proportions_upper)):
            bound.index.name = "sample"
            io.write_table(bound, path)
        log.info("wrote %s and %s (90 %% intervals)", paths.proportions_lower, paths.proportions_upper)
    if departure is not None:
        io.write_table(departure.loc[pred.index], paths.departure)
        departure_figure(departure, simulated_scores, paths.departure_figure)
        log.info("wrote %s and %s", paths.departure, paths.departure_figure)
    else:  # a departure table of an earlier run describes other bulks
        paths.departure.unlink(missing_ok=True)
    # Stage 5 conditions the cells on this bulk: where it is and how it was read (its platform).
    record = {"path": str(bulk_path), "unit": cfg.BULK_UNIT, "reference_protocol": protocol,
              "protocol": bulk_report.protocol or (protocol if default_bulk else None)}
    with io.atomic_path(paths.bulk_record) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")

    if truth is not None:
        metrics = proportion_metrics(pred, truth)
        io.write_table(metrics, paths.deconvolution_metrics)
        overall = metrics.loc["overall"]
        log.info("against %s: MAE %.4f, RMSE %.4f, r %.3f, CCC %.3f", truth_path, overall["mae"],
                 overall["rmse"], overall["pearson_r"], overall["ccc"])
        scored = truth.loc[[s for s in truth.index if s in pred.index], [c for c in pred.columns if c in truth.columns]]
        if bounds is not None:
            log.info("90 %% intervals cover %.1f %% of the %d (sample, type) truths", 100 * tape.coverage(*bounds, scored),
                     scored.size)
        scatter_figure(pred, scored, overall["mae"], paths.proportions_scatter, bounds)
    save_config(cfg, paths.deconvolution_dir / "config.json")
    log.info("peak RSS %.0f MB", peak_rss_mb())
    return pred


if __name__ == "__main__":
    run_stage(main)
