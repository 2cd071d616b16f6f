"""The fit of each sample's shifts (and, optionally, its type shares) to its bulk: see :mod:`models.condition`."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from models.condition.model import (_expected_means, expected_log_means, latent_draws, prior_whitener,
                                    type_moments)
from models.condition.targets import (denoise_targets, fit_composition, log_profile, log_profile_noise, pearson,
                                      pseudo_bulk_profile, relative_targets)

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
