"""A bulk as the fit's targets: profiles over the model's genes, their sampling noise, its removal.

A profile is expression normalised to sum 1 over the genes the bulk and the model share, so
library size and depth drop out (UMI counts, CPM or TPM all work); the fit compares
log(profile + pseudo). What a bulk differs from the model by within its sampling noise (its cells,
its depth, the model's own training cells) is thresholded away before the fit.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from models.utils import InputError


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
