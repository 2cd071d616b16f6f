"""Bulk units and protocol: a user's table -> TPM, and TPM -> TAPE's input scale.

Every table is first brought to transcripts per million as its protocol requires (UMI counts ->
CPM; full-length read counts -> TPM with gene lengths; :func:`prepare_bulk` tells bulk counts of
the two kinds apart from the data), then all of them get the same TAPE input scale,
:func:`model_scale` (TPM / gene length, renormalised: what TAPE's datatype="TPM" makes of UMI
counts). See the package docstring for why.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from models.bulk import PROTOCOLS, counts_to_cpm, counts_to_expression, counts_to_tpm, length_bias_slope
from models.genes import describe_mismatch, match_genes, rename_columns
from models.utils import InputError

log = logging.getLogger(__name__)

UNITS = ("counts", "TPM")
MODEL_SCALE = "TPM / gene length, renormalised"  # model_scale(); checkpoints without it predate it
BULK_PROTOCOLS = ("auto", *PROTOCOLS)
# Bulk counts whose log ratio to the reference rises with log gene length by at least this much
# are read counts from full-length RNA-seq (0.29..0.42 on the Finotello bulks vs the Zheng 10x
# reference); at or near 0 they are UMI counts like the reference's (|slope| <= 0.10 on Zheng
# pseudo-bulks). See models.bulk.length_bias_slope.
LENGTH_SLOPE_CUTOFF = 0.15


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


def orient_bulk(table: pd.DataFrame, reference_genes, source: str,
                reference_ids=None) -> tuple[pd.DataFrame, str]:
    """samples x genes, deciding the orientation by which axis matches the reference genes more
    (on a tie, the longer axis holds the genes).

    Genes are matched by :func:`models.genes.match_genes` (exact, then ignoring case and an
    Ensembl version; on the reference's ids too when ``reference_ids`` are given), and the
    matched ones are renamed to the reference's names, so later steps compare names exactly.
    """
    genes = [str(g) for g in reference_genes]
    ids = None if reference_ids is None else [str(g) for g in reference_ids]
    by_columns = match_genes(table.columns.astype(str), genes, ids, f"{source} (columns)") \
        if table.shape[1] else None
    by_rows = match_genes(table.index.astype(str), genes, ids, f"{source} (rows)") if table.shape[0] else None
    n_columns, n_rows = len(by_columns or ()), len(by_rows or ())
    # A tie (typically no match either way, e.g. Ensembl ids against symbols): genes are the longer
    # axis, so the error about too few shared genes describes the genes, not the sample names.
    if n_rows > n_columns or (n_rows == n_columns and table.shape[0] > table.shape[1]):
        table, orientation, match = table.T, "genes x samples (transposed)", by_rows
    else:
        orientation, match = "samples x genes", by_columns
    table = table.copy()
    table.index = table.index.astype(str)
    table.columns = table.columns.astype(str)
    if match is not None and any(q != t for q, t in match.mapping.items()):
        table = table.rename(columns=match.mapping)
    log.info("%s: %s reference genes in the columns, %s in the rows -> %s",
             source, n_columns, n_rows, orientation)
    return table, orientation


def too_few_genes(source: str, n_shared: int, bulk_genes, reference_genes, reference_ids, setting: str,
                  minimum: int, what: str = "genes shared with the reference") -> InputError:
    """The too-few-shared-genes error: which identifiers each side uses, and how to convert."""
    advice = describe_mismatch([str(g) for g in bulk_genes], [str(g) for g in reference_genes],
                               None if reference_ids is None else [str(g) for g in reference_ids])
    return InputError(f"{source}: only {n_shared} {what} ({setting}={minimum}): {advice}")


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
        raise InputError(f"{source}: duplicated sample names {bulk.index[bulk.index.duplicated()][:3].tolist()}; "
                         "give each sample a unique name")
    if bulk.columns.duplicated().any():
        dup = bulk.columns[bulk.columns.duplicated()].unique()
        log.warning("%s: %d gene names occur more than once (e.g. %s); summing them", source, len(dup),
                    list(dup[:3]))
        bulk = bulk.T.groupby(level=0, sort=False).sum().T
    return bulk.astype(np.float64)


def prepare_bulk(table: pd.DataFrame, unit: str, reference_genes, gene_lengths: pd.Series | None,
                 min_shared_genes: int, source: str, protocol: str = "full_length",
                 profile: pd.Series | None = None, reference_ids=None) -> tuple[pd.DataFrame, BulkReport]:
    """A user's bulk table -> samples x genes TPM, with checks and a report.

    unit: "counts" or "TPM" (used as is: TPM is already per transcript).
    protocol (counts only): "full_length" (RNA-seq reads: TPM with ``gene_lengths``, TAPE's
    counts2TPM), "umi" (UMI counts, e.g. a pseudo-bulk of 10x cells: CPM, which is their TPM)
    or "auto" (decided by :func:`decide_protocol` against the reference ``profile``).
    Raises InputError naming ``source`` for bad values or fewer than ``min_shared_genes``
    genes shared with the reference (saying which identifiers each side uses). Genes are matched
    as :func:`orient_bulk` does (case, Ensembl versions, the reference's ``reference_ids``).
    """
    if unit not in UNITS:
        raise InputError(f"BULK_UNIT must be one of {UNITS}, got {unit!r}")
    bulk, orientation = orient_bulk(table, reference_genes, source, reference_ids)
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
        raise too_few_genes(source, n_ref, bulk.columns, genes, reference_ids, "MIN_SHARED_GENES", min_shared_genes)
    empty = bulk.index[bulk[bulk.columns.intersection(genes)].sum(axis=1) <= 0]
    if len(empty):
        raise InputError(f"{source}: samples {empty[:3].tolist()} have no counts on the reference's genes (all "
                         "zero); drop them from the table")
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


def marker_genes(reference: pd.DataFrame, per_type: int, min_detection: float = 0.0, protocol: str = "umi",
                 gene_lengths: pd.Series | None = None) -> list[str]:
    """The union of each cell type's ``per_type`` most specific genes, from the reference alone.

    reference: cells x genes counts, index = cell-type name. A gene's specificity for type k is
    log2(1 + its pooled expression in k) - max over the other types of the same (the type's mean
    counts in CPM for "umi", TPM for "full_length"), so a marker stands out against the *nearest*
    type, not the average. Only genes detected (count > 0) in at least ``min_detection`` of the
    type's cells compete: well-detected genes are the ones whose bulk level is least distorted
    between platforms. Returns gene names in the reference's column order.
    """
    if per_type < 1:
        raise ValueError(f"per_type must be at least 1, got {per_type}")
    groups = reference.groupby(level=0, sort=True)
    expression, _ = counts_to_expression(groups.mean(), gene_lengths, protocol)
    level = np.log2(1.0 + expression.to_numpy(np.float64))  # types x genes
    detected = (reference > 0).groupby(level=0, sort=True).mean().reindex(columns=expression.columns).to_numpy()
    chosen = set()
    for k in range(level.shape[0]):
        others = np.delete(level, k, axis=0)
        score = level[k] - (others.max(axis=0) if len(others) else 0.0)
        score[detected[k] < min_detection] = -np.inf
        ranked = np.argsort(-score, kind="stable")[:per_type]
        chosen.update(expression.columns[ranked[np.isfinite(score[ranked])]])
    return [g for g in expression.columns if g in chosen]


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
    """The bulk over a saved model's genes; absent genes are set to 0 with a warning.

    Names are matched as :func:`orient_bulk` does (a no-op after :func:`prepare_bulk`).
    """
    bulk_tpm, _ = rename_columns(bulk_tpm, genes, source=source)
    present = bulk_tpm.columns.intersection(genes)
    if len(present) < min_shared_genes:
        error = too_few_genes(source, len(present), bulk_tpm.columns, genes, None, "MIN_SHARED_GENES",
                              min_shared_genes, f"of the model's {len(genes)} genes are in the bulk")
        raise InputError(f"{error}; or retrain with --RETRAIN=true on this bulk")
    if len(present) < len(genes):
        log.warning("%s: %d of the model's %d genes are absent from the bulk and set to 0",
                    source, len(genes) - len(present), len(genes))
    return bulk_tpm.reindex(columns=genes, fill_value=0.0)


