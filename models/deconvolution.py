"""scTAPE (PyPI ``scTAPE`` 1.1.2, import ``TAPE``) behind one wall: bulk checks, training, prediction.

TAPE's ``Deconvolution(simulated, bulk, datatype="TPM", mode="overall", ...)`` is, in order:
``ProcessInputData`` (counts->TPM of the *simulated* data only, a variance filter on both
tables, gene intersection, log(x+1), per-sample min-max), ``reproducibility(seed)``,
``train_model`` and ``predict``. This module calls TAPE's own ``generate_simulated_data``,
``reproducibility``, ``train_model``, ``AutoEncoder`` and ``adaptive_stage`` in that order and
re-implements only the preprocessing, so that a saved checkpoint can predict new bulks.
``tests/test_deconvolution.py`` checks the result equals ``TAPE.Deconvolution`` on the same data.

TAPE's sharp edges, each walled off here:

- importing ``TAPE.model`` runs ``warnings.filterwarnings("ignore")`` process-wide
  -> imported inside ``warnings.catch_warnings()`` (:func:`import_tape`);
- it mutates the frames it is given -> it only ever gets copies;
- ``generate_simulated_data`` fails on an in-memory AnnData -> it gets a DataFrame;
- ``Deconvolution`` hard-codes ``samplenum=5000`` for a DataFrame reference, pickles the whole
  module (``torch.save(model)``) and, with ``adaptive=True`` and no ``save_model_name``, writes
  ``model.pth`` into the cwd and reloads it with a ``torch.load`` that fails on torch >= 2.6
  -> we never call ``Deconvolution``/``predict``; the model stays in memory and is saved as a
  plain ``state_dict`` (:func:`checkpoint_dict`, loaded with ``weights_only=True``);
- it writes files into the cwd -> it runs in a scratch folder inside the output folder
  (:func:`tape_sandbox`), which is removed afterwards;
- it calls ``sns.set()`` and opens figures it never closes -> ``matplotlib.rc_context`` and
  closing every figure it opened;
- its ``print`` calls -> logged at DEBUG;
- torch threads -> set explicitly for the call and restored;
- ``datatype="TPM"`` converts only the simulated data -> :func:`prepare_bulk` makes the bulk TPM;
- ``datatype="TPM"`` divides the simulated *UMI* counts by gene length, which UMI counts do not
  carry (one count = one molecule), while a real bulk's TPM has its read-length bias removed: the
  two disagree by the gene length on every gene. Fixed in two steps. (1) Every table is first
  brought to transcripts per million as its protocol requires: UMI counts (the reference's
  simulated bulks with ``reference_protocol="umi"``, pseudo-bulks of UMI cells) -> CPM;
  full-length read counts -> TPM with gene lengths (:func:`prepare_bulk` tells bulk counts of
  the two kinds apart from the data). (2) All of them then get the *same* TAPE input scale,
  :func:`model_scale` (TPM / gene length, renormalised: exactly what datatype="TPM" makes of UMI
  counts), so a UMI reference with UMI pseudo-bulks is TAPE's own computation, and a real bulk
  now gets the same per-gene scaling as the reference instead of one length less;
- its variance filter over bulk samples is NaN for a single bulk sample and drops every gene
  -> with one bulk sample that filter is skipped (documented deviation);
- it reseeds numpy/torch's global generators (every adaptive step) -> states restored;
- glibc heap fragmentation makes RSS climb ~0.2 GB/epoch -> ``bound_heap_fragmentation()``.
"""
from __future__ import annotations

import contextlib
import copy
import io as _io
import logging
import os
import random
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from models.bulk import PROTOCOLS, counts_to_cpm, counts_to_expression, counts_to_tpm, length_bias_slope
from models.utils import InputError, bound_heap_fragmentation, set_torch_threads

log = logging.getLogger(__name__)

TAPE_VERSION = "1.1.2"
# TAPE's predict() runs adaptive_stage(step=300, max_iter=3) in mode="overall"; kept verbatim.
ADAPTIVE_STEP = 300
ADAPTIVE_MAX_ITER = 3
UNITS = ("counts", "TPM")
MODEL_SCALE = "TPM / gene length, renormalised"  # model_scale(); checkpoints without it predate it
BULK_PROTOCOLS = ("auto", *PROTOCOLS)
# Bulk counts whose log ratio to the reference rises with log gene length by at least this much
# are read counts from full-length RNA-seq (0.29..0.42 on the Finotello bulks vs the Zheng 10x
# reference); at or near 0 they are UMI counts like the reference's (|slope| <= 0.10 on Zheng
# pseudo-bulks). See models.bulk.length_bias_slope.
LENGTH_SLOPE_CUTOFF = 0.15


# ============================================================================= TAPE import
def import_tape():
    """Import TAPE without letting it silence every warning in the process."""
    with warnings.catch_warnings():  # restores warnings.filters on exit
        import TAPE  # noqa: F401
        import TAPE.model
        import TAPE.simulation
        import TAPE.train
    return TAPE


class _LogWriter(_io.TextIOBase):
    """A file-like object sending TAPE's ``print`` lines to our logger at DEBUG."""

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                log.debug("TAPE: %s", line.strip())
        return len(text)


@contextlib.contextmanager
def tape_sandbox(workdir: str | Path, n_threads: int | None = None):
    """Run TAPE code inside a scratch folder under ``workdir`` with every global restored.

    Restores: cwd, warnings filters, matplotlib rcParams (``sns.set()``), open figures
    (closes the new ones), torch thread count, the random/numpy/torch global RNG states.
    TAPE's prints go to DEBUG logging.
    """
    import matplotlib
    import matplotlib.pyplot as plt
    import torch

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    figures_before = set(plt.get_fignums())
    threads_before = torch.get_num_threads()
    # TAPE reseeds the global generators (np.random.seed in the simulation, reproducibility(0)
    # at every adaptive step); the caller's random streams continue as if it had not run.
    rng_states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    if n_threads is not None:
        set_torch_threads(n_threads)
    try:
        with tempfile.TemporaryDirectory(prefix=".tape_", dir=workdir) as scratch, \
                contextlib.chdir(scratch), warnings.catch_warnings(), matplotlib.rc_context(), \
                contextlib.redirect_stdout(_LogWriter()):
            # plt.show() on a non-interactive backend only warns; TAPE calls it after each plot.
            warnings.filterwarnings("ignore", message=".*non-interactive.*", category=UserWarning)
            # anndata notes TAPE's integer obs index being turned into strings; harmless.
            warnings.filterwarnings("ignore", message="Transforming to str index")
            yield Path(scratch)
            stray = sorted(os.listdir(scratch))
            if stray:
                log.debug("TAPE left %s in its scratch folder (removed)", stray)
    finally:
        for number in set(plt.get_fignums()) - figures_before:
            plt.close(number)
        torch.set_num_threads(threads_before)
        random.setstate(rng_states[0])
        np.random.set_state(rng_states[1])
        torch.set_rng_state(rng_states[2])


# ============================================================================= bulk input
def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV/TSV (optionally .gz) whose first column is the row index; separator sniffed."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"missing bulk table {path}: give an existing file in BULK")
    opener = __import__("gzip").open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        header = handle.readline()
    sep = "\t" if header.count("\t") >= header.count(",") else ","
    try:
        return pd.read_csv(path, sep=sep, index_col=0)
    except (ValueError, pd.errors.ParserError) as err:
        raise InputError(f"{path}: cannot read as a {'tab' if sep == chr(9) else 'comma'}-separated table ({err})") from None


@dataclass
class BulkReport:
    """What :func:`prepare_bulk` decided, for the log and the tests."""

    source: str
    orientation: str  # "samples x genes" or "genes x samples (transposed)"
    n_samples: int
    n_genes: int
    n_shared_reference: int
    n_shared_lengths: int | None
    n_duplicated: int
    unit: str
    protocol: str | None = None  # how counts were converted ("umi" / "full_length"); None for TPM
    length_slope: float | None = None  # median over samples of models.bulk.length_bias_slope

    def __str__(self) -> str:
        lengths = "" if self.n_shared_lengths is None else \
            f", {self.n_shared_lengths:,} with a gene length"
        return (f"{self.source}: read as {self.orientation}: {self.n_samples} samples x "
                f"{self.n_genes:,} genes ({self.unit}); {self.n_shared_reference:,} genes shared with "
                f"the reference{lengths}")


def reference_profile(reference: pd.DataFrame, protocol: str, gene_lengths: pd.Series | None) -> pd.Series:
    """The reference's mean expression per gene in transcripts per million (its protocol's way).

    reference: cells x genes counts. The pooled mean over cells, then CPM ("umi") or TPM
    ("full_length"); what bulk counts are compared with to tell their protocol.
    """
    mean = reference.mean(axis=0).to_frame().T
    expression, _ = counts_to_expression(mean, gene_lengths, protocol)
    return expression.iloc[0]


def decide_protocol(counts: pd.DataFrame, requested: str, profile: pd.Series | None,
                    gene_lengths: pd.Series | None, source: str) -> tuple[str, float | None]:
    """Which protocol bulk ``counts`` come from: ``requested``, or with "auto" from the data.

    "auto" measures how the bulk's ratio to the reference grows with gene length
    (:func:`models.bulk.length_bias_slope`, median over samples): at least
    LENGTH_SLOPE_CUTOFF -> "full_length" (reads; TPM divides by length), else "umi" (CPM).
    Without a profile or gene lengths the slope is unknown and "auto" means "full_length".
    """
    if requested not in BULK_PROTOCOLS:
        raise InputError(f"BULK_PROTOCOL must be one of {BULK_PROTOCOLS}, got {requested!r}")
    slope = None
    if profile is not None and gene_lengths is not None:
        slopes = length_bias_slope(counts, profile, gene_lengths)
        if np.isfinite(slopes).any():
            slope = float(np.nanmedian(slopes))
    if requested == "auto":
        if slope is None:
            log.warning("%s: cannot measure the gene-length bias against the reference (no profile or "
                        "too few shared genes); reading the counts as full-length RNA-seq reads (TPM with "
                        "gene lengths). Pass --BULK_PROTOCOL=umi for a pseudo-bulk of UMI counts", source)
            return "full_length", None
        chosen = "full_length" if slope >= LENGTH_SLOPE_CUTOFF else "umi"
        what = ("full-length RNA-seq reads: counts / gene length -> TPM" if chosen == "full_length"
                else "UMI counts like the reference's (e.g. a pseudo-bulk of single cells): CPM, no length")
        log.info("%s: log(bulk / reference) rises with log(gene length) at slope %.2f (cutoff %.2f) -> "
                 "%s (override with --BULK_PROTOCOL=umi|full_length)", source, slope, LENGTH_SLOPE_CUTOFF, what)
        return chosen, slope
    if slope is not None and (slope >= LENGTH_SLOPE_CUTOFF) != (requested == "full_length"):
        log.warning("%s: BULK_PROTOCOL=%s, but the gene-length slope against the reference is %.2f, which "
                    "looks like %s counts (cutoff %.2f)", source, requested, slope,
                    "full-length" if slope >= LENGTH_SLOPE_CUTOFF else "UMI", LENGTH_SLOPE_CUTOFF)
    return requested, slope


def orient_bulk(table: pd.DataFrame, reference_genes, source: str) -> tuple[pd.DataFrame, str]:
    """samples x genes, deciding the orientation by which axis overlaps the reference genes more."""
    genes = pd.Index(reference_genes).astype(str)
    by_columns = len(pd.Index(table.columns.astype(str)).intersection(genes))
    by_rows = len(pd.Index(table.index.astype(str)).intersection(genes))
    if by_rows > by_columns:
        table, orientation = table.T, "genes x samples (transposed)"
    else:
        orientation = "samples x genes"
    table = table.copy()
    table.index = table.index.astype(str)
    table.columns = table.columns.astype(str)
    log.info("%s: %s reference genes in the columns, %s in the rows -> %s",
             source, by_columns, by_rows, orientation)
    return table, orientation


def check_bulk_values(bulk: pd.DataFrame, source: str) -> pd.DataFrame:
    """Numeric, finite, non-negative; duplicated sample names are an error.

    Duplicated gene names are summed with a warning: both counts and TPM are additive over
    features (several IDs mapped to one symbol), and a TPM row keeps its 1e6 total.
    """
    non_numeric = [c for c, dtype in zip(bulk.columns, bulk.dtypes) if not pd.api.types.is_numeric_dtype(dtype)]
    if non_numeric:
        raise InputError(f"{source}: non-numeric values in {non_numeric[:3]} (after orientation); "
                         "the bulk must be a numeric samples x genes or genes x samples table")
    values = bulk.to_numpy(dtype=np.float64)
    if np.isnan(values).any() or np.isinf(values).any():
        bad = bulk.columns[~np.isfinite(values).all(axis=0)][:3].tolist()
        raise InputError(f"{source}: NaN or infinite values (e.g. genes {bad}); fill or drop them first")
    if (values < 0).any():
        bad = bulk.columns[(values < 0).any(axis=0)][:3].tolist()
        raise InputError(f"{source}: negative values (e.g. genes {bad}); TAPE needs counts or TPM, "
                         "not log-ratios or centred data")
    if bulk.index.duplicated().any():
        raise InputError(f"{source}: duplicated sample names {bulk.index[bulk.index.duplicated()][:3].tolist()}")
    if bulk.columns.duplicated().any():
        dup = bulk.columns[bulk.columns.duplicated()].unique()
        log.warning("%s: %d gene names occur more than once (e.g. %s); summing them", source, len(dup),
                    list(dup[:3]))
        bulk = bulk.T.groupby(level=0, sort=False).sum().T
    return bulk.astype(np.float64)


def prepare_bulk(table: pd.DataFrame, unit: str, reference_genes, gene_lengths: pd.Series | None,
                 min_shared_genes: int, source: str, protocol: str = "full_length",
                 profile: pd.Series | None = None) -> tuple[pd.DataFrame, BulkReport]:
    """A user's bulk table -> samples x genes TPM, with checks and a report.

    unit: "counts" or "TPM" (used as is: TPM is already per transcript).
    protocol (counts only): "full_length" (RNA-seq reads: TPM with ``gene_lengths``, TAPE's
    counts2TPM), "umi" (UMI counts, e.g. a pseudo-bulk of 10x cells: CPM, which is their TPM)
    or "auto" (decided by :func:`decide_protocol` against the reference ``profile``).
    Raises InputError naming ``source`` for bad values or fewer than ``min_shared_genes``
    genes shared with the reference.
    """
    if unit not in UNITS:
        raise InputError(f"BULK_UNIT must be one of {UNITS}, got {unit!r}")
    bulk, orientation = orient_bulk(table, reference_genes, source)
    n_dup = int(bulk.columns.duplicated().sum())
    bulk = check_bulk_values(bulk, source)
    genes = pd.Index(reference_genes).astype(str)
    n_ref = len(bulk.columns.intersection(genes))
    n_len = None if gene_lengths is None else len(bulk.columns.intersection(gene_lengths.index))
    report = BulkReport(source, orientation, bulk.shape[0], bulk.shape[1], n_ref, n_len, n_dup, unit)
    log.info("%s", report)
    if protocol not in BULK_PROTOCOLS:
        raise InputError(f"BULK_PROTOCOL must be one of {BULK_PROTOCOLS}, got {protocol!r}")
    if n_ref < min_shared_genes:
        raise InputError(f"{source}: only {n_ref} genes shared with the reference (MIN_SHARED_GENES="
                         f"{min_shared_genes}); check the gene naming (symbols vs Ensembl IDs) "
                         "and the orientation")
    values = bulk.to_numpy()
    looks_integer = np.allclose(values, np.round(values))
    if unit == "TPM":
        sums = values.sum(axis=1)
        if looks_integer and not np.allclose(sums, 1e6, rtol=0.05):
            log.warning("%s: BULK_UNIT='TPM' but the values are integers with row sums %.3g..%.3g; "
                        "if these are raw counts pass --BULK_UNIT=counts", source, sums.min(), sums.max())
        return bulk, report
    if not looks_integer:
        log.warning("%s: BULK_UNIT='counts' but the values are not integers; fine for estimated "
                    "counts (salmon/RSEM), wrong for TPM/FPKM (pass --BULK_UNIT=TPM)", source)
    report.protocol, report.length_slope = decide_protocol(bulk, protocol, profile, gene_lengths, source)
    if report.protocol == "umi":
        log.info("%s: UMI counts -> CPM (their TPM: one count per molecule, no length correction)", source)
        return counts_to_cpm(bulk), report
    if gene_lengths is None:
        raise InputError("BULK_UNIT='counts' needs the gene-length table to convert to TPM")
    if n_len < min_shared_genes:
        raise InputError(f"{source}: only {n_len} genes have a length in the gene-length table "
                         f"(MIN_SHARED_GENES={min_shared_genes}); counts cannot be converted to TPM")
    try:
        tpm, overlap = counts_to_tpm(bulk, gene_lengths)
    except ValueError as err:
        raise InputError(f"{source}: {err}") from None
    log.info("%s: counts -> TPM: %s", source, overlap)
    return tpm, report


# ============================================================================= preprocessing
def model_scale(tpm: pd.DataFrame, gene_lengths: pd.Series) -> pd.DataFrame:
    """TAPE's input scale from transcripts per million: TPM / gene length, rows renormalised to 1e6.

    tpm: samples x genes in transcripts per million (CPM of UMI counts, TPM of reads). Genes
    without a length are dropped. For UMI counts this is exactly TAPE's datatype="TPM" (its
    counts2TPM of the counts). Measured on Zheng pseudo-bulks (3 seeds), TAPE trained at this
    scale beat TAPE trained on plain CPM on average (whole-test-split MAE 0.012..0.014 vs
    0.012..0.030), and on the Finotello bulks (2 seeds) MAE 0.096..0.103 vs 0.094..0.121; README.
    """
    scaled, _ = counts_to_tpm(tpm, gene_lengths)
    return scaled


def select_genes(train_tpm: pd.DataFrame, bulk_tpm: pd.DataFrame, variance_threshold: float) -> list[str]:
    """TAPE's ``ProcessInputData`` gene rule: drop the lowest-variance genes of each table, intersect.

    For each table, genes whose variance is above the value at rank ``int(G * threshold)`` (in
    decreasing order) are kept; the kept genes are intersected in the training table's order.
    A single bulk sample has no variance (TAPE would keep no gene); its filter is skipped.
    """
    def high_variance(frame: pd.DataFrame) -> pd.Index:
        variance = frame.var(axis=0)
        cutoff = variance.sort_values(ascending=False).iloc[int(frame.shape[1] * variance_threshold)]
        return frame.columns[(variance > cutoff).to_numpy()]

    train_genes = high_variance(train_tpm)
    bulk_genes = high_variance(bulk_tpm) if len(bulk_tpm) > 1 else bulk_tpm.columns
    return list(train_genes.intersection(bulk_genes))


def scale_samples(tpm: pd.DataFrame, genes: list[str]) -> np.ndarray:
    """TAPE's model input: log(x + 1), then min-max over genes within each sample -> float32.

    tpm: samples x genes (missing ``genes`` must be added by the caller). Returns
    (n_samples, n_genes). A constant sample maps to 0, as sklearn's MinMaxScaler does.
    """
    values = np.log(tpm.loc[:, genes].to_numpy(dtype=np.float64) + 1.0)
    low = values.min(axis=1, keepdims=True)
    span = values.max(axis=1, keepdims=True) - low
    span[span == 0.0] = 1.0
    scale = 1.0 / span  # sklearn's arithmetic (x * scale + offset), so the floats match TAPE's
    return (values * scale + (-low * scale)).astype(np.float32)


def align_genes(bulk_tpm: pd.DataFrame, genes: list[str], min_shared_genes: int, source: str) -> pd.DataFrame:
    """The bulk over a saved model's genes; absent genes are set to 0 with a warning."""
    present = bulk_tpm.columns.intersection(genes)
    if len(present) < min_shared_genes:
        raise InputError(f"{source}: only {len(present)} of the model's {len(genes)} genes are in the bulk "
                         f"(MIN_SHARED_GENES={min_shared_genes}); retrain with --RETRAIN=true on this bulk")
    if len(present) < len(genes):
        log.warning("%s: %d of the model's %d genes are absent from the bulk and set to 0",
                    source, len(genes) - len(present), len(genes))
    return bulk_tpm.reindex(columns=genes, fill_value=0.0)


# ============================================================================= training
@dataclass
class TapeSettings:
    """Knobs of TAPE's simulation and training (names as in TAPE where it has them)."""

    samplenum: int = 2000  # simulated bulk samples
    n_cells: int = 500  # cells per simulated sample (TAPE's ``n``)
    epochs: int = 64
    batch_size: int = 128
    variance_threshold: float = 0.98
    adaptive: bool = False
    sparse: bool = True  # half the simulated samples get half the types set to zero
    seed: int = 0
    reference_protocol: str = "umi"  # "umi": simulated counts -> CPM; "full_length": -> TPM (TAPE's)


@dataclass
class TapeFit:
    """A trained TAPE model with what prediction needs; ``checkpoint_dict()`` saves it."""

    model: object  # TAPE.model.AutoEncoder
    genes: list[str]
    cell_types: list[str]  # TAPE's output order (sorted reference names)
    settings: TapeSettings
    train_seconds: float = 0.0
    simulate_seconds: float = 0.0
    profile: pd.Series | None = None  # reference_profile(), for telling a new bulk's protocol
    extra: dict = field(default_factory=dict)


def simulate_bulks(reference: pd.DataFrame, settings: TapeSettings, workdir: str | Path,
                   n_threads: int | None = None):
    """TAPE's ``generate_simulated_data`` on a float32 copy of ``reference`` -> AnnData.

    reference: cells x genes raw counts, index = cell-type name (TAPE's txt layout).
    Returns AnnData (samplenum x genes counts, obs = proportions, columns sorted type names).
    """
    tape = import_tape()
    if "celltype" in reference.columns:
        raise InputError("the reference has a gene named 'celltype', which TAPE uses as its label column")
    frame = reference.astype(np.float32, copy=True)  # TAPE adds/drops columns in place
    with tape_sandbox(workdir, n_threads):
        simulated = tape.simulation.generate_simulated_data(
            frame, n=settings.n_cells, samplenum=settings.samplenum, random_state=settings.seed,
            sparse=settings.sparse)
    return simulated


def simulated_tpm(simulated, gene_lengths: pd.Series | None, protocol: str = "full_length") -> pd.DataFrame:
    """TPM of TAPE's simulated counts: CPM for "umi" counts, TAPE's counts2TPM for "full_length"."""
    counts = pd.DataFrame(np.asarray(simulated.X), columns=simulated.var_names.astype(str))
    tpm, overlap = counts_to_expression(counts, gene_lengths, protocol)
    log.info("simulated training bulks -> %s", "CPM (UMI counts: no length correction)" if overlap is None
             else f"TPM: {overlap}")
    return tpm


def fit_tape(reference: pd.DataFrame, bulk_tpm: pd.DataFrame, gene_lengths: pd.Series,
             settings: TapeSettings, workdir: str | Path, n_threads: int | None = None,
             simulated=None) -> TapeFit:
    """Simulate bulks from ``reference`` and train TAPE's AutoEncoder on the genes shared with ``bulk_tpm``.

    reference: cells x genes counts, index = cell-type name. bulk_tpm: samples x genes in
    transcripts per million (:func:`prepare_bulk`). Both go to :func:`model_scale` with
    ``gene_lengths``. ``simulated`` (AnnData from :func:`simulate_bulks`) skips the simulation.
    """
    tape = import_tape()
    bound_heap_fragmentation()
    start = time.perf_counter()
    if simulated is None:
        simulated = simulate_bulks(reference, settings, workdir, n_threads)
    simulate_seconds = time.perf_counter() - start
    if settings.reference_protocol not in PROTOCOLS:
        raise InputError(f"the reference protocol must be one of {PROTOCOLS}, got {settings.reference_protocol!r}")
    train_tpm = model_scale(simulated_tpm(simulated, gene_lengths, settings.reference_protocol), gene_lengths)
    genes = select_genes(train_tpm, model_scale(bulk_tpm, gene_lengths), settings.variance_threshold)
    if not genes:
        raise InputError("no gene survives TAPE's variance filter and the intersection with the bulk")
    train_x = scale_samples(train_tpm, genes)
    train_y = simulated.obs.to_numpy(dtype=np.float64)  # TAPE passes obs.values (float64)
    cell_types = [str(c) for c in simulated.obs.columns]
    del train_tpm
    log.info("training TAPE on %d simulated samples x %d genes, %d cell types, %d epochs, batch %d",
             train_x.shape[0], train_x.shape[1], len(cell_types), settings.epochs, settings.batch_size)
    start = time.perf_counter()
    with tape_sandbox(workdir, n_threads):
        tape.train.reproducibility(settings.seed)
        model = tape.train.train_model(train_x, train_y, batch_size=settings.batch_size,
                                       epochs=settings.epochs)
    train_seconds = time.perf_counter() - start
    log.info("TAPE simulation %.1f s, training %.1f s", simulate_seconds, train_seconds)
    profile = reference_profile(reference, settings.reference_protocol, gene_lengths)
    return TapeFit(model, genes, cell_types, settings, train_seconds, simulate_seconds,
                   profile=profile.reindex(genes, fill_value=0.0))


# ============================================================================= checkpoint
def checkpoint_dict(fit: TapeFit) -> dict:
    """Everything prediction needs, as tensors and primitives (``torch.load(weights_only=True)``)."""
    import torch

    return {
        "state_dict": {k: v.detach().cpu() for k, v in fit.model.state_dict().items()},
        "input_dim": int(fit.model.inputdim),
        "output_dim": int(fit.model.outputdim),
        "genes": list(fit.genes),
        "cell_types": list(fit.cell_types),
        # How a bulk becomes the model's input (prepare_bulk, model_scale, scale_samples).
        "preprocessing": {"unit": "TPM", "reference_protocol": fit.settings.reference_protocol,
                          "scale": MODEL_SCALE, "transform": "log(x+1)", "scaler": "mms",
                          "axis": "per sample"},
        "settings": asdict(fit.settings),
        "tape_version": TAPE_VERSION,
        "train_seconds": float(fit.train_seconds),
        "simulate_seconds": float(fit.simulate_seconds),
        # The reference's mean TPM over `genes`: lets a reloaded model tell a new bulk's protocol.
        **({} if fit.profile is None else
           {"profile": torch.as_tensor(fit.profile.reindex(fit.genes).to_numpy(np.float64))}),
    }


def save_checkpoint(fit: TapeFit, path: str | Path) -> None:
    import torch

    from models.io import atomic_path

    with atomic_path(path) as tmp:
        torch.save(checkpoint_dict(fit), tmp)


def load_checkpoint(path: str | Path) -> dict:
    """Load ``tape.pt`` with ``weights_only=True`` (no pickled code is ever executed)."""
    import torch

    path = Path(path)
    if not path.exists():
        raise InputError(f"missing {path}: run _4_deconvolve_bulk.py with --RETRAIN=true first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise InputError(f"{path}: cannot load as a TAPE checkpoint ({err}); retrain with --RETRAIN=true") from None
    needed = {"state_dict", "input_dim", "output_dim", "genes", "cell_types"}
    if not needed <= set(ckpt):
        raise InputError(f"{path}: not a bulk2sc TAPE checkpoint (keys {sorted(ckpt)}); retrain")
    if ckpt.get("preprocessing", {}).get("scale") != MODEL_SCALE:
        raise InputError(f"{path} was trained by an older bulk2sc whose bulk units differ (UMI references "
                         "were length-divided); rerun _2_prepare_sctape.py, then _4_ with --RETRAIN=true")
    return ckpt


def checkpoint_profile(ckpt: dict) -> pd.Series | None:
    """The reference profile saved in a checkpoint (None in checkpoints from before it was saved)."""
    if "profile" not in ckpt:
        return None
    return pd.Series(np.asarray(ckpt["profile"], dtype=np.float64), index=list(ckpt["genes"]))


def checkpoint_protocol(ckpt: dict) -> str:
    """The reference protocol a checkpoint was trained with; older checkpoints used TAPE's TPM."""
    return str(ckpt.get("settings", {}).get("reference_protocol", "full_length"))


def model_from_checkpoint(ckpt: dict):
    """TAPE's AutoEncoder with the saved weights, in eval/test state."""
    tape = import_tape()
    model = tape.model.AutoEncoder(ckpt["input_dim"], ckpt["output_dim"])
    model.load_state_dict(ckpt["state_dict"])
    model.to(tape.model.device)
    model.eval()
    model.state = "test"
    return model


# ============================================================================= prediction
def _renormalise(pred: np.ndarray, source: str) -> np.ndarray:
    """Rows that TAPE's ReLU+sum made 0/0 become uniform (with a warning); rows sum to 1."""
    bad = ~np.isfinite(pred).all(axis=1)
    if bad.any():
        log.warning("%s: %d samples had all-zero TAPE outputs; set to uniform proportions", source, bad.sum())
        pred[bad] = 1.0 / pred.shape[1]
    return pred / pred.sum(axis=1, keepdims=True)


def predict_scaled(model, x: np.ndarray, adaptive: bool, n_threads: int | None = None,
                   workdir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """TAPE's prediction on preprocessed input ``x`` (n_samples, n_genes) -> (proportions, signature).

    adaptive=False: one forward pass in test state (ReLU, then divide by the row sum), as
    TAPE's ``predict(adaptive=False)``. adaptive=True: TAPE's ``adaptive_stage`` (mode
    "overall", 300 steps x 3) on a *copy* of the model, so the saved weights never change; it
    also returns the adapted signature matrix (n_types, n_genes).
    """
    import torch

    tape = import_tape()
    if not adaptive:
        threads_before = torch.get_num_threads()
        if n_threads is not None:
            set_torch_threads(n_threads)
        try:
            model.eval()
            model.state = "test"
            with torch.no_grad():
                _, pred, _ = model(torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(tape.model.device))
            return pred.cpu().numpy().astype(np.float64), None
        finally:
            torch.set_num_threads(threads_before)
    adapted = copy.deepcopy(model)
    decoder = [{"params": [p for n, p in adapted.named_parameters() if "decoder" in n]}]
    encoder = [{"params": [p for n, p in adapted.named_parameters() if "encoder" in n]}]
    optimizer_d = torch.optim.Adam(decoder, lr=1e-4)
    optimizer_e = torch.optim.Adam(encoder, lr=1e-4)
    with tape_sandbox(workdir or tempfile.gettempdir(), n_threads):
        signature, _, pred = tape.train.adaptive_stage(
            adapted, np.asarray(x, np.float32), optimizer_d, optimizer_e,
            step=ADAPTIVE_STEP, max_iter=ADAPTIVE_MAX_ITER)
    return np.asarray(pred, np.float64), np.asarray(signature)


def predict_proportions(ckpt: dict, bulk_tpm: pd.DataFrame, gene_lengths: pd.Series, adaptive: bool | None = None,
                        min_shared_genes: int = 1, source: str = "bulk", n_threads: int | None = None,
                        workdir: str | Path | None = None, model=None) -> pd.DataFrame:
    """Cell-type proportions (samples x TAPE's cell types, rows sum to 1) of a bulk.

    bulk_tpm: samples x genes in transcripts per million (:func:`prepare_bulk`), brought to the
    model's scale with ``gene_lengths`` (:func:`model_scale`). ckpt: :func:`checkpoint_dict` /
    :func:`load_checkpoint`. ``adaptive`` defaults to the setting the model was trained with.
    ``model`` reuses an already built AutoEncoder.
    """
    if adaptive is None:
        adaptive = bool(ckpt.get("settings", {}).get("adaptive", False))
    genes = list(ckpt["genes"])
    aligned = align_genes(model_scale(bulk_tpm, gene_lengths), genes, min(min_shared_genes, len(genes)), source)
    x = scale_samples(aligned, genes)
    model = model if model is not None else model_from_checkpoint(ckpt)
    pred, _ = predict_scaled(model, x, adaptive, n_threads, workdir)
    pred = _renormalise(pred, source)
    return pd.DataFrame(pred, index=bulk_tpm.index, columns=list(ckpt["cell_types"]))


def nnls_proportions(reference: pd.DataFrame, bulk_tpm: pd.DataFrame, gene_lengths: pd.Series | None,
                     protocol: str = "umi") -> pd.DataFrame:
    """Baseline: non-negative least squares of each bulk on the reference's mean TPM profiles.

    reference: cells x genes counts, index = type name. Each type's mean count profile is
    converted to TPM as its ``protocol`` requires (CPM for UMI counts), so proportions are in the
    units of TPM mass per type; rows are normalised to sum to 1.
    """
    from scipy.optimize import nnls

    means = reference.groupby(level=0, sort=True).mean()
    profiles, _ = counts_to_expression(means, gene_lengths, protocol)
    genes = profiles.columns.intersection(bulk_tpm.columns)
    design = profiles[genes].to_numpy().T  # genes x types
    rows = []
    for sample in bulk_tpm.index:
        weights, _ = nnls(design, bulk_tpm.loc[sample, genes].to_numpy(dtype=np.float64))
        rows.append(weights / weights.sum() if weights.sum() > 0 else np.full(len(weights), 1 / len(weights)))
    return pd.DataFrame(np.vstack(rows), index=bulk_tpm.index, columns=[str(c) for c in profiles.index])
