"""Conditioning the generator on a bulk sample's expression, not only its proportions.

Without it, two bulks of the same composition (one from resting, one from stimulated cells)
give the same cells. Here each bulk sample s gets, per cell type k, a shift that makes the
expected pseudo-bulk of its generated cells reproduce the bulk:

    log E[mean count of gene g in a type-k cell of sample s]
        = log m_kg(z + u_sk)  +  d_kg  +  e_sg

- ``m_kg(z + u_sk)``: the frozen decoder's mean (with stage 3's calibration), averaged over
  fixed draws of the type's z prior moved by a latent shift ``u_sk`` [K, Z]. The shift is
  penalised by its Mahalanobis length under the type's prior, so a type's cells stay that type
  (the GMVAE's own assignment pi is checked on the conditioned cells);
- ``e_sg``: a per-sample, per-gene log factor shared by every type (what one bulk identifies
  best: the sample's overall change of each gene);
- ``d_kg``: a per-type, per-gene deviation from that shared factor, fitted jointly over all the
  samples given together (the regression behind CIBERSORTx high resolution and bMIND:
  bulk_s(g) ~ sum_k n_sk mu_k(g) exp(delta_kg)); proportions that vary across samples make it
  identifiable. It is shrunk to zero (a ridge), so with one bulk, or a type too rare to be seen,
  it falls back to the shared factor.

The fit matches log(profile + PSEUDO) over the genes the bulk and the model share, where a
profile is expression normalised to sum 1 over those genes (so library size and sequencing depth
drop out; UMI counts, CPM or TPM all work):

- **absolute**: the bulk's own profile (a bulk from the reference's platform);
- **relative**: the model's unshifted pseudo-bulk of a baseline, times the ratio of the sample's
  profile to the baseline's (a ``BULK_BASELINE`` of control samples, or the cohort's mean).
  Gene-wise platform factors (length bias, capture efficiency) cancel in the ratio.

Before the fit, what each gene's residual owes to sampling (the bulk's cells, its depth, the
model's own training cells) is thresholded away (:func:`log_profile_noise`,
:func:`denoise_targets`), so the reference's own bulk asks for almost no change.

Pure functions on tensors and arrays; stage 5 does the I/O. Seeded: the same generator seed
gives the same fit.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from models.utils import InputError

log = logging.getLogger(__name__)

MODES = ("absolute", "relative")
CONTRACTION = 0.75  # a round of the composition re-estimate counts only if it moves the shares <= this x the last


@dataclass
class ConditionSettings:
    """How the shifts are fitted (stage 5's CONDITION_* settings)."""

    latent: bool = False  # fit the latent shift u [K, Z] through the decoder (10x slower; no gain on Kang)
    latent_penalty: float = 0.01  # x mean_k |L_k^-1 u_k|^2 (L: Cholesky of the type's prior covariance)
    gene_penalty: float = 1e-3  # x mean_g c_g^2 (the per-gene factor every sample shares: weak, the bulks identify it)
    sample_penalty: float = 0.1  # x mean_sg e_sg^2 (each sample's own per-gene factor, over c)
    type_penalty: float = 0.003  # x mean_kg d_kg^2 (the per-type deviation: shrunk to the shared factor)
    pseudo: float = 1e-5  # added to profiles (which sum to 1) before the log: ~10 per million
    n_draws: int = 32  # fixed z draws per type for the latent fit's expectation
    n_base_draws: int = 256  # z draws per type for the unshifted type profiles
    latent_steps: int = 60  # Adam steps of the per-sample latent fit
    gene_steps: int = 1000  # Adam steps of the per-gene fit (300 left Kang unconverged: type-specific r 0.39 vs 0.53)
    lr: float = 0.05
    max_log_shift: float = math.log(1000.0)  # the per-gene log factors are clipped to this (a safety bound)
    tolerance: float = 1e-3  # relative loss change over the last tenth of the steps: above = not converged
    frequency: bool = True  # a gene shift changes burst frequency (theta, dropout odds move too: GMVAE.generative_params)
    noise_threshold: float = 2.0  # a gene's pseudo-bulk moves only beyond this many sds of its sampling noise (0: fits noise)
    library_weight: float = 0.0  # x mean_sk (log change of type k's expected library in sample s)^2; 0 = free
    noise_gamma: float = 2.0  # ... and in full beyond gamma x that many (MCP, gamma > 1; a linear ramp between)
    composition_rounds: int = 0  # absolute mode: re-estimate each sample's type shares with the shifts this many times
    composition_steps: int = 200  # Adam steps of each re-estimate, and of the warm refit of the shifts after it (300:
    #                               the same Kang composition, MAE 0.0461 against 0.0462, 1.4x the time)


@dataclass
class SampleCondition:
    """One sample's fitted conditioning (CPU float32 tensors) and its diagnostics."""

    z_shift: torch.Tensor  # [K, Z] added to z before the decoder
    log_mean_shift: torch.Tensor  # [K, G] added to the log means after the decoder (d_k + e_s)
    log_fold_change: torch.Tensor  # [K, G] total change of each type's expected mean (latent + genes)
    r_before: float  # r(log profile of the target, of the unconditioned pseudo-bulk) over shared genes
    r_after: float  # the same for the conditioned pseudo-bulk
    residual: float  # mean squared log residual after the fit
    converged: bool
    composition: torch.Tensor | None = None  # [K] type shares re-estimated with the shifts (None: the given ones kept)
    diagnostics: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"r_before": self.r_before, "r_after": self.r_after, "residual": self.residual,
                "converged": self.converged, **self.diagnostics}


# ----------------------------------------------------------------------------- bulk -> profiles
def bulk_profiles(bulk: pd.DataFrame, genes, min_shared_genes: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(profiles [S, G] float64, shared [G] bool) of a samples x genes bulk over the model's ``genes``.

    Each row is normalised to sum 1 over the genes it shares with the model; genes the bulk
    lacks get 0 and ``shared`` False. Fewer than ``min_shared_genes`` shared is an InputError
    naming ``source``.
    """
    genes = pd.Index([str(g) for g in genes])
    columns = pd.Index([str(c) for c in bulk.columns])
    shared = genes.isin(columns)
    if int(shared.sum()) < min_shared_genes:
        from models.genes import describe_mismatch

        raise InputError(f"{source}: only {int(shared.sum())} of its genes are among the GMVAE's {len(genes)} "
                         f"(CONDITION_MIN_GENES={min_shared_genes}): {describe_mismatch(list(columns), list(genes))}; "
                         "or pass --CONDITION=none")
    values = bulk.set_axis(columns, axis=1).reindex(columns=genes).to_numpy(dtype=np.float64)
    values = np.where(shared[None, :], np.nan_to_num(values), 0.0)
    totals = values.sum(axis=1, keepdims=True)
    if (totals <= 0).any():
        bad = [str(s) for s in np.asarray(bulk.index)[totals[:, 0] <= 0][:3]]
        raise InputError(f"{source}: samples {bad} have no expression on the GMVAE's genes (all zero); "
                         "drop them from the table, or pass --CONDITION=none")
    return values / totals, shared


def bulk_depths(bulk: pd.DataFrame, genes, unit: str | None) -> np.ndarray | None:
    """[S] each sample's total count over the model's genes when the bulk is in counts, else None.

    ``unit``: stage 4's record of it ("counts" / "TPM"); None (a BULK given to stage 5 directly):
    counts when every value is a whole number and no row sums to a million (CPM or TPM).
    """
    if unit is not None and unit != "counts":
        return None
    columns = pd.Index([str(c) for c in bulk.columns])
    values = bulk.to_numpy(dtype=np.float64)[:, columns.isin(pd.Index([str(g) for g in genes]))]
    if unit is None:
        whole = np.allclose(values, np.round(values))
        sums = bulk.to_numpy(dtype=np.float64).sum(1)
        if not whole or np.allclose(sums, 1e6, rtol=1e-3):
            return None
    return values.sum(1)


# ----------------------------------------------------------------------------- the frozen model
def _expected_means(model, z: torch.Tensor, log_calibration: torch.Tensor) -> torch.Tensor:
    """E[count] per (draw, gene) = (1 - dropout) x mean, [N, G], with the calibration's log factor [N, G]."""
    log_mu, _, zi_logits = model.decode(z)
    log_mu = log_mu.float() + log_calibration
    if zi_logits is not None:
        log_mu = log_mu + torch.nn.functional.logsigmoid(-zi_logits.float())
    return log_mu


def latent_draws(model, n_draws: int, noise_scale: float, prior: str, generator: torch.Generator) -> torch.Tensor:
    """Fixed z draws [K, n_draws, Z] from each type's prior (the sampler's ``prior``, ``noise_scale``)."""
    codes = torch.arange(model.n_types).repeat_interleave(n_draws).to(model.onehot.device)
    z, _ = model.draw_prior(codes, generator, noise_scale, source=prior)
    return z.reshape(model.n_types, n_draws, model.z_dim)


@torch.no_grad()
def type_moments(model, z: torch.Tensor, calibrate: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log E[mean], effective dropout logits, log Var[count]), each [K, G], of each type's cells over ``z`` [K, M, Z].

    The expected count is E[(1 - dropout) x mean] = exp(log E[mean]) x sigmoid(-logits): the
    logits are those of one dropout probability that gives the same expectation. The variance is
    that of one cell's count (the ZINB at each draw, plus the spread of its mean over the draws):
    what a pseudo-bulk of n such cells varies by, n times.
    """
    log_means, logits, log_variances = [], [], []
    for k in range(model.n_types):
        calibration = model.mean_log_ratio[k] if calibrate else torch.zeros(model.n_genes, device=z.device)
        log_mu, log_theta, zi_logits = model.decode(z[k])
        log_mu = log_mu.float() + calibration
        mean = torch.logsumexp(log_mu, 0) - math.log(z.shape[1])
        log_keep = torch.zeros_like(log_mu) if zi_logits is None else torch.nn.functional.logsigmoid(-zi_logits.float())
        if zi_logits is None:
            keep = torch.zeros_like(mean)
        else:
            keep = torch.logsumexp(log_mu + log_keep, 0) - math.log(z.shape[1]) - mean
        keep = keep.clamp(max=-1e-7)
        # E[x^2] of a ZINB: (1 - pi) (mu + mu^2 (1 + 1/theta)); float32 is enough, Var >= E (the Poisson part)
        log_kept_mu = log_keep + log_mu
        second = torch.logsumexp(log_kept_mu + torch.log1p(log_mu.exp() * (1.0 + torch.exp(-log_theta.float()))),
                                 0) - math.log(z.shape[1])
        first = torch.logsumexp(log_kept_mu, 0) - math.log(z.shape[1])
        variance = (second.exp() - (2.0 * first).exp()).clamp_min(1e-30)
        log_means.append(mean)
        logits.append(torch.log(-torch.expm1(keep)) - keep)
        log_variances.append(torch.log(variance))
    return torch.stack(log_means), torch.stack(logits), torch.stack(log_variances)


def type_log_means(model, z: torch.Tensor, calibrate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(log E[mean], effective dropout logits), each [K, G]: :func:`type_moments` without the variance."""
    return type_moments(model, z, calibrate)[:2]


def expected_log_means(log_means: torch.Tensor, logits: torch.Tensor, gene_shift, frequency: bool) -> torch.Tensor:
    """log E[count] after a per-gene log shift of the mean (with ``frequency``, of the dropout odds too).

    Mirrors ``GMVAE.generative_params``: log mean + shift, dropout logits - shift.
    """
    return log_means + gene_shift + torch.nn.functional.logsigmoid(-(logits - gene_shift if frequency else logits))


def prior_whitener(model, prior: str, noise_scale: float) -> torch.Tensor:
    """[K, Z, Z] inverse Cholesky factors of the types' z priors: |W_k u| is u's Mahalanobis length."""
    if prior == "posterior" and bool(model.post_fitted):
        chol = model.post_chol * noise_scale
    else:
        _, p_logvar = model.prior_params()
        chol = torch.diag_embed(torch.exp(0.5 * p_logvar) * noise_scale)
    eye = torch.eye(model.z_dim, device=chol.device).expand_as(chol)
    return torch.linalg.solve_triangular(chol.detach().float(), eye, upper=False)


# ----------------------------------------------------------------------------- targets
def log_profile(profiles: torch.Tensor, pseudo: float) -> torch.Tensor:
    return torch.log(profiles + pseudo)


def pseudo_bulk_profile(log_means: torch.Tensor, cells: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """Profiles [S, G] (sum 1 over ``shared``) of sum_k cells[s, k] exp(log_means[s, k, g]).

    log_means: [S, K, G] or [K, G]; cells: [S, K] cell counts (or shares).
    """
    log_cells = torch.log(cells.clamp_min(0.0))[:, :, None]
    log_bulk = torch.logsumexp(log_cells + log_means, dim=1)  # [S, G]
    log_bulk = log_bulk.masked_fill(~shared, -math.inf)
    return torch.exp(log_bulk - torch.logsumexp(log_bulk, dim=1, keepdim=True))


def log_profile_noise(log_means: torch.Tensor, log_variances: torch.Tensor, cells: torch.Tensor,
                      shared: torch.Tensor, pseudo: float, depths: torch.Tensor | None = None,
                      reference_cells: torch.Tensor | None = None) -> torch.Tensor:
    """sd [S, G] of log(profile + pseudo) of a bulk of ``cells`` [S, K] when nothing is shifted.

    What the bulk of these cells varies by from sampling alone: which cells were sequenced (the
    model's per-cell variance beyond Poisson, ``log_variances`` [K, G] from :func:`type_moments`,
    summed over the cells) and the counting of its ``depths`` [S] reads or UMIs (Poisson; None:
    the depth the model expects of these cells, a nominal one for CPM/TPM). A pseudo-bulk of n
    cells whose gene g sums to C counts has a relative variance of 1/C + (between-cell variance)
    / (n mean^2); through the log and the pseudo-count, it is scaled by p / (p + pseudo).
    ``reference_cells`` [K]: the training cells of each type, whose means the model's were
    calibrated to: they vary by sampling too, and so does the model's pseudo-bulk (None: not counted).
    log_means: [K, G] log E[count] of a cell of each type (unshifted).
    """
    cells = cells.double()
    mean_cell = log_means.double().exp()
    bulk = cells @ mean_cell  # [S, G] expected counts of the cells
    excess = cells @ (log_variances.double().exp() - mean_cell).clamp_min(0.0)
    if reference_cells is not None:  # the error of each type's mean: its per-cell variance / its training cells
        excess = excess + (cells ** 2) @ (log_variances.double().exp() / reference_cells.double().clamp_min(1.0)[:, None])
    bulk = bulk.masked_fill(~shared, 0.0)
    model_depth = bulk.sum(1, keepdim=True)
    depth = model_depth if depths is None else depths.double().reshape(-1, 1)
    profile = bulk / model_depth
    variance = profile / depth + excess.masked_fill(~shared, 0.0) / model_depth ** 2  # of the profile
    sd = variance.sqrt() / (profile + pseudo)
    return sd.masked_fill(~shared, 0.0).float()


def offset_of(targets: torch.Tensor, unshifted: torch.Tensor, shared: torch.Tensor, pseudo: float) -> torch.Tensor:
    """[S, 1] the median over well-expressed shared genes of log(target profile / unshifted profile).

    Profiles sum to 1, so when some genes rise every other gene's share falls by the same factor:
    a per-sample offset that is not a change of those genes. Most genes do not change, so their
    median ratio is that offset (the median-of-ratios idea of DESeq2's size factors).
    targets, unshifted: [S, G] log(profile + pseudo).
    """
    expressed = shared[None, :] & (unshifted > math.log(11.0 * pseudo))  # profile above 10 x pseudo
    ratio = torch.log((targets.exp() - pseudo).clamp_min(0.0) + 1e-30) - torch.log(unshifted.exp() - pseudo)
    offsets = [torch.median(ratio[s][expressed[s]]) if bool(expressed[s].any()) else torch.zeros(())
               for s in range(len(targets))]
    return torch.stack(offsets).reshape(-1, 1).clamp(-5.0, 5.0)


def denoise_targets(targets: torch.Tensor, unshifted: torch.Tensor, noise: torch.Tensor, shared: torch.Tensor,
                    pseudo: float, threshold: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets with their sampling noise thresholded away, [S, G] bool: the genes kept beyond the noise).

    Each gene's residual r_s = target_s - u_s, where u is the unshifted log profile moved by the
    sample's offset (:func:`offset_of`), is weighed against its noise (``noise``, from
    :func:`log_profile_noise`) over all the samples given together: sum_s (r_s / noise_s)^2 is
    chi-square with S degrees of freedom when the gene does not change, and its tail
    probability is read as an equivalent |z|. The gene's residuals are kept times the
    minimax-concave (MCP) factor of that |z|: 0 up to ``threshold``, 1 beyond ``gamma`` x
    ``threshold``, a linear ramp of the change between (a firm threshold). With one sample that
    is the MCP estimate of r itself. A bulk that differs from the model by sampling alone (the
    reference's own cells) then asks for almost no change; a change of a well-measured gene, or
    one that many samples share, is kept in full, without the shrinkage bias of a ridge or a
    soft threshold. ``threshold`` 0 keeps the targets.
    """
    if threshold <= 0:
        return targets, shared[None, :].expand_as(targets).clone()
    from scipy import stats

    offset = offset_of(targets, unshifted, shared, pseudo)
    moved = torch.log((unshifted.exp() - pseudo).clamp_min(0.0) * offset.exp() + pseudo)
    residual = targets - moved
    z = (residual / noise.clamp_min(1e-12)).masked_fill(~shared[None, :], 0.0)
    statistic = (z.double() ** 2).sum(0).numpy()
    equivalent = torch.as_tensor(stats.norm.isf(0.5 * stats.chi2.sf(statistic, len(targets))))  # [G]
    factor = ((equivalent - threshold).clamp_min(0.0) * gamma / ((gamma - 1.0) * equivalent.clamp_min(1e-12)))
    factor = torch.where(equivalent > gamma * threshold, torch.ones_like(factor), factor).float()
    beyond = (factor > 0)[None, :] & shared[None, :]
    return torch.where(shared[None, :], moved + factor * residual, targets), beyond.expand_as(targets).clone()


def fit_composition(log_means: torch.Tensor, target: torch.Tensor, shared: torch.Tensor, pseudo: float,
                    steps: int = 300, lr: float = 0.1, init: torch.Tensor | None = None) -> torch.Tensor:
    """Type shares [S, K] whose pseudo-bulks best match the log profiles ``target`` [S, G].

    log_means: [K, G] or [S, K, G] each type's log expected counts; ``init`` [S, K] the shares to
    start from (None: equal shares). The same log-profile loss as the fit: a composition estimate
    on the model's own type profiles (for a baseline bulk whose composition is not given, and for
    the re-estimate beside the shifts).
    """
    n_samples, n_types = len(target), log_means.shape[-2]
    start = torch.zeros(n_samples, n_types) if init is None else torch.log(init.float().clamp_min(1e-4))
    logits = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        pred = log_profile(pseudo_bulk_profile(log_means, torch.softmax(logits, -1), shared), pseudo)
        loss = ((pred - target) ** 2)[:, shared].mean()
        loss.backward()
        optimizer.step()
    return torch.softmax(logits.detach(), -1)


def relative_targets(log_means: torch.Tensor, profiles: torch.Tensor, baseline: torch.Tensor,
                     baseline_cells: torch.Tensor, shared: torch.Tensor, pseudo: float) -> torch.Tensor:
    """Log-profile targets [S, G] of the relative mode.

    The model's own unshifted pseudo-bulk of the baseline (composition ``baseline_cells`` [K]),
    times the sample's ratio to the baseline profile [G]: what the sample would look like on
    the reference's platform, if the platform's effect is a factor per gene.
    """
    model_baseline = log_profile(pseudo_bulk_profile(log_means, baseline_cells[None, :], shared), pseudo)
    return model_baseline + log_profile(profiles, pseudo) - log_profile(baseline[None, :], pseudo)


def pearson(first: torch.Tensor, second: torch.Tensor) -> float:
    first, second = first.double() - first.double().mean(), second.double() - second.double().mean()
    denominator = float(first.norm() * second.norm())
    return float((first * second).sum()) / denominator if denominator > 0 else float("nan")


# ----------------------------------------------------------------------------- the fit
def _converged(losses: list[float], tolerance: float) -> bool:
    tail = max(2, len(losses) // 10)
    if len(losses) < 2 * tail:
        return True
    before, after = losses[-tail], losses[-1]
    return (before - after) <= tolerance * max(abs(before), 1e-12)


def fit_latent(model, z: torch.Tensor, base: tuple[torch.Tensor, torch.Tensor], calibrate: bool,
               whitener: torch.Tensor, cells: torch.Tensor, target: torch.Tensor, shared: torch.Tensor,
               settings: ConditionSettings) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """One sample's latent shift u [K, Z] (with a shared per-gene factor alongside), through the decoder.

    z: [K, M, Z] fixed draws; base: :func:`type_log_means` of more draws; cells [K];
    target: [G] log profile. The shifted means are base + (log E over the draws at z + u) - (the
    same at z): the change is estimated with common random numbers, the level keeps ``base``'s
    precision. Returns (u, change of the type log means [K, G], losses).
    """
    n_types, n_draws, z_dim = z.shape
    flat = z.reshape(-1, z_dim)
    codes = torch.arange(n_types, device=z.device).repeat_interleave(n_draws)
    calibration = (model.mean_log_ratio if calibrate else torch.zeros_like(model.mean_log_ratio))[codes]

    def change_at(shift):
        shifted = _expected_means(model, flat + shift[codes], calibration).reshape(n_types, n_draws, -1)
        return torch.logsumexp(shifted, 1) - at_zero

    with torch.no_grad():
        at_zero = torch.logsumexp(_expected_means(model, flat, calibration).reshape(n_types, n_draws, -1), 1)
    shift = torch.zeros(n_types, z_dim, requires_grad=True)
    gene = torch.zeros(model.n_genes, requires_grad=True)
    optimizer = torch.optim.Adam([shift, gene], lr=settings.lr)
    losses = []
    for _ in range(settings.latent_steps):
        optimizer.zero_grad()
        log_means = expected_log_means(base[0], base[1], gene[None, :], settings.frequency) + change_at(shift)
        pred = log_profile(pseudo_bulk_profile(log_means, cells[None, :], shared), settings.pseudo)[0]
        fit = ((pred - target) ** 2)[shared].mean()
        penalty = settings.latent_penalty * (torch.einsum("kij,kj->ki", whitener, shift) ** 2).sum(-1).mean()
        loss = fit + penalty + settings.gene_penalty * (gene ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        change = change_at(shift)
    return shift.detach(), change, losses


def fit_genes(base: tuple[torch.Tensor, torch.Tensor], changes: torch.Tensor, cells: torch.Tensor,
              targets: torch.Tensor, shared: torch.Tensor, settings: ConditionSettings,
              state: dict | None = None, steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Per-type deviations d [K, G] and per-sample gene factors c + e_s [S, G], fitted jointly.

    With ``settings.library_weight`` > 0 the second is [S, K, G]: a per-sample, per-type log
    depth l_sk is added to every gene, and the change of each type's expected library (its
    expected count summed over all genes) from the unshifted model is penalised, so that genes
    that rise take their share from the others, as in a cell sequenced to the same depth.

    The shift of type k in sample s is c_g + d_kg + e_sg: c (weak ridge) is what every sample
    and type share, d (``type_penalty``) what a type adds, shared by the samples, and e
    (``sample_penalty``) a sample's own change, shared by its types. A sample can only move d
    away from c through its composition, so d is identified by proportions that vary.

    base: :func:`type_log_means`; changes: [S, K, G] each sample's latent change of the type log
    means; cells: [S, K]; targets: [S, G] log profiles. Minimises mean_s mean_g (log profile -
    target)^2 plus the ridges. ``state``: a dict the fitted parameters are written to, and taken
    from when it holds them (a warm start: ``steps`` then replaces ``settings.gene_steps``).
    """
    n_samples, n_types, n_genes = changes.shape
    state = {} if state is None else state
    start = {"common": torch.zeros(n_genes), "types": torch.zeros(n_types, n_genes),
             "samples": torch.zeros(n_samples, n_genes), "depth": torch.zeros(n_samples, n_types, 1)}
    common, types, samples, depth = (state.get(name, value).clone() for name, value in start.items())
    for parameter in (common, types, samples):
        parameter.requires_grad_(True)
    depth.requires_grad_(settings.library_weight > 0)
    optimizer = torch.optim.Adam([common, types, samples, *([depth] if depth.requires_grad else [])], lr=settings.lr)
    with torch.no_grad():
        base_library = torch.logsumexp(expected_log_means(base[0], base[1], 0.0, False), -1)  # [K]
    losses = []
    for _ in range(settings.gene_steps if steps is None else steps):
        optimizer.zero_grad()
        shift = common + types[None] + samples[:, None, :] + depth
        log_means = expected_log_means(base[0][None], base[1][None], shift, settings.frequency) + changes
        pred = log_profile(pseudo_bulk_profile(log_means, cells, shared), settings.pseudo)
        fit = ((pred - targets) ** 2)[:, shared].mean()
        loss = (fit + settings.gene_penalty * (common ** 2).mean() + settings.type_penalty * (types ** 2).mean()
                + settings.sample_penalty * (samples ** 2).mean())
        if depth.requires_grad:
            library = torch.logsumexp(log_means - changes, -1)  # [S, K]: the gene shifts' change of it
            loss = loss + settings.library_weight * ((library - base_library) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    state.update(common=common.detach(), types=types.detach(), samples=samples.detach(), depth=depth.detach())
    per_sample = common[None] + samples
    return types.detach(), (per_sample[:, None, :] + depth if depth.requires_grad else per_sample).detach(), losses


def fit_conditions(model, cells: np.ndarray, profiles: np.ndarray, shared: np.ndarray, mode: str,
                   generator: torch.Generator, settings: ConditionSettings | None = None,
                   noise_scale: float = 1.0, prior: str = "posterior", calibrate: bool = True,
                   baseline: np.ndarray | None = None, baseline_cells: np.ndarray | None = None,
                   depths: np.ndarray | None = None, reference_cells: np.ndarray | None = None,
                   recompose: np.ndarray | None = None) -> list[SampleCondition]:
    """Fit every sample's conditioning; one :class:`SampleCondition` per row of ``profiles``.

    model: the frozen GMVAE (CPU; its parameters are set to requires_grad=False); cells: [S, K]
    cell counts per sample and type (the cells to be generated); profiles: [S, G] bulk profiles
    from :func:`bulk_profiles`; shared: [G] bool; mode: "absolute" or "relative". Relative:
    ``baseline`` [G] is the baseline's profile (None = the mean of ``profiles``) and
    ``baseline_cells`` [K] its composition (None: the samples' mean composition with the cohort
    mean; fitted to the baseline's profile when a baseline is given). ``noise_scale``, ``prior``,
    ``calibrate``: the sampler's, so the fit sees the cells that will be drawn. ``depths`` [S]:
    each bulk's total count over the shared genes when it is in counts (its Poisson noise); None
    (CPM, TPM): the depth the model expects of ``cells``. ``reference_cells`` [K]: the training
    cells per type (the model's own sampling error; None: left out). ``recompose`` [S] bool: the samples
    whose shares ``settings.composition_rounds`` re-estimates (None: all); the others keep theirs (their
    ``composition`` is None). The sampling noise of each bulk
    (:func:`log_profile_noise`, of ``cells`` at ``depths``) is thresholded away from the targets
    before the fit (:func:`denoise_targets`, ``settings.noise_threshold``); r before and after and
    the residual are against the bulk itself.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    settings = settings or ConditionSettings()
    start = time.perf_counter()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    cells_t = torch.as_tensor(np.asarray(cells, dtype=np.float64), dtype=torch.float32)
    profiles_t = torch.as_tensor(np.asarray(profiles), dtype=torch.float32)
    shared_t = torch.as_tensor(np.asarray(shared, dtype=bool))
    shares = cells_t / cells_t.sum(1, keepdim=True).clamp_min(1.0)
    *base, log_variances = type_moments(
        model, latent_draws(model, settings.n_base_draws, noise_scale, prior, generator), calibrate)
    unshifted_means = expected_log_means(base[0], base[1], 0.0, False)
    depths_t = None if depths is None else torch.as_tensor(np.asarray(depths, dtype=np.float64))
    reference_t = None if reference_cells is None else torch.as_tensor(np.asarray(reference_cells, dtype=np.float64))
    noise_factor = 1.0
    if mode == "absolute":
        targets = log_profile(profiles_t, settings.pseudo)
    else:
        if baseline is None:
            baseline_t = profiles_t.mean(0)
            composition = shares.mean(0) if baseline_cells is None else torch.as_tensor(baseline_cells).float()
        else:
            baseline_t = torch.as_tensor(np.asarray(baseline), dtype=torch.float32)
            composition = (torch.as_tensor(np.asarray(baseline_cells)).float() if baseline_cells is not None else
                           fit_composition(unshifted_means, log_profile(baseline_t, settings.pseudo)[None], shared_t,
                                           settings.pseudo)[0])
            log.info("baseline composition (fitted to the baseline bulk with the model's type profiles): %s",
                     ", ".join(f"{float(v):.3f}" for v in composition))
        targets = relative_targets(unshifted_means, profiles_t, baseline_t, composition / composition.sum(), shared_t,
                                   settings.pseudo)
        # the target is a ratio to the baseline, which varies too: by one sample's worth (a given baseline,
        # taken as conservatively as one bulk) or by the mean of the samples'
        noise_factor = math.sqrt(2.0 if baseline is not None else 1.0 + 1.0 / len(profiles_t))
    unshifted = log_profile(pseudo_bulk_profile(unshifted_means, shares, shared_t), settings.pseudo)

    def denoised(shares_now):  # what the bulk differs from the model by beyond its sampling noise: the fit's targets
        cells_now = cells_t if shares_now is shares else shares_now * cells_t.sum(1, keepdim=True)
        noise = noise_factor * log_profile_noise(unshifted_means, log_variances, cells_now, shared_t, settings.pseudo,
                                                 depths_t, reference_t)
        expected = log_profile(pseudo_bulk_profile(unshifted_means, shares_now, shared_t), settings.pseudo)
        return denoise_targets(targets, expected, noise, shared_t, settings.pseudo, settings.noise_threshold,
                               settings.noise_gamma)

    n_samples = len(cells_t)
    z_shifts = torch.zeros(n_samples, model.n_types, model.z_dim)
    changes = torch.zeros(n_samples, model.n_types, model.n_genes)
    latent_losses = [[] for _ in range(n_samples)]
    whitener = prior_whitener(model, prior, noise_scale)
    if settings.latent:
        z = latent_draws(model, settings.n_draws, noise_scale, prior, generator)
        for s in range(n_samples):
            z_shifts[s], changes[s], latent_losses[s] = fit_latent(model, z, base, calibrate, whitener, shares[s],
                                                                   targets[s], shared_t, settings)
    fit_targets, beyond = denoised(shares)
    state = {}
    types, genes, gene_losses = fit_genes(base, changes, shares, fit_targets, shared_t, settings, state)
    composition = shares
    rounds = settings.composition_rounds if mode == "absolute" else 0
    moves = torch.zeros(0, n_samples)  # [rounds, S] mean |change| of each sample's shares per round
    accepted = torch.zeros(n_samples, dtype=torch.long)  # rounds kept per sample
    active = (torch.ones(n_samples, dtype=torch.bool) if recompose is None else
              torch.as_tensor(np.asarray(recompose, dtype=bool)).reshape(n_samples))
    if not bool(active.any()):
        rounds = 0
    for round_ in range(rounds):
        # each sample's shares under the shifts that the samples share (the common factor, the type deviations):
        # a composition error that a sample's own gene factor would otherwise absorb is left to its shares
        shared_shift = state["common"] + state["types"][None] + state["depth"]
        typed = expected_log_means(base[0][None], base[1][None], shared_shift, settings.frequency) + changes
        moved = fit_composition(typed, targets, shared_t, settings.pseudo, settings.composition_steps,
                                lr=settings.lr, init=composition)
        move = (moved - composition).abs().mean(1)
        # a round counts for a sample while its moves shrink; where they do not, its shares and the type deviations
        # trade off (types its bulk cannot tell apart), so its shares stay where they were from then on
        keep = active & (move <= CONTRACTION * moves[-1] if round_ else active)
        moves = torch.cat([moves, move[None]])
        if not bool(keep.any()):
            break
        active, accepted = keep, accepted + keep.long()
        composition = torch.where(keep[:, None], moved, composition)
        fit_targets, beyond = denoised(composition)
        types, genes, gene_losses = fit_genes(base, changes, composition, fit_targets, shared_t, settings, state,
                                              steps=settings.composition_steps)
    genes = genes if genes.dim() == 3 else genes[:, None, :]
    gene_shift = (types[None] + genes).clamp(-settings.max_log_shift, settings.max_log_shift)
    log_means = expected_log_means(base[0][None], base[1][None], gene_shift, settings.frequency) + changes
    conditioned = log_profile(pseudo_bulk_profile(log_means, composition, shared_t), settings.pseudo)
    seconds = time.perf_counter() - start

    results = []
    converged_all = _converged(gene_losses, settings.tolerance)
    for s in range(n_samples):
        residual = float(((conditioned[s] - targets[s]) ** 2)[shared_t].mean())
        converged = converged_all and (not settings.latent or _converged(latent_losses[s], settings.tolerance))
        whitened = torch.einsum("kij,kj->ki", whitener, z_shifts[s]).norm(dim=-1)
        results.append(SampleCondition(
            z_shift=z_shifts[s], log_mean_shift=gene_shift[s], log_fold_change=log_means[s] - unshifted_means,
            r_before=pearson(unshifted[s][shared_t], targets[s][shared_t]),
            r_after=pearson(conditioned[s][shared_t], targets[s][shared_t]),
            residual=residual, converged=converged,
            composition=composition[s].clone() if rounds and (recompose is None or recompose[s]) else None,
            diagnostics={"mode": mode, "n_shared_genes": int(shared_t.sum()), "seconds": seconds / n_samples,
                         "mean_abs_log_fold_change": float((log_means[s] - unshifted_means).abs().mean()),
                         "noise_threshold": settings.noise_threshold,
                         "library_log_change": [float(v) for v in torch.logsumexp(log_means[s], -1)
                                                - torch.logsumexp(unshifted_means, -1)],
                         "genes_beyond_noise": int(beyond[s].sum()),
                         "composition_moves": [float(m) for m in moves[:, s]],
                         "composition_rounds": int(accepted[s]),
                         "latent_shift_sd": [float(v) for v in whitened]}))
    return results


# ----------------------------------------------------------------------------- checks
@torch.no_grad()
def own_type_share(model, sampler, n_types: int, n_per_type: int, generator: torch.Generator) -> list[float]:
    """Per type, the share of ``n_per_type`` cells drawn by ``sampler`` that the GMVAE's pi calls that type."""
    codes = torch.arange(n_types).repeat_interleave(n_per_type)
    counts = sampler(codes, generator)
    counts = torch.as_tensor(counts.toarray() if hasattr(counts, "toarray") else counts, dtype=torch.float32)
    called = model.class_logits(counts.to(model.onehot.device)).argmax(-1).cpu()
    return [float((called[codes == k] == k).float().mean()) for k in range(n_types)]


def top_shifted_genes(log_fold_change: np.ndarray, genes, cell_types, n_genes: int = 10) -> dict[str, pd.Series]:
    """Per type, the ``n_genes`` genes with the largest |log fold change| (signed values, by size)."""
    genes = np.asarray([str(g) for g in genes])
    out = {}
    for k, name in enumerate(cell_types):
        order = np.argsort(-np.abs(log_fold_change[k]), kind="stable")[:n_genes]
        out[str(name)] = pd.Series(log_fold_change[k][order], index=genes[order])
    return out


# ----------------------------------------------------------------------------- stage 5's choices
def choose_mode(requested: str, record: dict | None, has_baseline: bool, n_samples: int) -> tuple[str | None, str]:
    """(mode or None = do not condition, why) from CONDITION, stage 4's bulk record and the inputs.

    ``record``: stage 4's deconvolution/bulk.json for this bulk ({"protocol", "reference_protocol"}),
    or None when the bulk did not come through stage 4.
    """
    if requested not in ("auto", "none", *MODES):
        raise InputError(f"CONDITION must be 'auto', 'absolute', 'relative' or 'none', got {requested!r}")
    if requested == "none":
        return None, "CONDITION=none"
    if requested == "absolute":
        return "absolute", "CONDITION=absolute"
    if requested == "relative" or has_baseline:
        why = "CONDITION=relative" if requested == "relative" else "BULK_BASELINE is given"
        if not has_baseline and n_samples < 2:
            return None, f"{why}, but one bulk sample and no BULK_BASELINE leave nothing to compare with"
        return "relative", why + ("" if has_baseline else " (baseline: the mean of the samples)")
    if record is None:
        return "absolute", ("the bulk did not come through stage 4, so its platform is unknown: taken as the "
                            "reference's (pass --CONDITION=relative with BULK_BASELINE for another platform)")
    protocol, reference = record.get("protocol"), record.get("reference_protocol")
    if protocol is not None and protocol == reference:
        return "absolute", f"stage 4 read the bulk as {protocol} counts, as the reference's"
    what = f"{protocol} counts" if protocol else f"{record.get('unit', 'TPM')} of unknown protocol"
    if n_samples < 2:
        return None, (f"stage 4 read the bulk as {what} against a {reference} reference (another platform), and "
                      "one sample has nothing to compare with: pass BULK_BASELINE")
    return "relative", (f"stage 4 read the bulk as {what} against a {reference} reference (another platform): "
                        "log-ratios to the mean of the samples")


def align_samples(bulk: pd.DataFrame, samples, source: str) -> pd.DataFrame:
    """The bulk's rows in the order of the samples to generate (one and one match whatever the names)."""
    samples = [str(s) for s in samples]
    bulk = bulk.set_axis([str(s) for s in bulk.index], axis=0)
    if len(samples) == 1 and len(bulk) == 1:
        return bulk.set_axis(samples, axis=0)
    missing = [s for s in samples if s not in bulk.index]
    if missing:
        raise InputError(f"{source}: no bulk for samples {missing[:5]} (it has {list(bulk.index[:5])}); give the "
                         "bulk that stage 4 deconvolved, or pass --CONDITION=none")
    return bulk.loc[samples]


def save_npz(path, arrays: dict) -> None:
    """An .npz with fixed zip timestamps, so the same arrays give the same bytes (np.savez stamps the time)."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, value in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())
