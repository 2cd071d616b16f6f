"""Benchmark for stage 4 (scTAPE deconvolution): accuracy, speed and peak memory.

Parts (``--PART=``, default ``all`` = zheng,finotello,lung):
    zheng      Zheng PBMC (../shared/data/pbmc_zheng7): stratified 75/25 split (models.split),
               TAPE trained on the 75%, pseudo-bulks of the 25% (models.bulk.sample_pseudobulks,
               as _2_) plus one pseudo-bulk of the whole test split. Accuracy against training
               time for several SAMPLENUM (MAE read at several epoch counts of one run: TAPE's
               training_stage resumed on the same model and optimizer, which equals one longer
               run); then MAE, r and CCC at stage 4's defaults for TAPE (adaptive and not) and
               for NNLS on the reference's mean profiles.
    finotello  the five real PBMC bulks with flow-cytometry fractions (bulk_finotello_pbmc),
               deconvolved with the same Zheng reference; types mapped onto the flow categories
               (MAPPING below), both renormalised over the shared categories; TAPE vs NNLS.
    real       both real cohorts (Finotello: 5 bulks, read counts, flow cytometry; DAISM: 20 bulks,
               TPM) x both shared references (pbmc_zheng7: its 75 % training split; pbmc3k_labelled:
               all cells), mapped onto five categories (CATEGORIES below); for each, today's method
               (stage 4 as before the intervals: one TAPE fit, point estimates) next to the methods
               under test (METHODS), with MAE, pooled r, per-category r and the coverage of the 90 %
               intervals; plus the Zheng pseudo-bulks (MAE, coverage) from the same fits. VARIANTS adds
               fits with marker-gene selection and/or ensembles (every fit of a reference shares one
               simulation and one set of calibration bulks). EXTERNAL_PYTHON adds Rectangle (rectanglepy,
               run by another Python: external/rectangle_runner.py) on the same reference and bulks.
    lung       timing at lung scale: synthetic 7,600 cells x 16,000 genes, 17 types, stage 4's
               default settings (or LUNG_VARIANT): simulation, training, interval calibration and
               prediction seconds, their total, peak RSS.

Run (heavy: take the shared lock so timings do not overlap other helpers' runs):
    flock /tmp/bulk2sc_heavy.lock .venv/bin/python benchmarks/bench_deconvolution.py
    flock /tmp/bulk2sc_heavy.lock .venv/bin/python benchmarks/bench_deconvolution.py --PART=lung
    flock /tmp/bulk2sc_heavy.lock .venv/bin/python benchmarks/bench_deconvolution.py --PART=real
    flock /tmp/bulk2sc_heavy.lock .venv/bin/python benchmarks/bench_deconvolution.py --PART=real --METHODS=today,tape \
        --AUGMENT=false --VARIANTS='markers:50*1,markers:100*1,markers:200*4,all*4@32' --FIG_DIR=
    for s in 0 1 2; do flock /tmp/bulk2sc_heavy.lock .venv/bin/python benchmarks/bench_deconvolution.py --PART=real \
        --METHODS=today,tape,tape/epic --AUGMENT=true --SEED=$s; done   # CELL_CONTENT (EPIC) and augmentation, 3 seeds
    for s in 0 1 2; do flock /tmp/bulk2sc_heavy.lock .venv/bin/python benchmarks/bench_deconvolution.py --PART=real \
        --METHODS=tape,tape/epic --AUGMENT=true --SEED=$s --FIG_DIR= \
        --REAL_REFERENCES=pbmc3k_labelled+kang_ifnb:ctrl; done   # a pooled reference: pbmc3k + Kang's control cells
    flock /tmp/bulk2sc_heavy.lock .venv/bin/python benchmarks/bench_deconvolution.py --PART=real --METHODS= \
        --FIG_DIR= --EXTERNAL_PYTHON=/tmp/rectangle/bin/python   # Rectangle alone (its own venv: external/)
Prints figures only; asserts nothing about time.
"""
from __future__ import annotations

import contextlib
import io as _io
import logging
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import _4_deconvolve_bulk as stage4  # noqa: E402
from models import deconvolution as tape  # noqa: E402
from models import io  # noqa: E402
from models.bulk import counts_to_cpm, counts_to_expression, sample_pseudobulks  # noqa: E402
from models.config import load_config  # noqa: E402
from models.metrics import pearson_r, proportion_metrics  # noqa: E402
from models.split import stratified_split  # noqa: E402
from models.utils import bound_heap_fragmentation, peak_rss_mb, set_seed, set_torch_threads, setup_logging  # noqa: E402

log = logging.getLogger("bench.deconvolution")

# -----------------------------------------------------------------------------
PART = "all"  # all (= zheng,finotello,lung) or a comma-separated subset of zheng,finotello,real,lung
SHARED = str(REPO.parent / "shared" / "data")  # real data beside the checkout
SEED = 0  # TAPE seed and split seed offset
SPLIT_SEED = 123  # models.split default, as _1_
N_PSEUDOBULKS = 20  # pseudo-bulks of the Zheng test split (as _2_ draws them)
THREADS = 2  # torch threads: the target machine has 2 cores
SAMPLENUM = stage4.SAMPLENUM  # defaults under test come from the stage script
N_CELLS = stage4.N_CELLS
EPOCHS = stage4.EPOCHS
BATCH_SIZE = stage4.BATCH_SIZE
ADAPTIVE = stage4.ADAPTIVE  # lung timing predicts with this setting (zheng/finotello report both)
REFERENCE_PROTOCOL = "umi"  # the Zheng 10x and the synthetic references are UMI counts (_2_'s PROTOCOL)
FINOTELLO_TAPE_TPM = True  # finotello: also train TAPE's own way (datatype="TPM": bulk one gene length short)
PART_SWEEP = True  # zheng: also the other SWEEP_SAMPLENUM values (else only the defaults)
SWEEP_SAMPLENUM = [1000, 2000, 4000]  # simulated training bulks tried in the sweep
SWEEP_EPOCHS = [16, 32, 64, 128]  # MAE read after these many epochs of one run
SWEEP_MAX_SAMPLE_EPOCHS = 520_000  # skip sweep points beyond this many samples x epochs (time)
LUNG_EPOCHS = 0  # lung timing: 0 = EPOCHS; fewer gives the per-epoch cost quickly
LUNG_CELLS = 7600  # lung scale (GSE130148 after QC: ~7,600 train cells, 17 clusters, ~16,000 genes)
LUNG_GENES = 16000
LUNG_TYPES = 17
LUNG_VARIANT = ""  # lung: time this VARIANTS fit instead of stage 4's defaults (e.g. "markers:200*4")
REAL_REFERENCES = "pbmc_zheng7,pbmc3k_labelled"  # real: the shared references to train on ("kang_ifnb:ctrl": Kang's
#   6,272 control cells from 8 donors, pbmc3k's labels; cultured 6 h, 10x v1; "a+b" pools references)
METHODS = "today,tape,tape/epic,tape/content,nnls,tape+nnls"  # real: today = stage 4 before this issue; tape = the same fit
#   with stage 4's intervals; tape/content = TAPE read as RNA fractions, divided by each type's mean library size;
#   nnls = NNLS on cell-scaled mean profiles; tape+nnls = the mean of TAPE and that NNLS; tape/epic = stage 4's
#   CELL_CONTENT with EPIC's published mRNA per cell (EPIC_CONTENT below), intervals converted alike
CALIBRATION_SAMPLES = stage4.CALIBRATION_SAMPLES
MEMBERS = stage4.MEMBERS  # real: TAPE fits averaged in the main fits (stage 4's MEMBERS; VARIANTS set their own)
AUGMENT = True  # real: also a fit with platform augmentation (stage 4's PLATFORM_SD, LENGTH_SLOPE_SD below)
AUGMENT_SD = 0.5  # per-(sample, gene) log-normal sd: of the order of the gene-wise log ratios between platforms
AUGMENT_SLOPE_SD = 0.2  # per-sample gene-length slope sd: Finotello vs Zheng shows ~0.35 before the TPM fix
VARIANTS = ""  # real: further TAPE fits, comma-separated "selection*members[@epochs]", selection "all" or
#   "markers:N[:D]" (N markers per type detected in >= D of its cells, units.marker_genes; N=99999: every gene
#   detected in >= D of some type's cells); members > 1 = an ensemble on the same simulated bulks
#   (rows for its first member, the mean, and intervals from the members' spread); "*4b": members after the first
#   train on bulks simulated from a bootstrap of the reference cells; e.g. "markers:200*4,markers:200*4b,all*4@32"
MARKER_MIN_DETECTION = 0.1  # real: markers detected in at least this share of the type's cells
SPREAD_FLOOR = 0.01  # real: intervals from the ensemble's spread scale with (sd over members + this)
EXTERNAL_PYTHON = ""  # real: a Python whose environment has rectanglepy (its pins keep it out of ours; see
# benchmarks/external/rectangle_runner.py): Rectangle on the same reference and bulks, scored as "rectangle"; "" = none
FIG_DIR = str(REPO / "fig" / "readme")  # real: stage 4's scatter (with intervals) per reference x cohort; "" = none
# -----------------------------------------------------------------------------

# Reference labels and flow categories -> five categories every cohort and reference shares (DAISM's
# names). Finotello's Neutrophils and Other, and pbmc3k's Megakaryocytes, have no counterpart and are
# left out; truth and predictions are renormalised over the five. Zheng has no dendritic cells, so its
# monocytic.lineage is its monocytes alone, while Finotello's includes the mDC.
CATEGORIES = ["B.cells", "CD4.T.cells", "CD8.T.cells", "NK.cells", "monocytic.lineage"]
TO_CATEGORY = {
    # pbmc_zheng7
    "B": "B.cells", "CD4TCM": "CD4.T.cells", "CD4TN": "CD4.T.cells", "CD4Treg": "CD4.T.cells",
    "CD8TN": "CD8.T.cells", "NK": "NK.cells", "Monocyte": "monocytic.lineage",
    # pbmc3k_labelled (B and NK as above)
    "CD4 T": "CD4.T.cells", "CD8 T": "CD8.T.cells", "CD14 Mono": "monocytic.lineage",
    "FCGR3A Mono": "monocytic.lineage", "DC": "monocytic.lineage",
    # Finotello flow cytometry
    "B cells": "B.cells", "T cells CD4 conv": "CD4.T.cells", "Tregs": "CD4.T.cells", "T cells CD8": "CD8.T.cells",
    "NK cells": "NK.cells", "Monocytes": "monocytic.lineage", "mDC": "monocytic.lineage",
    # DAISM (already the five)
    **{c: c for c in CATEGORIES},
}

# EPIC's mRNA per cell of circulating immune cells (Racle et al. 2017, GfellerLab/EPIC data mRNA_cell_default:
# Bcells 0.4016, Tcells/CD4/CD8/Treg 0.3952, NKcells 0.4396, Monocytes 1.4196, otherCells 0.4), per category;
# EPIC has no dendritic cells: pbmc3k's DC (monocytic.lineage) take the monocytes' value, and a type outside the
# five (pbmc3k's Megakaryocytes) EPIC's otherCells value. Published external factors, not fitted here.
EPIC_CONTENT = {"B.cells": 0.4016, "CD4.T.cells": 0.3952, "CD8.T.cells": 0.3952, "NK.cells": 0.4396,
                "monocytic.lineage": 1.4196}
EPIC_OTHER = 0.4


def epic_content(cell_types) -> pd.Series:
    """EPIC's mRNA per cell for each reference type, through TO_CATEGORY (a CELL_CONTENT table's values)."""
    return pd.Series([EPIC_CONTENT.get(TO_CATEGORY.get(t), EPIC_OTHER) for t in cell_types], index=list(cell_types))


# Zheng sorted populations -> Finotello flow-cytometry categories (mDC, Neutrophils and Other
# have no counterpart in the reference and are left out; truth is renormalised over the rest).
MAPPING = {
    "CD4TCM": "T cells CD4 conv", "CD4TN": "T cells CD4 conv", "CD4Treg": "Tregs",
    "CD8TN": "T cells CD8", "B": "B cells", "NK": "NK cells", "Monocyte": "Monocytes",
}


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {THREADS}, "
            f"load avg {os.getloadavg()[0]:.1f}")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def timed(name: str, out: dict):
    wall, cpu = time.perf_counter(), cpu_seconds()
    yield
    out[name] = time.perf_counter() - wall
    out[name + "_cpu"] = cpu_seconds() - cpu


def scores(pred: pd.DataFrame, truth: pd.DataFrame) -> dict:
    overall = proportion_metrics(pred, truth).loc["overall"]
    return {"mae": overall["mae"], "rmse": overall["rmse"], "r": overall["pearson_r"], "ccc": overall["ccc"]}


# ----------------------------------------------------------------------------- data
def load_reference(shared: Path, name: str = "pbmc_zheng7"):
    """A shared reference in the 10x layout (pbmc_zheng7, pbmc3k_labelled) -> (cells x genes CSR, genes, labels).

    "folder:condition" keeps the cells of that ``condition`` (e.g. "kang_ifnb:ctrl", Kang's control cells);
    "first+second" pools references on the genes they share (their labels as they are).
    """
    if "+" in name:
        parts = [load_reference(shared, part) for part in name.split("+")]
        common = sorted(set.intersection(*(set(genes) for _, genes, _ in parts)))
        counts = sp.vstack([c[:, pd.Index(g).get_indexer(common)] for c, g, _ in parts]).tocsr()
        return counts, common, np.concatenate([labels for _, _, labels in parts])
    name, _, condition = name.partition(":")
    folder = shared / name
    counts = sp.csr_matrix(scipy.io.mmread(str(folder / "matrix.mtx.gz"))).T.tocsr()  # cells x genes
    genes = io.read_gene_names(folder / "genes.tsv")
    barcodes = io.read_lines(folder / "barcodes.tsv")
    table = pd.read_csv(folder / "celltypes.csv").set_index("barcode").loc[barcodes]
    labels = table["cell_type"].astype(str).to_numpy()
    if condition:
        keep = np.flatnonzero(table["condition"].astype(str).to_numpy() == condition)
        counts, labels = counts[keep], labels[keep]
    return counts, genes, labels


def zheng_setup(cfg):
    shared = Path(cfg.SHARED)
    counts, genes, labels = load_reference(shared)
    lengths = io.read_gene_lengths(shared / "gene_length_hg19.csv.gz")
    train, test = stratified_split(labels, 0.25, seed=cfg.SPLIT_SEED)
    codes, names = io.encode_labels(labels)
    reference = pd.DataFrame(counts[train].toarray().astype(np.float32), index=labels[train], columns=genes)
    sums, truth, _ = sample_pseudobulks(counts[test], codes[test], names, cfg.N_PSEUDOBULKS, cfg.SEED)
    bulk_counts = pd.DataFrame(sums, index=truth.index, columns=genes)
    whole = pd.DataFrame(np.asarray(counts[test].sum(axis=0)), index=["whole_test"], columns=genes)
    whole_truth = pd.DataFrame([np.bincount(codes[test], minlength=len(names)) / len(test)],
                               index=["whole_test"], columns=names)
    bulk_counts = pd.concat([bulk_counts, whole])
    truth = pd.concat([truth, whole_truth])
    profile = tape.reference_profile(reference, cfg.REFERENCE_PROTOCOL, lengths)
    bulk_tpm, report = tape.prepare_bulk(bulk_counts, "counts", genes, lengths, 1000, "zheng pseudo-bulks",
                                         protocol="auto", profile=profile)
    print(f"Zheng pseudo-bulks (UMI sums): gene-length slope vs the reference {report.length_slope:.2f} -> "
          f"BULK_PROTOCOL=auto reads them as {report.protocol}")
    log.info("Zheng: %d train cells, %d test cells, %d genes, %d types", len(train), len(test), len(genes), len(names))
    return reference, lengths, bulk_tpm, truth


def settings_from(cfg, **override) -> tape.TapeSettings:
    values = dict(samplenum=cfg.SAMPLENUM, n_cells=cfg.N_CELLS, epochs=cfg.EPOCHS, batch_size=cfg.BATCH_SIZE,
                  adaptive=cfg.ADAPTIVE, seed=cfg.SEED, reference_protocol=cfg.REFERENCE_PROTOCOL, members=cfg.MEMBERS)
    values.update(override)
    return tape.TapeSettings(**values)


def nnls_mass_corrected(reference: pd.DataFrame, bulk_tpm: pd.DataFrame, lengths: pd.Series,
                        protocol: str) -> pd.DataFrame:
    """NNLS of each bulk on the types' mean per-transcript profiles, one common scale.

    Unlike per-type TPM profiles (which estimate mRNA fractions), keeping each type's mean
    counts per cell makes the weights cell fractions, the quantity TAPE and the truth report.
    """
    from scipy.optimize import nnls

    means = reference.groupby(level=0, sort=True).mean()
    genes = means.columns.intersection(lengths.index).intersection(bulk_tpm.columns)
    profiles = means[genes].to_numpy(np.float64)
    if protocol == "full_length":
        profiles /= lengths.loc[genes].to_numpy()[None, :]
    profiles *= 1e6 / profiles.sum(axis=1).mean()
    rows = []
    for sample in bulk_tpm.index:
        target = bulk_tpm.loc[sample, genes].to_numpy(np.float64)
        target *= 1e6 / target.sum()
        weights, _ = nnls(profiles.T, target)
        rows.append(weights / weights.sum())
    return pd.DataFrame(np.vstack(rows), index=bulk_tpm.index, columns=[str(c) for c in means.index])


# ----------------------------------------------------------------------------- parts
def map_to_flow(pred: pd.DataFrame, shared: list[str]) -> pd.DataFrame:
    mapped = pred.T.groupby(pd.Series(pred.columns.map(MAPPING), index=pred.columns)).sum().T
    mapped = mapped[shared]
    return mapped.div(mapped.sum(axis=1), axis=0)


def part_finotello(cfg, results: dict, cache: dict) -> None:
    shared_dir = Path(cfg.SHARED)
    reference, lengths, _, _ = cache.setdefault("zheng", zheng_setup(cfg))
    counts = pd.read_csv(shared_dir / "bulk_finotello_pbmc" / "bulk_counts.tsv.gz", sep="\t", index_col=0)
    facs = pd.read_csv(shared_dir / "bulk_finotello_pbmc" / "facs_fractions.csv", index_col=0)
    profile = tape.reference_profile(reference, cfg.REFERENCE_PROTOCOL, lengths)
    bulk_tpm, report = tape.prepare_bulk(counts, "counts", reference.columns, lengths, 1000, "finotello bulk",
                                         protocol="auto", profile=profile)
    categories = sorted(set(MAPPING.values()))
    truth = facs[categories].div(facs[categories].sum(axis=1), axis=0)
    settings = settings_from(cfg)
    simulated = cache.get("zheng_simulated")
    times = {}
    with timed("train", times):
        fit = tape.fit_tape(reference, bulk_tpm, lengths, settings, "/tmp/bench_tape", THREADS,
                            simulated=None if simulated is None else simulated.copy())
    ckpt = tape.checkpoint_dict(fit)
    plain = tape.predict_proportions(ckpt, bulk_tpm, lengths, adaptive=False, model=fit.model, n_threads=THREADS)
    with timed("predict_adaptive", times):
        adaptive = tape.predict_proportions(ckpt, bulk_tpm, lengths, adaptive=True, model=fit.model, n_threads=THREADS,
                                            workdir="/tmp/bench_tape")
    nnls_tpm = tape.nnls_proportions(reference, bulk_tpm, lengths, cfg.REFERENCE_PROTOCOL)
    nnls_cells = nnls_mass_corrected(reference, bulk_tpm, lengths, cfg.REFERENCE_PROTOCOL)
    methods = [("TAPE adaptive", adaptive), ("TAPE non-adaptive", plain),
               ("NNLS, per-type TPM profiles", nnls_tpm), ("NNLS, cell-scaled profiles", nnls_cells)]
    if cfg.FINOTELLO_TAPE_TPM and cfg.REFERENCE_PROTOCOL == "umi":
        # TAPE's own datatype="TPM" (and the original): reference and bulk counts both divided by
        # gene length once, i.e. the bulk read as if it were UMI counts (BULK_PROTOCOL=umi).
        bulk_tape, _ = tape.prepare_bulk(counts, "counts", reference.columns, lengths, 1000, "finotello bulk",
                                         protocol="umi")
        with timed("train_tape_tpm", times):
            fit_tpm = tape.fit_tape(reference, bulk_tape, lengths, settings, "/tmp/bench_tape", THREADS,
                                    simulated=None if simulated is None else simulated.copy())
        methods += [
            ("TAPE non-adaptive, TAPE's datatype=TPM", tape.predict_proportions(
                tape.checkpoint_dict(fit_tpm), bulk_tape, lengths, adaptive=False, model=fit_tpm.model)),
            ("NNLS, per-type TPM profiles, length-divided", tape.nnls_proportions(reference, bulk_tpm, lengths,
                                                                                 "full_length")),
        ]
    print(f"\n## (b) Finotello real PBMC bulks ({len(bulk_tpm)} samples, {report.n_shared_reference} genes shared with "
          f"the Zheng reference, {len(fit.genes)} used), flow-cytometry truth over {categories}")
    print("mapping: " + ", ".join(f"{k} -> {v}" for k, v in MAPPING.items()) +
          "; mDC, Neutrophils, Other left out; truth and predictions renormalised over the shared categories")
    print(f"bulk counts: gene-length slope vs the reference {report.length_slope:.2f} -> read as {report.protocol}; "
          f"reference protocol {cfg.REFERENCE_PROTOCOL}")
    reused = " (with the Zheng simulation reused)" if simulated is not None else ""
    print(f"train {times['train']:.0f} s{reused}, adaptive predict {times['predict_adaptive']:.0f} s")
    print("| method | MAE | r | CCC | per-sample r (min..max) |")
    print("|---|---|---|---|---|")
    for name, pred in methods:
        mapped = map_to_flow(pred, categories)
        table = proportion_metrics(mapped, truth)
        o = table.loc["overall"]
        per = table.drop(index="overall")["pearson_r"]
        print(f"| {name} | {o['mae']:.4f} | {o['pearson_r']:.3f} | {o['ccc']:.3f} | {per.min():.2f}..{per.max():.2f} |")
        results[f"finotello/{name}"] = {"mae": o["mae"], "r": o["pearson_r"], "ccc": o["ccc"]}
        if name == "TAPE adaptive":
            cache["finotello_tape"] = mapped
    print("TAPE adaptive, mapped (rows: samples):")
    print(cache["finotello_tape"].round(3).to_string())
    print("flow truth, renormalised:")
    print(truth.round(3).to_string())


def to_categories(frame: pd.DataFrame, renormalise: pd.Series | None = None) -> pd.DataFrame:
    """Columns summed into CATEGORIES (unmapped ones dropped), rows divided by ``renormalise``
    (default: their own sums, so proportions sum to 1 over the five)."""
    keep = [c for c in frame.columns if c in TO_CATEGORY]
    summed = frame[keep].T.groupby(pd.Series([TO_CATEGORY[c] for c in keep], index=keep)).sum().T
    summed = summed.reindex(columns=CATEGORIES, fill_value=0.0)
    return summed.div(summed.sum(axis=1) if renormalise is None else renormalise, axis=0)


def real_cohorts(shared: Path, reference_genes, lengths, profile) -> dict:
    """name -> (bulk TPM, truth over CATEGORIES) for the two real cohorts."""
    fin = shared / "bulk_finotello_pbmc"
    fin_tpm, _ = tape.prepare_bulk(pd.read_csv(fin / "bulk_counts.tsv.gz", sep="\t", index_col=0), "counts",
                                   reference_genes, lengths, 1000, "finotello", protocol="auto", profile=profile)
    daism = shared / "bulk_daism_pbmc"
    dai_tpm, _ = tape.prepare_bulk(pd.read_csv(daism / "bulk_tpm.tsv.gz", sep="\t", index_col=0), "TPM",
                                   reference_genes, lengths, 1000, "daism")
    return {"Finotello": (fin_tpm, to_categories(pd.read_csv(fin / "facs_fractions.csv", index_col=0))),
            "DAISM": (dai_tpm, to_categories(pd.read_csv(daism / "fractions.csv", index_col=0)))}


def mapped_with_bounds(pred: pd.DataFrame, bounds) -> tuple:
    """Point and interval over CATEGORIES: bounds are summed per category (a conservative interval of
    the sum) and divided by the point's own renormalisation."""
    keep = [c for c in pred.columns if c in TO_CATEGORY]
    norm = pred[keep].sum(axis=1)
    point = to_categories(pred, norm)
    if bounds is None:
        return point, None
    return point, tuple(to_categories(b, norm).clip(0, 1) for b in bounds)


def part_real(cfg, results: dict, cache: dict) -> None:
    shared = Path(cfg.SHARED)
    lengths = io.read_gene_lengths(shared / "gene_length_hg19.csv.gz")
    methods = [m for m in cfg.METHODS.split(",") if m]
    print(f"\n## (r) real bulks x shared references; methods {methods}; categories {CATEGORIES}")
    print("mapping: " + "; ".join(f"{k} -> {v}" for k, v in TO_CATEGORY.items() if k != v) +
          ". Left out (no counterpart): Finotello Neutrophils, Other; pbmc3k Megakaryocytes. Truth and "
          "predictions renormalised over the five; intervals = per-category sums of the types' bounds.")
    print("| reference | cohort | method | MAE | pooled r | per-category r (" + ", ".join(c.split(".")[0] for c in CATEGORIES)
          + ") | 90 % coverage |")
    print("|---|---|---|---|---|---|---|")
    for name in cfg.REAL_REFERENCES.split(","):
        counts, genes, labels = load_reference(shared, name)
        if name == "pbmc_zheng7":
            train, test = stratified_split(labels, 0.25, seed=cfg.SPLIT_SEED)
        else:
            train, test = np.arange(len(labels)), None
        reference = pd.DataFrame(counts[train].toarray().astype(np.float32), index=labels[train], columns=genes)
        profile = tape.reference_profile(reference, cfg.REFERENCE_PROTOCOL, lengths)
        cohorts = real_cohorts(shared, genes, lengths, profile)
        if test is not None:
            codes, names = io.encode_labels(labels)
            sums, ptruth, _ = sample_pseudobulks(counts[test], codes[test], names, cfg.N_PSEUDOBULKS, cfg.SEED)
            cohorts["Zheng pseudo-bulks"] = (counts_to_cpm(pd.DataFrame(sums, index=ptruth.index, columns=genes)), ptruth)
        # One fit serves every cohort: TAPE's variance filter over the real bulks' shared genes.
        real = pd.concat([cohorts["Finotello"][0], cohorts["DAISM"][0]], join="inner")
        fits = [("", settings_from(cfg, adaptive=False))]
        if cfg.AUGMENT:
            fits.append(("aug ", settings_from(cfg, adaptive=False, platform_sd=cfg.AUGMENT_SD,
                                               length_slope_sd=cfg.AUGMENT_SLOPE_SD)))
        variants = [v for v in cfg.VARIANTS.split(",") if v]
        if methods or variants:  # METHODS="" VARIANTS="": no TAPE fit (e.g. Rectangle alone)
            times = {}
            with timed("simulate", times):  # every fit of this reference trains on the same simulated bulks
                simulated = tape.simulate_bulks(reference, fits[0][1], "/tmp/bench_tape", THREADS)
                calib = tape.calibration_bulks(reference, fits[0][1], cfg.CALIBRATION_SAMPLES, lengths,
                                               "/tmp/bench_tape", THREADS)
            print(f"| {name}: simulation of the training and calibration bulks {times['simulate']:.0f} s | | | | | | |")
        for prefix, settings in fits if methods else []:  # METHODS="": only the VARIANTS fits
            real_part_rows(cfg, results, name, prefix, settings, reference, lengths, real, cohorts, methods,
                           simulated, calib)
        for variant in variants:
            variant_rows(cfg, results, name, variant, reference, lengths, real, cohorts, simulated, calib)
        if cfg.EXTERNAL_PYTHON:
            external_rows(cfg, results, name, reference, cohorts)


def run_rectangle(python: str, reference: pd.DataFrame, bulks: dict[str, pd.DataFrame], threads: int) -> dict:
    """Rectangle's defaults on ``reference`` (cells x genes counts, labels as index) for each bulk table
    (samples x genes, TPM), run by ``python`` (Rectangle's own environment) through
    ``external/rectangle_runner.py``; returns name -> samples x types (its "Unknown" column included)."""
    runner = Path(__file__).resolve().parent / "external" / "rectangle_runner.py"
    with tempfile.TemporaryDirectory(prefix="bench_rectangle_") as tmp:
        folder = Path(tmp)
        sp.save_npz(folder / "reference.npz", sp.csr_matrix(reference.to_numpy()))
        (folder / "reference_genes.txt").write_text("\n".join(map(str, reference.columns)) + "\n")
        (folder / "reference_labels.txt").write_text("\n".join(map(str, reference.index)) + "\n")
        files = {name: re.sub(r"[^A-Za-z0-9_]+", "_", name) for name in bulks}
        for name, table in bulks.items():
            table.to_csv(folder / f"bulk_{files[name]}.csv")
        done = subprocess.run([python, str(runner), str(folder), str(threads)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{runner.name} under {python} failed (exit {done.returncode}):\n"
                               f"{done.stderr[-3000:]}\nSet up its environment as the runner's docstring says, "
                               "or leave EXTERNAL_PYTHON empty.")
        return {name: pd.read_csv(folder / f"rectangle_{stem}.csv", index_col=0) for name, stem in files.items()}


def external_rows(cfg, results, name, reference, cohorts) -> None:
    """Rectangle (rectanglepy, its defaults) on the same reference and bulks as TAPE, scored the same way."""
    times = {}
    with timed("rectangle", times):
        estimates = run_rectangle(cfg.EXTERNAL_PYTHON, reference, {c: bulk for c, (bulk, _) in cohorts.items()},
                                  THREADS)
    print(f"| {name}: Rectangle (rectanglepy's defaults, under {cfg.EXTERNAL_PYTHON}) {times['rectangle']:.0f} s "
          "| | | | | | |", flush=True)
    for cohort, (_, truth) in cohorts.items():
        point = estimates[cohort]
        if cohort == "Zheng pseudo-bulks":  # the reference's own types, renormalised without "Unknown"
            point = point[[c for c in point.columns if c in truth.columns]]
            point = point.div(point.sum(axis=1), axis=0)
        score_row(cfg, results, name, cohort, "rectangle", point, None, truth)


def parse_variant(cfg, variant: str) -> tape.TapeSettings:
    """ "selection*members[@epochs]" (VARIANTS) -> the fit's settings."""
    head, _, epochs = variant.partition("@")
    selection, _, members = head.partition("*")
    kind, _, per_type = selection.partition(":")
    per_type, _, detection = per_type.partition(":")
    bootstrap = members.endswith("b")
    return settings_from(cfg, adaptive=False, gene_selection=kind, markers_per_type=int(per_type or 200),
                         marker_min_detection=float(detection or cfg.MARKER_MIN_DETECTION), members=int(members.rstrip("b") or 1),
                         member_data="bootstrap" if bootstrap else "shared", epochs=int(epochs or cfg.EPOCHS))


def score_row(cfg, results, name, cohort, method, point, bounds, truth) -> None:
    """One table row: MAE, pooled r, per-category r, coverage (real cohorts mapped onto CATEGORIES)."""
    if cohort == "Zheng pseudo-bulks":
        shown, shown_bounds, t = point, bounds, truth[point.columns]
    else:
        (shown, shown_bounds), t = mapped_with_bounds(point, bounds), truth
    table = proportion_metrics(shown, t.loc[shown.index])
    o = table.loc["overall"]
    per = [pearson_r(shown[c].to_numpy(), t.loc[shown.index, c].to_numpy()) for c in CATEGORIES] \
        if cohort != "Zheng pseudo-bulks" else []
    cov = tape.coverage(*shown_bounds, t) if shown_bounds is not None else float("nan")
    print(f"| {name} | {cohort} | {method} | {o['mae']:.4f} | {o['pearson_r']:.3f} | "
          f"{', '.join(f'{r:.2f}' for r in per)} | {cov:.2f} |", flush=True)
    results[f"real/{name}/{cohort}/{method}"] = {"mae": o["mae"], "r": o["pearson_r"], "coverage": cov}


def variant_rows(cfg, results, name, variant, reference, lengths, real, cohorts, simulated, calib) -> None:
    """A VARIANTS fit: its first member and the members' mean, with conformal intervals around the mean
    and, for an ensemble, normalised-conformal intervals scaled by the members' spread."""
    settings = parse_variant(cfg, variant)
    times = {}
    with timed("fit", times):
        fit = tape.fit_tape(reference, real.div(real.sum(axis=1), axis=0) * 1e6, lengths, settings,
                            "/tmp/bench_tape", THREADS, simulated=simulated.copy())
    ckpt = tape.checkpoint_dict(fit)
    with timed("calibrate", times):
        calib_members = tape.predict_members(ckpt, calib[0], lengths, adaptive=False, model=fit.members,
                                             n_threads=THREADS)
    calib_mean = sum(calib_members[1:], calib_members[0]) / len(calib_members)
    calib_truth = calib[1][calib_mean.columns]
    halfwidth = tape.conformal_halfwidth(calib_mean, calib_truth)
    first_halfwidth = tape.conformal_halfwidth(calib_members[0], calib_truth)
    ensemble = len(fit.members) > 1
    if ensemble:
        calib_scale = tape.ensemble_scale(calib_members, cfg.SPREAD_FLOOR)
        multiplier = tape.conformal_halfwidth(calib_mean, calib_truth, scale=calib_scale)
    print(f"| {name}: {variant}: {len(fit.genes)} genes, {len(fit.members)} member(s) x {settings.epochs} epochs; "
          f"train {times['fit']:.0f} s, calibration predictions {times['calibrate']:.1f} s | | | | | | |")
    for cohort, (bulk, truth) in cohorts.items():
        members = tape.predict_members(ckpt, bulk, lengths, adaptive=False, model=fit.members, n_threads=THREADS)
        mean = sum(members[1:], members[0]) / len(members)
        if ensemble:
            score_row(cfg, results, name, cohort, f"{variant} first member", members[0],
                      tape.intervals(members[0], first_halfwidth), truth)
        score_row(cfg, results, name, cohort, f"{variant}{' mean' if ensemble else ''}", mean,
                  tape.intervals(mean, halfwidth), truth)
        if ensemble:  # each member alone: seeds seed .. seed + members - 1 of the single fit
            each = []
            for member in members:
                shown, t = (member, truth[member.columns]) if cohort == "Zheng pseudo-bulks" else \
                    (to_categories(member), truth)
                o = proportion_metrics(shown, t.loc[shown.index]).loc["overall"]
                each.append(f"{o['mae']:.4f} / {o['pearson_r']:.2f}")
            print(f"| {name} | {cohort} | {variant}, each member alone (MAE / r) | {'; '.join(each)} | | | |")
            scale = tape.ensemble_scale(members, cfg.SPREAD_FLOOR)
            score_row(cfg, results, name, cohort, f"{variant} mean, spread intervals", mean,
                      tape.intervals(mean, multiplier, scale), truth)


def real_part_rows(cfg, results, name, prefix, settings, reference, lengths, real, cohorts, methods,
                   simulated, calib) -> None:
    """One TAPE fit (with its intervals) on ``reference``, scored on every cohort by every method."""
    times = {}
    with timed("fit", times):
        fit = tape.fit_tape(reference, real.div(real.sum(axis=1), axis=0) * 1e6, lengths, settings,
                            "/tmp/bench_tape", THREADS, simulated=simulated.copy())
    with timed("calibrate", times):
        calib_pred = tape.predict_proportions(tape.checkpoint_dict(fit), calib[0], lengths, adaptive=False,
                                              model=fit.members, n_threads=THREADS)
        fit.halfwidth = tape.conformal_halfwidth(calib_pred, calib[1][calib_pred.columns])
    ckpt = tape.checkpoint_dict(fit)
    print(f"| {name}: {reference.shape[0]} cells, {len(fit.genes)} genes; {prefix}fit {times['fit']:.0f} s, "
          f"intervals {times['calibrate']:.0f} s | | | | | | |")
    calib_x = tape.model_inputs(ckpt, calib[0], lengths)
    calib_truth = calib[1][list(fit.cell_types)].reset_index(drop=True)
    forward = tape.reconstruction(fit.members, THREADS)
    for cohort, (bulk, truth) in cohorts.items():
        pred = tape.predict_proportions(ckpt, bulk, lengths, adaptive=False, model=fit.members, n_threads=THREADS)
        # stage 4's intervals: the calibration's half-width, widened per sample for a bulk that departs from the
        # simulated bulks (intervals.departure_halfwidth); the plain ones are scored beside them
        widths, info = tape.departure_halfwidth(forward, calib_x, calib_truth, tape.model_inputs(ckpt, bulk, lengths),
                                                fit.halfwidth, index=pred.index)
        bounds = tape.intervals(pred, pd.Series(1.0, index=pred.columns), widths[pred.columns])
        plain = tape.intervals(pred, fit.halfwidth)
        shown_plain, t_plain = ((plain, truth[pred.columns]) if cohort == "Zheng pseudo-bulks" else
                                (mapped_with_bounds(pred, plain)[1], truth))
        print(f"| {name} | {cohort} | {prefix}tape, intervals from the simulated bulks alone: coverage "
              f"{tape.coverage(*shown_plain, t_plain):.2f}; reconstruction residual rms {np.median(info['rms']):.4f} "
              f"(simulated {info['rms_simulated']:.4f}), {int((info['excess'] > 0).sum())} of {len(pred)} samples "
              f"widened; {int((info['score'] > info['score_simulated_max']).sum())} depart beyond every simulated "
              f"bulk in their most departing genes (score median {np.median(info['score']):.1f}, simulated highest "
              f"{info['score_simulated_max']:.1f}) | | | |", flush=True)
        nnls = nnls_mass_corrected(reference, bulk, lengths, cfg.REFERENCE_PROTOCOL)[pred.columns]
        # TAPE's output read as RNA fractions -> cells: divided by each type's mean library size
        content = fit.library.reindex(pred.columns)
        per_cell = pred / content
        scale = per_cell.sum(axis=1)
        epic = tape.to_cell_content(pred, tape.content_weights(fit.library, epic_content(pred.columns),
                                                               list(pred.columns)), bounds)
        candidates = {"tape/epic": epic, "today": (pred, None), "tape": (pred, bounds),
                      "tape/content": (per_cell.div(scale, axis=0), tuple((b / content).div(scale, axis=0)
                                                                         for b in bounds)),
                      "nnls": (nnls, None),
                      "tape+nnls": ((pred + nnls) / 2, tuple((b + nnls) / 2 for b in bounds))}
        for method in methods:
            if prefix and method in ("today", "nnls"):
                continue  # neither depends on the augmentation
            point, bnds = candidates[method]
            method = prefix + method
            score_row(cfg, results, name, cohort, method, point, bnds, truth)
            if cfg.FIG_DIR and method in ("tape", "tape/epic") and not prefix:
                if cohort == "Zheng pseudo-bulks":
                    shown, shown_bounds, t = point, bnds, truth[point.columns]
                else:
                    (shown, shown_bounds), t = mapped_with_bounds(point, bnds), truth
                o = proportion_metrics(shown, t.loc[shown.index]).loc["overall"]
                suffix = "_epic" if method == "tape/epic" else ""
                stem = re.sub(r"[^A-Za-z0-9_]+", "_", name)  # "a+b:c" -> a_b_c
                figure = Path(cfg.FIG_DIR) / f"proportions_scatter_{stem}_{cohort.split()[0].lower()}{suffix}.png"
                figure.parent.mkdir(parents=True, exist_ok=True)
                stage4.scatter_figure(shown, t.loc[shown.index, shown.columns], o["mae"], figure, shown_bounds)


def stage4_paths():
    """Scratch paths for stage 4's helpers (only checkpoints_dir is used: TAPE's sandbox)."""
    from models.paths import Paths
    return Paths("/tmp/bench_tape/data", "/tmp/bench_tape/fig")


def lung_like(cfg):
    """Synthetic NB counts at lung scale: 17 types of unequal size, ~90% zeros, long-tailed genes."""
    rng = np.random.default_rng(cfg.SEED)
    n_cells = int(round(cfg.LUNG_CELLS / 0.75))  # the 75% training split is the reference
    sizes = rng.dirichlet(np.full(cfg.LUNG_TYPES, 2.0)) * n_cells
    sizes = np.maximum(np.round(sizes).astype(int), 30)
    labels = np.repeat(np.arange(cfg.LUNG_TYPES), sizes)[:n_cells]
    base = rng.lognormal(-2.3, 1.6, cfg.LUNG_GENES)
    effects = rng.lognormal(0.0, 0.8, (cfg.LUNG_TYPES, cfg.LUNG_GENES))
    library = rng.lognormal(0.0, 0.4, len(labels)).astype(np.float32)
    counts = np.empty((len(labels), cfg.LUNG_GENES), dtype=np.float32)
    for k in range(cfg.LUNG_TYPES):
        rows = np.flatnonzero(labels == k)
        mu = (base * effects[k])[None, :] * library[rows, None]
        counts[rows] = rng.poisson(rng.gamma(2.0, mu / 2.0))
    genes = [f"G{i}" for i in range(cfg.LUNG_GENES)]
    names = np.array([f"type{k:02d}" for k in range(cfg.LUNG_TYPES)])[labels]
    lengths = pd.Series(rng.integers(500, 50_000, cfg.LUNG_GENES).astype(np.float64), index=genes)
    return counts, genes, names, lengths


def part_lung(cfg, results: dict, cache: dict) -> None:
    counts, genes, names, lengths = lung_like(cfg)
    log.info("lung-like: %d cells x %d genes, %.1f%% zeros", *counts.shape, 100 * (counts == 0).mean())
    train, test = stratified_split(names, 0.25, seed=cfg.SPLIT_SEED)
    codes, order = io.encode_labels(names)
    reference = pd.DataFrame(counts[train], index=names[train], columns=genes)
    sums, truth, _ = sample_pseudobulks(sp.csr_matrix(counts[test]), codes[test], order, 5, cfg.SEED)
    bulk_tpm, _ = counts_to_expression(pd.DataFrame(sums, index=truth.index, columns=genes), lengths,
                                       cfg.REFERENCE_PROTOCOL)
    del counts
    settings = settings_from(cfg, epochs=cfg.LUNG_EPOCHS or cfg.EPOCHS)
    if cfg.LUNG_VARIANT:
        settings = parse_variant(cfg, cfg.LUNG_VARIANT)
        settings.adaptive = cfg.ADAPTIVE
    times = {}
    rss_before = peak_rss_mb()
    with timed("simulate", times):
        simulated = tape.simulate_bulks(reference, settings, "/tmp/bench_tape", THREADS)
    with timed("train", times):
        fit = tape.fit_tape(reference, bulk_tpm, lengths, settings, "/tmp/bench_tape", THREADS, simulated=simulated)
    with timed("intervals", times):  # stage 4's calibration of the 90 % intervals
        fit.halfwidth = stage4.calibrate_intervals(fit, reference, lengths, cfg, stage4_paths(), THREADS)
    ckpt = tape.checkpoint_dict(fit)
    with timed("predict", times):
        pred = tape.predict_proportions(ckpt, bulk_tpm, lengths, adaptive=cfg.ADAPTIVE, model=fit.members,
                                        n_threads=THREADS, workdir="/tmp/bench_tape")
    s = scores(pred, truth)
    print(f"\n## (c) lung scale, synthetic: reference {reference.shape[0]} cells x {reference.shape[1]} genes, "
          f"{cfg.LUNG_TYPES} types; {len(fit.genes)} genes used; settings {settings}")
    print(f"simulate {times['simulate']:.0f} s (cpu {times['simulate_cpu']:.0f}), train {times['train']:.0f} s "
          f"(cpu {times['train_cpu']:.0f}), intervals ({cfg.CALIBRATION_SAMPLES} simulated bulks) "
          f"{times['intervals']:.0f} s, predict 5 bulks (adaptive={cfg.ADAPTIVE}) {times['predict']:.0f} s; "
          f"peak RSS {peak_rss_mb():.0f} MB (before this part {rss_before:.0f} MB); "
          f"synthetic pseudo-bulk MAE {s['mae']:.4f} (easy synthetic types, not a lung accuracy figure)")
    total = sum(times[k] for k in ("simulate", "train", "intervals", "predict"))
    print(f"stage 4's TAPE work in all: {total:.0f} s ({total / 60:.1f} min; reading the reference table not "
          f"included), {len(fit.members)} member(s)")
    results["lung"] = {**times, "peak_rss_mb": peak_rss_mb(), **s}


def part_zheng(cfg, results: dict, cache: dict) -> None:
    """Accuracy against training time on the Zheng split; the default settings' row gets baselines.

    For each SAMPLENUM one simulation and one training run (TAPE's ``train_model`` unrolled:
    same loader, model, Adam and seed, so the row at EPOCHS equals ``fit_tape``), scored without
    the adaptive stage after each of SWEEP_EPOCHS and with it after the last.
    """
    import torch
    from torch.utils.data import DataLoader

    TAPE = tape.import_tape()
    reference, lengths, bulk_tpm, truth = cache.setdefault("zheng", zheng_setup(cfg))
    pseudo = [s for s in truth.index if s != "whole_test"]
    sweep = sorted(set(cfg.SWEEP_SAMPLENUM) | {cfg.SAMPLENUM}) if cfg.PART_SWEEP else [cfg.SAMPLENUM]
    print(f"\n## (a) Zheng PBMC: {reference.shape[0]} train cells (7 sorted types), {len(pseudo)} pseudo-bulks of "
          f"the 25% test split + 1 of the whole test split; batch {cfg.BATCH_SIZE}, n_cells {cfg.N_CELLS}, "
          f"{THREADS} threads. MAE/CCC over the {len(pseudo)} pseudo-bulks after E epochs of one run")
    print("| samplenum | epochs | simulate s | train s, cumulative (cpu s) | samples x epochs | MAE non-adaptive | "
          "MAE adaptive | CCC adaptive | adaptive s |")
    print("|---|---|---|---|---|---|---|---|---|")
    default = None
    for samplenum in sweep:
        settings = settings_from(cfg, samplenum=samplenum)
        t0 = time.perf_counter()
        simulated = tape.simulate_bulks(reference, settings, "/tmp/bench_tape", THREADS)
        sim_s = time.perf_counter() - t0
        train_tpm = tape.model_scale(tape.simulated_tpm(simulated, lengths, settings.reference_protocol), lengths)
        genes = tape.select_genes(train_tpm, tape.model_scale(bulk_tpm, lengths), settings.variance_threshold)
        x, y = tape.scale_samples(train_tpm, genes), simulated.obs.to_numpy(np.float64)
        ckpt = {"genes": genes, "cell_types": [str(c) for c in simulated.obs.columns]}
        if samplenum == cfg.SAMPLENUM:
            cache["zheng_simulated"] = simulated
        del train_tpm, simulated
        set_torch_threads(THREADS)
        TAPE.train.reproducibility(settings.seed)
        loader = DataLoader(TAPE.model.simdatset(x, y), batch_size=settings.batch_size, shuffle=True)
        model = TAPE.model.AutoEncoder(x.shape[1], y.shape[1])
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        epochs_list = sorted(set(e for e in cfg.SWEEP_EPOCHS if samplenum * e <= cfg.SWEEP_MAX_SAMPLE_EPOCHS)
                             | ({cfg.EPOCHS} if samplenum == cfg.SAMPLENUM else set()))
        done, train_s, train_cpu = 0, 0.0, 0.0
        for epochs in epochs_list:
            t0, c0 = time.perf_counter(), cpu_seconds()
            with contextlib.redirect_stderr(_io.StringIO()):
                TAPE.train.training_stage(model, loader, optimizer, epochs=epochs - done)
            train_s += time.perf_counter() - t0
            train_cpu += cpu_seconds() - c0
            done = epochs
            plain = tape.predict_proportions(ckpt, bulk_tpm, lengths, adaptive=False, model=model)
            sp_ = scores(plain, truth.loc[pseudo])
            row = (f"| {samplenum} | {epochs} | {sim_s:.0f} | {train_s:.0f} ({train_cpu:.0f}) | {samplenum * epochs:,} | "
                   f"{sp_['mae']:.4f} |")
            result = {"train_s": train_s, "mae_plain": sp_["mae"]}
            if epochs == epochs_list[-1] or (samplenum == cfg.SAMPLENUM and epochs == cfg.EPOCHS):
                t0 = time.perf_counter()
                adapt = tape.predict_proportions(ckpt, bulk_tpm, lengths, adaptive=True, model=model, n_threads=THREADS,
                                                 workdir="/tmp/bench_tape")
                adapt_s = time.perf_counter() - t0
                sa = scores(adapt, truth.loc[pseudo])
                row += f" {sa['mae']:.4f} | {sa['ccc']:.3f} | {adapt_s:.0f} |"
                result.update(mae_adaptive=sa["mae"], ccc_adaptive=sa["ccc"], adaptive_s=adapt_s)
                if samplenum == cfg.SAMPLENUM and epochs == cfg.EPOCHS:
                    default = (plain, adapt, train_s, sim_s, len(genes))
            else:
                row += " | | |"
            print(row, flush=True)
            model.train()
            model.state = "train"
            results[f"sweep/{samplenum}/{epochs}"] = result
        del model, optimizer, loader, x
    plain, adapt, train_s, sim_s, n_genes = default
    nnls_tpm = tape.nnls_proportions(reference, bulk_tpm, lengths, cfg.REFERENCE_PROTOCOL)
    nnls_cells = nnls_mass_corrected(reference, bulk_tpm, lengths, cfg.REFERENCE_PROTOCOL)
    print(f"\ndefault settings SAMPLENUM={cfg.SAMPLENUM} EPOCHS={cfg.EPOCHS} on Zheng ({n_genes} genes): "
          f"simulate {sim_s:.0f} s, train {train_s:.0f} s")
    print("| method | MAE (pseudo-bulks) | RMSE | r | CCC | MAE, 1 pseudo-bulk of the whole test split |")
    print("|---|---|---|---|---|---|")
    for name, pred in [("TAPE adaptive", adapt), ("TAPE non-adaptive", plain),
                       ("NNLS, per-type TPM profiles", nnls_tpm), ("NNLS, cell-scaled profiles", nnls_cells)]:
        s = scores(pred, truth.loc[pseudo])
        w = scores(pred, truth.loc[["whole_test"]])
        print(f"| {name} | {s['mae']:.4f} | {s['rmse']:.4f} | {s['r']:.3f} | {s['ccc']:.3f} | {w['mae']:.4f} |")
        results[f"zheng/{name}"] = s


def main(argv=None) -> dict:
    global THREADS
    cfg = load_config(globals(), argv)
    setup_logging(logging.WARNING)
    THREADS = cfg.THREADS
    set_seed(cfg.SEED)
    set_torch_threads(THREADS)
    bound_heap_fragmentation()
    print(f"# bench_deconvolution  command: {' '.join([sys.executable, *sys.argv])}")
    print(f"machine: {machine()}; defaults under test: SAMPLENUM={cfg.SAMPLENUM} N_CELLS={cfg.N_CELLS} "
          f"EPOCHS={cfg.EPOCHS} BATCH_SIZE={cfg.BATCH_SIZE} REFERENCE_PROTOCOL={cfg.REFERENCE_PROTOCOL}")
    parts = {"zheng": part_zheng, "finotello": part_finotello, "real": part_real, "lung": part_lung}
    chosen = ["zheng", "finotello", "lung"] if cfg.PART == "all" else cfg.PART.split(",")
    results, cache = {}, {}
    for name in chosen:
        start = time.perf_counter()
        parts[name](cfg, results, cache)
        print(f"[{name}: {time.perf_counter() - start:.0f} s wall, peak RSS {peak_rss_mb():.0f} MB, "
              f"load avg {os.getloadavg()[0]:.1f}]", flush=True)
    return results


if __name__ == "__main__":
    main()
