"""Synthetic cells from cell-type counts: rounding, seeded chunked sampling, progressive writing.

How many cells of each type come from ``N_CELLS x proportions`` rounded with the largest
remainder (so they sum exactly to ``N_CELLS``), or from an explicit ``cell_type,n_cells`` table.

Randomness is tied to the cells, not to the chunking: cell ``i`` belongs to RNG block
``i // block_cells`` and every block draws from its own ``torch.Generator`` seeded from
``(seed, stream, block)``. Chunks only decide how many blocks are written at once, so the
same seed gives identical files for any ``CHUNK_CELLS``.

Output (one folder per bulk sample) is written while sampling, in bounded memory:

- ``matrix.mtx``: integer, genes x cells. Matrix Market needs the number of entries in its
  header, so entries go to a body file chunk by chunk and the header is prepended at the end.
- ``cells.h5ad``: cells x genes CSR int32 counts written straight into resizable HDF5
  datasets (anndata's on-disk CSR layout), ``obs["cell_type"]``, ``obs["partition"]``,
  ``obs["sample"]``; ``var_names`` are the model's genes.
- ``clusters.csv`` (``partition``, ``cell_type``), ``genes.tsv``, ``barcodes.tsv``, so the
  folder reads back with :func:`models.io.read_dataset`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from models.io import atomic_path, gene_lines
from models.paths import BARCODES, CLUSTERS, GENES, H5AD, MATRIX
from models.utils import InputError

log = logging.getLogger(__name__)

# A sampler draws integer-valued counts [n, n_genes] (dense tensor or scipy CSR) for type codes [n].
Sampler = Callable[[torch.Tensor, torch.Generator], "torch.Tensor | sp.csr_matrix"]

# RNG unit: fixed, so changing CHUNK_CELLS never changes the cells drawn. 256 cells keep a block's
# [cells, genes] float32 tensors under glibc's 32 MB mmap ceiling up to ~32k genes, so they are
# recycled from the heap instead of being mapped (and page-faulted) afresh for every block.
BLOCK_CELLS = 256


# ----------------------------------------------------------------------------- how many cells
def largest_remainder(proportions: Sequence[float], n_total: int) -> np.ndarray:
    """Integer counts (int64) proportional to ``proportions`` that sum exactly to ``n_total``.

    Hamilton's method: floor every quota, then give the leftover cells to the largest
    remainders (ties to the earlier type, so the result is deterministic). Proportions need
    not sum to one; they are normalised first.
    """
    weights = np.asarray(proportions, dtype=np.float64).ravel()
    if n_total < 0 or int(n_total) != n_total:
        raise ValueError(f"n_total must be a non-negative integer, got {n_total}")
    if weights.size == 0 or not np.all(np.isfinite(weights)) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"proportions must be finite, non-negative and not all zero, got {weights}")
    quotas = weights / weights.sum() * int(n_total)
    counts = np.floor(quotas).astype(np.int64)
    leftover = int(n_total) - int(counts.sum())
    if leftover > 0:
        order = np.argsort(-(quotas - counts), kind="stable")
        counts[order[:leftover]] += 1
    return counts


def validate_proportions(proportions: pd.DataFrame, cell_types: Sequence[str], source: str | Path) -> pd.DataFrame:
    """Samples x ``cell_types`` proportions (missing types get 0), checked and renormalised.

    Raises InputError on NaN, negative values, an all-zero row or a column that is not a
    known cell type (the message lists the valid names).
    """
    cell_types = [str(c) for c in cell_types]
    proportions = proportions.copy()
    proportions.columns = [str(c) for c in proportions.columns]
    unknown = [c for c in proportions.columns if c not in cell_types]
    if unknown:
        raise InputError(f"{source}: cell types {unknown[:5]} are not in the GMVAE checkpoint; "
                         f"valid names are: {', '.join(cell_types)}")
    values = proportions.apply(pd.to_numeric, errors="coerce")
    if values.isna().to_numpy().any():
        bad = values.index[values.isna().any(axis=1)].tolist()
        raise InputError(f"{source}: proportions contain NaN or non-numeric values (samples {bad[:5]}); "
                         "rerun _4_deconvolve_bulk.py or fix the file")
    if (values.to_numpy() < 0).any():
        raise InputError(f"{source}: proportions contain negative values (min {values.to_numpy().min():g}); "
                         "proportions must be >= 0")
    sums = values.sum(axis=1)
    if (sums <= 0).any():
        raise InputError(f"{source}: samples {sums.index[sums <= 0].tolist()[:5]} have all-zero proportions")
    off = (sums - 1.0).abs().max()
    if off > 1e-3:
        log.warning("%s: proportions sum to %.4f-%.4f, not 1; renormalising each sample", source, sums.min(), sums.max())
    values = values.div(sums, axis=0)
    return values.reindex(columns=cell_types, fill_value=0.0)


def read_proportions(path: Path, cell_types: Sequence[str]) -> pd.DataFrame:
    """``deconvolution/proportions.csv`` (first column = sample name) as samples x cell types."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"missing {path}: run _4_deconvolve_bulk.py first, "
                         "or pass --CELL_COUNTS=path/to.csv with columns cell_type,n_cells")
    table = pd.read_csv(path, index_col=0)
    if table.empty:
        raise InputError(f"{path}: no samples in the proportions table; rerun _4_deconvolve_bulk.py")
    table.index = table.index.astype(str)
    return validate_proportions(table, cell_types, path)


def read_cell_counts(path: Path, cell_types: Sequence[str]) -> pd.Series:
    """A ``cell_type,n_cells`` table as a Series over ``cell_types`` (absent types get 0)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"CELL_COUNTS file {path} does not exist; give a CSV with columns cell_type,n_cells")
    table = pd.read_csv(path, dtype={"cell_type": str})
    if not {"cell_type", "n_cells"} <= set(table.columns):
        raise InputError(f"{path}: needs columns cell_type,n_cells; found {list(table.columns)}")
    valid = [str(c) for c in cell_types]
    unknown = sorted(set(table["cell_type"]) - set(valid))
    if unknown:
        raise InputError(f"{path}: unknown cell types {unknown[:5]}; valid names are: {', '.join(valid)}")
    if table["cell_type"].duplicated().any():
        raise InputError(f"{path}: cell types listed twice: {table['cell_type'][table['cell_type'].duplicated()].tolist()}")
    n_cells = pd.to_numeric(table["n_cells"], errors="coerce")
    if n_cells.isna().any() or (n_cells < 0).any() or (n_cells != n_cells.round()).any():
        raise InputError(f"{path}: n_cells must be non-negative integers")
    counts = pd.Series(n_cells.astype(np.int64).to_numpy(), index=table["cell_type"]).reindex(valid, fill_value=0)
    if counts.sum() <= 0:
        raise InputError(f"{path}: n_cells sums to 0; ask for at least one cell")
    counts.index.name = "cell_type"
    return counts.rename("n_cells")


def cell_counts_from_proportions(proportions: pd.DataFrame, n_cells: int) -> pd.DataFrame:
    """Samples x types integer counts, each row summing exactly to ``n_cells``."""
    if n_cells <= 0:
        raise InputError(f"N_CELLS must be a positive number of cells, got {n_cells}")
    rows = [largest_remainder(proportions.loc[s].to_numpy(), n_cells) for s in proportions.index]
    return pd.DataFrame(np.vstack(rows), index=proportions.index, columns=proportions.columns)


def read_interval(path: Path, proportions: pd.DataFrame) -> pd.DataFrame:
    """One bound of ``_4_``'s 90 % intervals (``proportions_lower.csv`` / ``_upper.csv``) over ``proportions``' rows and types."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"missing {path}: COUNTS_FROM=draw needs the intervals of _4_deconvolve_bulk.py "
                         "(rerun it), or use --COUNTS_FROM=point")
    table = pd.read_csv(path, index_col=0)
    table.index, table.columns = table.index.astype(str), table.columns.astype(str)
    missing = sorted(set(proportions.index) - set(table.index)) + sorted(set(proportions.columns) - set(table.columns))
    if missing:
        raise InputError(f"{path} lacks {missing[:5]} of the proportions' samples/types; rerun _4_deconvolve_bulk.py")
    return table.loc[proportions.index, proportions.columns].astype(float)


def dirichlet_concentration(proportions: np.ndarray, lower: np.ndarray, upper: np.ndarray,
                            level: float = 0.9) -> float:
    """Concentration c of a Dirichlet(c * p) whose marginal sds match an interval's widths.

    A Dirichlet(c p) has Var_k = p_k (1 - p_k) / (c + 1); each type's sd is read from its
    ``level`` interval as width / (2 z). c is the median over the types with p_k >= 1 % (the
    small ones have intervals clipped at 0), at least 1.
    """
    from scipy.stats import norm

    z = norm.ppf(0.5 + level / 2)
    sd = (np.asarray(upper, float) - np.asarray(lower, float)) / (2 * z)
    p = np.asarray(proportions, float)
    use = (p >= 0.01) & (sd > 0)
    if not use.any():
        return 1e6  # no width: the point estimate
    return float(max(np.median(p[use] * (1 - p[use]) / sd[use] ** 2 - 1), 1.0))


def replicate_cell_counts(proportions: pd.DataFrame, lower: pd.DataFrame, upper: pd.DataFrame, n_cells: int,
                          replicates: int, seed: int, level: float = 0.9) -> pd.DataFrame:
    """Cell counts drawn from the proportions' uncertainty: ``replicates`` rows per sample.

    Each replicate draws a composition from a Dirichlet centred on the point estimate, with the
    concentration the sample's ``level`` intervals imply (:func:`dirichlet_concentration`), then
    its cell counts from a multinomial of ``n_cells``. Rows are named ``<sample>_rep<r>`` and sum
    to ``n_cells`` (``attrs["bulk_sample"]`` names each row's bulk sample); one seeded generator per sample, so the same ``seed`` gives the same counts.
    """
    if n_cells <= 0:
        raise InputError(f"N_CELLS must be a positive number of cells, got {n_cells}")
    if replicates < 1:
        raise InputError(f"REPLICATES must be at least 1, got {replicates}")
    rows, names = [], []
    for index, sample in enumerate(proportions.index):
        p = proportions.loc[sample].to_numpy(float)
        c = dirichlet_concentration(p, lower.loc[sample, proportions.columns].to_numpy(),
                                    upper.loc[sample, proportions.columns].to_numpy(), level)
        alpha = np.maximum(c * p, 1e-3)  # a Dirichlet needs alpha > 0; a type at 0 stays near 0
        rng = np.random.default_rng([seed, index])
        for r in range(replicates):
            rows.append(rng.multinomial(n_cells, rng.dirichlet(alpha)))
            names.append(f"{sample}_rep{r}")
    counts = pd.DataFrame(np.vstack(rows), index=names, columns=proportions.columns)
    counts.attrs["bulk_sample"] = [str(s) for s in proportions.index for _ in range(replicates)]  # row -> its bulk
    return counts


def type_codes_from_counts(counts: Sequence[int]) -> np.ndarray:
    """Per-cell partition codes (int64), type by type in code order: [0]*n_0 + [1]*n_1 + ..."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.repeat(np.arange(len(counts), dtype=np.int64), counts)


# ----------------------------------------------------------------------------- samplers
MAX_INVERSION_MU = 2.0  # above this mean, draw Gamma-Poisson (rejecting zeros) instead of walking the CDF
MAX_STEPS = 100_000  # safety bound of the CDF walk (reached only through float rounding at v ~ 1)


@torch.no_grad()
def sample_zinb_inversion(log_mu: torch.Tensor, log_theta: torch.Tensor, zi_logits: torch.Tensor | None,
                          generator: torch.Generator) -> sp.csr_matrix:
    """Exact (ZI)NB draws [N, G] as CSR int32, touching every entry with one uniform only.

    Single cells are mostly zeros, so the Gamma-Poisson draw of every entry (the costly
    ``_standard_gamma``) is wasted work. Here one uniform per entry decides zero vs nonzero
    against P(X = 0) = pi + (1 - pi) NB(0); only the nonzero entries (a few % of genes) get
    a value from the zero-truncated NB: by walking its CDF with a fresh float64 uniform
    (mu <= MAX_INVERSION_MU), else by Gamma-Poisson draws repeated until nonzero. Both steps
    are exact, so the counts follow the same distribution as ``ZeroInflatedNegativeBinomial``.
    """
    device = torch.device(generator.device)
    log_mu, log_theta = log_mu.to(device), log_theta.to(device)
    n_rows, n_cols = log_mu.shape
    theta = log_theta.exp()
    log_p0 = F.softplus(log_mu - log_theta).mul_(theta).neg_()  # log NB(0) = -theta softplus(log mu/theta)
    p_zero = log_p0.exp()
    if zi_logits is not None:
        keep = torch.sigmoid(zi_logits.to(device).neg())  # 1 - pi
        p_zero = p_zero.mul_(keep).add_(1.0).sub_(keep)  # pi + (1 - pi) NB(0)
    uniform = torch.rand(log_mu.shape, generator=generator, device=device)
    nonzero = (uniform >= p_zero).cpu().numpy()
    del uniform, p_zero
    rows, cols = np.nonzero(nonzero)  # row-major: CSR order (numpy's is several times faster than torch's)
    values = truncated_nb(log_mu.cpu().numpy()[rows, cols].astype(np.float64),
                          log_theta.cpu().numpy()[rows, cols].astype(np.float64),
                          log_p0.cpu().numpy()[rows, cols].astype(np.float64), generator)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    return sp.csr_matrix((values.astype(np.int32), cols.astype(np.int32), indptr), shape=(n_rows, n_cols))


def truncated_nb(log_mu: np.ndarray, log_theta: np.ndarray, log_p0: np.ndarray,
                 generator: torch.Generator) -> np.ndarray:
    """One draw of NB(mu, theta) conditioned on X >= 1 per entry (float64 arrays in, int64 out).

    All uniforms and Gamma/Poisson draws come from ``generator``; the arithmetic is numpy
    (its boolean compaction is several times faster than torch's on CPU).
    """
    device = torch.device(generator.device)
    out = np.ones(len(log_mu), dtype=np.int64)
    if not len(log_mu):
        return out
    mu_all = np.exp(log_mu)
    walk = mu_all <= MAX_INVERSION_MU
    # CDF walk: smallest x >= 1 with sum_{k=1..x} pmf(k) >= v * P(X >= 1), v ~ U(0, 1). The
    # working arrays shrink to the entries still walking, so the cost is ~ the sum of the counts.
    where = np.flatnonzero(walk)
    if len(where):
        target = torch.rand(len(where), dtype=torch.float64, generator=generator, device=device).cpu().numpy()
        mu, lp0, theta = mu_all[where], log_p0[where], np.exp(log_theta[where])
        q = mu / (mu + theta)
        target *= -np.expm1(lp0)
        pmf = np.exp(lp0 + np.log(theta) + np.log(q))  # pmf(1) = p0 theta q
        total = pmf.copy()
        for step in range(1, MAX_STEPS):
            going = total < target
            if step > 1:
                out[where[~going]] = step
            if not going.any():
                break
            where, pmf, total, target, theta, q = (a[going] for a in (where, pmf, total, target, theta, q))
            pmf *= (step + theta) / (step + 1.0) * q  # pmf(step + 1) from pmf(step)
            total += pmf
        else:
            out[where] = MAX_STEPS
    # Large means: Gamma-Poisson draws, redrawn where they came out zero (P(0) is small there).
    where = np.flatnonzero(~walk)
    if len(where):
        mu = torch.as_tensor(mu_all[where], device=device)
        theta = torch.as_tensor(np.exp(log_theta[where]), device=device)
        for _ in range(MAX_STEPS):
            rate = torch._standard_gamma(theta, generator=generator) * (mu / theta)
            draw = torch.poisson(rate, generator=generator).cpu().numpy()
            done = draw > 0.5
            out[where[done]] = draw[done].astype(np.int64)
            if done.all():
                break
            keep = torch.from_numpy(~done).to(device)
            where, mu, theta = where[~done], mu[keep], theta[keep]
    return out


def gmvae_sampler(model, noise_scale: float = 1.0, method: str = "inversion", prior: str = "learned",
                  calibrate: bool = False, z_shift: torch.Tensor | None = None,
                  log_mean_shift: torch.Tensor | None = None, frequency: bool = True) -> Sampler:
    """Counts from the trained GMVAE: z ~ p(z|k) (sd scaled by ``noise_scale``), decoder, (ZI)NB draw.

    ``prior``: ``"learned"`` (the model's p(z | k)) or ``"posterior"`` (the per-type Gaussian
    fitted to the training encodings, ``GMVAE.fit_posterior_prior``). ``calibrate``: shift each
    type's gene means to the training cells' (``GMVAE.fit_mean_calibration``).

    ``z_shift`` [K, Z] and ``log_mean_shift`` [K, G]: a bulk sample's conditioning
    (:mod:`models.condition`), added to z before the decoder and to the log means after it
    (with ``frequency``, also to log theta and the non-structural-zero odds: GMVAE.generative_params).

    ``method="inversion"``: :func:`sample_zinb_inversion` (exact, ~3x faster on CPU);
    ``"model"``: the model's own ``sample_counts`` (Gamma-Poisson for every entry).
    """
    if method == "model":
        def sample(codes: torch.Tensor, generator: torch.Generator):
            return model.sample_counts(codes, generator=generator, noise_scale=noise_scale, source=prior,
                                       calibrate=calibrate, z_shift=z_shift, log_mean_shift=log_mean_shift,
                                       frequency=frequency)
    elif method == "inversion":
        def sample(codes: torch.Tensor, generator: torch.Generator):
            log_mu, log_theta, zi_logits = model.generative_params(codes.to(model.onehot.device), generator,
                                                                   noise_scale, prior, calibrate,
                                                                   z_shift=z_shift, log_mean_shift=log_mean_shift,
                                                                   frequency=frequency)
            return sample_zinb_inversion(log_mu, log_theta, zi_logits, generator)
    else:
        raise ValueError(f"method must be 'inversion' or 'model', got {method!r}")
    return sample


@dataclass
class NBBaselineSampler:
    """Independent per-gene NB per cell type: the floor every GMVAE metric is compared with.

    mu, theta: [n_types, n_genes] (e.g. from ``models.baseline.fit_nb_per_type``).
    """
    mu: torch.Tensor
    theta: torch.Tensor

    def __call__(self, codes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        from models.distributions import NegativeBinomial

        codes = codes.to(self.mu.device)
        return NegativeBinomial(self.mu[codes], self.theta[codes]).sample(generator=generator)


# ----------------------------------------------------------------------------- seeded blocks
def block_generator(seed: int, stream: int, block: int, device: str | torch.device = "cpu") -> torch.Generator:
    """An independent generator for RNG block ``block`` of stream ``stream`` (one per bulk sample/model)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(stream), int(block)]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(int(state[0]) << 31 ^ int(state[1]))
    return generator


def generate_chunks(sampler: Sampler, type_codes: np.ndarray, seed: int, chunk_cells: int, stream: int = 0,
                    block_cells: int = BLOCK_CELLS, device: str | torch.device = "cpu",
                    progress: bool = False, blocks: range | None = None) -> Iterator[sp.csr_matrix]:
    """Yield cells x genes CSR int32 count chunks, in cell order, covering ``type_codes``.

    Every chunk holds whole RNG blocks (about ``chunk_cells`` cells, at least one block), so
    the concatenated output does not depend on ``chunk_cells``. ``blocks``: only these RNG
    blocks (a rank's share, starting on a chunk boundary), giving the same chunks as the whole run.
    """
    type_codes = np.asarray(type_codes, dtype=np.int64)
    n_cells = len(type_codes)
    blocks_per_chunk = max(1, -(-int(chunk_cells) // block_cells))
    n_blocks = -(-n_cells // block_cells)
    blocks = range(n_blocks) if blocks is None else blocks
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=min(n_cells, blocks.stop * block_cells) - blocks.start * block_cells if len(blocks) else 0,
                   unit="cell", desc="generating", mininterval=2.0)
    pending: list[sp.csr_matrix] = []
    with torch.inference_mode():
        for block in blocks:
            start, stop = block * block_cells, min(n_cells, (block + 1) * block_cells)
            codes = torch.from_numpy(type_codes[start:stop]).to(device)
            counts = sampler(codes, block_generator(seed, stream, block, device))
            pending.append(counts if sp.issparse(counts) else dense_to_csr(counts))
            if bar is not None:
                bar.update(stop - start)
            if len(pending) == blocks_per_chunk or block == blocks[-1]:
                yield pending[0] if len(pending) == 1 else sp.vstack(pending, format="csr")
                pending = []
    if bar is not None:
        bar.close()


def dense_to_csr(counts: torch.Tensor) -> sp.csr_matrix:
    """Integer-valued float counts [n, G] (any device) -> CSR int32, without a dense int copy."""
    counts = counts.detach()
    rows, cols = torch.nonzero(counts, as_tuple=True)
    values = counts[rows, cols]
    if values.numel() and not torch.equal(values, values.round()):
        raise ValueError("the sampler returned non-integer counts")
    n_rows, n_cols = counts.shape
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows.cpu().numpy(), minlength=n_rows), out=indptr[1:])
    return sp.csr_matrix((values.cpu().numpy().astype(np.int32), cols.cpu().numpy().astype(np.int32), indptr),
                         shape=(n_rows, n_cols))


# ----------------------------------------------------------------------------- fast MTX text
def _digits(values: np.ndarray) -> np.ndarray:
    """Number of decimal digits of non-negative integers."""
    return np.searchsorted(10 ** np.arange(1, 19, dtype=np.int64), values, side="right") + 1


def _ascii_field(values: np.ndarray, width: int) -> np.ndarray:
    """Right-aligned ASCII digits of non-negative integers, NUL-padded on the left: [n] of V{width}."""
    values = values.astype(np.int64)
    chars = np.empty((len(values), width), dtype=np.uint8)
    rest = values
    for pos in range(width - 1, -1, -1):
        rest, digit = np.divmod(rest, 10)
        chars[:, pos] = digit + 48
    chars[np.arange(width)[None, :] < (width - _digits(values))[:, None]] = 0
    return chars.view(np.dtype((np.void, width))).ravel()


def format_triplets(first: np.ndarray, second: np.ndarray, third: np.ndarray) -> bytes:
    """``b"first second third\\n"`` lines for non-negative integer arrays, vectorised.

    Each number is right-aligned in a fixed-width, NUL-padded byte field, gathered from a
    small table of the values' range when that is shorter than the column (gene ids, a
    chunk's cell ids, counts); dropping the NUL bytes then leaves the text. About 10x faster
    than ``np.savetxt``.
    """
    columns = [np.asarray(c) for c in (first, second, third)]
    n = len(columns[0])
    if n == 0:
        return b""
    fields = []
    for column in columns:
        low, high = int(column.min()), int(column.max())
        width = int(_digits(np.array([high]))[0])
        if high - low + 1 < n:  # short range: format each distinct value once, then gather
            fields.append((width, _ascii_field(np.arange(low, high + 1), width)[column - low]))
        else:
            fields.append((width, _ascii_field(column, width)))
    layout = np.dtype([("a", f"V{fields[0][0]}"), ("s1", "u1"), ("b", f"V{fields[1][0]}"), ("s2", "u1"),
                       ("c", f"V{fields[2][0]}"), ("nl", "u1")])
    lines = np.empty(n, dtype=layout)
    lines["a"], lines["b"], lines["c"] = fields[0][1], fields[1][1], fields[2][1]
    lines["s1"] = lines["s2"] = ord(" ")
    lines["nl"] = ord("\n")
    chars = lines.view(np.uint8)
    return chars[chars != 0].tobytes()


def mtx_lines(chunk: sp.csr_matrix, first_cell: int) -> bytes:
    """matrix.mtx lines (genes x cells, 1-based "gene cell count") of a sorted CSR chunk whose first
    row is cell ``first_cell`` (0-based) of the dataset."""
    cells = np.repeat(np.arange(chunk.shape[0], dtype=np.int64) + first_cell + 1, np.diff(chunk.indptr))
    return format_triplets(chunk.indices.astype(np.int64) + 1, cells, chunk.data)


# ----------------------------------------------------------------------------- writer
@dataclass
class DatasetWriter:
    """Write a generated dataset folder chunk by chunk; files appear only when ``close`` succeeds.

    genes: the model's genes (var_names); type_codes: partition code of every cell, in the
    order chunks will arrive; cell_types: names of codes 0..K-1; gene_ids: the genes' ids for
    genes.tsv's first column (None: the symbols again, 10x's layout either way).
    """
    folder: Path
    genes: Sequence[str]
    type_codes: np.ndarray
    cell_types: Sequence[str]
    sample: str = "sample"
    gene_ids: Sequence[str] | None = None
    n_written: int = 0
    nnz: int = 0
    _tmp: list = field(default_factory=list)

    def __post_init__(self):
        import h5py

        self.folder = Path(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.type_codes = np.asarray(self.type_codes, dtype=np.int64)
        self.n_cells, self.n_genes = len(self.type_codes), len(self.genes)
        self.barcodes = [f"{self.sample}_{i:07d}" for i in range(self.n_cells)]
        self._body_path = self.folder / f".{MATRIX}.body.tmp"
        self._h5_path = self.folder / f".{H5AD}.partial.tmp"
        self._tmp = [self._body_path, self._h5_path]
        self._body = open(self._body_path, "wb")
        self._write_h5ad_skeleton()
        self._h5 = h5py.File(self._h5_path, "a")
        group = self._h5.create_group("X")
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = np.array([self.n_cells, self.n_genes], dtype=np.int64)
        chunk = (1 << 18,)
        self._data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=chunk)
        self._indices = group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=chunk)
        self._indptr = group.create_dataset("indptr", shape=(self.n_cells + 1,), dtype=np.int64)
        self._indptr[0] = 0

    def _obs(self) -> pd.DataFrame:
        names = [str(c) for c in self.cell_types]
        return pd.DataFrame({
            "cell_type": pd.Categorical.from_codes(self.type_codes, categories=names),
            "partition": self.type_codes,
            "sample": pd.Categorical([self.sample] * self.n_cells),
        }, index=pd.Index(self.barcodes, name="barcode"))

    def _write_h5ad_skeleton(self) -> None:
        import anndata as ad

        adata = ad.AnnData(obs=self._obs(), var=pd.DataFrame(index=pd.Index([str(g) for g in self.genes], name="gene")))
        adata.write_h5ad(self._h5_path)  # no X yet: it is appended below

    def append(self, chunk: sp.csr_matrix, mtx: bool = True) -> None:
        """Add the next cells (cells x genes CSR, integer counts). ``mtx=False``: to cells.h5ad only,
        their matrix.mtx lines come from :meth:`append_mtx_lines` (a rank's part, already formatted)."""
        chunk = sp.csr_matrix(chunk)
        n_rows = chunk.shape[0]
        if chunk.shape[1] != self.n_genes or self.n_written + n_rows > self.n_cells:
            raise ValueError(f"chunk of shape {chunk.shape} does not fit {self.n_cells} cells x {self.n_genes} genes "
                             f"({self.n_written} written)")
        chunk.sort_indices()
        start, stop = self.nnz, self.nnz + chunk.nnz
        self._data.resize((stop,))
        self._indices.resize((stop,))
        self._data[start:stop] = chunk.data.astype(np.int32, copy=False)
        self._indices[start:stop] = chunk.indices.astype(np.int32, copy=False)
        self._indptr[self.n_written + 1:self.n_written + n_rows + 1] = chunk.indptr[1:].astype(np.int64) + start
        if mtx:
            self._body.write(mtx_lines(chunk, self.n_written))
        self.n_written += n_rows
        self.nnz = stop

    def append_mtx_lines(self, path: Path) -> None:
        """Copy matrix.mtx lines written by :func:`mtx_lines` elsewhere (in cell order)."""
        with open(path, "rb") as lines:
            shutil.copyfileobj(lines, self._body, length=1 << 24)

    def close(self) -> None:
        """Check every cell arrived, then move all files into place.

        Every file is first complete under a temporary name; the renames then follow each other
        at once, so a crash leaves the folder's previous set of files or the new one, not a mix
        (but for the microseconds of the renames).
        """
        self._body.close()
        self._h5.close()
        if self.n_written != self.n_cells:
            raise ValueError(f"only {self.n_written} of {self.n_cells} cells were written")
        with contextlib.ExitStack() as renames:  # each atomic_path renames on a clean exit
            tmp = renames.enter_context(atomic_path(self.folder / MATRIX))
            with open(tmp, "wb") as out, open(self._body_path, "rb") as body:
                out.write(b"%%MatrixMarket matrix coordinate integer general\n")
                out.write(b"% bulk2sc generated counts, genes x cells\n")
                out.write(f"{self.n_genes} {self.n_cells} {self.nnz}\n".encode())
                shutil.copyfileobj(body, out, length=1 << 24)
            for name, lines in ((GENES, gene_lines(self.genes, self.gene_ids)), (BARCODES, self.barcodes)):
                renames.enter_context(atomic_path(self.folder / name)).write_text("".join(f"{x}\n" for x in lines))
            clusters = pd.DataFrame({"partition": self.type_codes,
                                     "cell_type": np.asarray([str(c) for c in self.cell_types])[self.type_codes]})
            clusters.to_csv(renames.enter_context(atomic_path(self.folder / CLUSTERS)), index=False)
            renames.callback(os.replace, self._h5_path, self.folder / H5AD)  # registered last: runs first
        self._body_path.unlink()

    def abort(self) -> None:
        for handle in (self._body, self._h5):
            try:
                handle.close()
            except Exception:  # noqa: BLE001 - best effort on the error path
                pass
        for path in self._tmp:
            if Path(path).exists():
                Path(path).unlink()

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def evaluation_subset(n_cells: int, max_cells: int, seed: int) -> np.ndarray:
    """Sorted indices of the (at most ``max_cells``) generated cells kept in memory for metrics."""
    if n_cells <= max_cells:
        return np.arange(n_cells)
    return np.sort(np.random.default_rng(seed).choice(n_cells, size=max_cells, replace=False))


def write_generated(folder: Path, sampler: Sampler, genes: Sequence[str], cell_types: Sequence[str],
                    counts_per_type: Sequence[int], seed: int, chunk_cells: int, stream: int = 0,
                    sample: str = "sample", keep_cells: int = 0, device: str | torch.device = "cpu",
                    block_cells: int = BLOCK_CELLS, progress: bool = True,
                    gene_ids: Sequence[str] | None = None) -> tuple[np.ndarray, sp.csr_matrix]:
    """Generate and write one dataset folder; return (type codes, counts of a kept subset).

    The kept subset (at most ``keep_cells`` cells, chosen with ``seed``) is what the
    evaluation sees, so memory stays bounded however many cells are written. Returns the
    codes of the kept cells and their cells x genes CSR counts.
    """
    type_codes = type_codes_from_counts(counts_per_type)
    keep = evaluation_subset(len(type_codes), keep_cells, seed)
    kept: list[sp.csr_matrix] = []
    offset = 0
    with DatasetWriter(folder, genes, type_codes, cell_types, sample=sample, gene_ids=gene_ids) as writer:
        for chunk in generate_chunks(sampler, type_codes, seed, chunk_cells, stream=stream,
                                     block_cells=block_cells, device=device, progress=progress):
            writer.append(chunk)
            rows = keep[(keep >= offset) & (keep < offset + chunk.shape[0])] - offset
            if len(rows):
                kept.append(chunk[rows])
            offset += chunk.shape[0]
    kept_counts = sp.vstack(kept, format="csr") if kept else sp.csr_matrix((0, len(genes)), dtype=np.int32)
    return type_codes[keep], kept_counts


def sample_in_memory(sampler: Sampler, type_codes: np.ndarray, seed: int, stream: int = 0,
                     chunk_cells: int = 4096, device: str | torch.device = "cpu",
                     block_cells: int = BLOCK_CELLS) -> sp.csr_matrix:
    """All cells of ``type_codes`` as one CSR (for baselines and small evaluations)."""
    chunks = list(generate_chunks(sampler, type_codes, seed, chunk_cells, stream=stream,
                                  block_cells=block_cells, device=device))
    if not chunks:
        raise ValueError("no cells to sample")
    return sp.vstack(chunks, format="csr")
