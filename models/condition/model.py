"""The frozen GMVAE as the fit sees it: each type's expected counts, dropout and variance over z draws."""
from __future__ import annotations

import math

import torch


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
