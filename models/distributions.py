"""Count likelihoods in log space (scvi-tools style): negative binomial and zero-inflated NB.

Parametrisation (scvi-tools): mean ``mu`` > 0, inverse dispersion ``theta`` > 0 (variance
``mu + mu**2 / theta``) and, for ZINB, the dropout logit ``zi_logits`` (P(structural zero) =
sigmoid(zi_logits)). Everything is computed from ``log mu`` and ``log theta`` with ``softplus``,
never ``pow(theta / (mu + theta), theta)`` (which underflows in float32 where the model is
confident) and never ``torch.logaddexp`` (slow on CPU, see PERF_NOTES.md).

The ``*_from_logs`` functions are the ones the GMVAE uses: its decoder outputs log mu and
log theta directly, so no ``log(mu + eps)`` round trip is needed.

Sampling uses a Gamma-Poisson mixture drawn with an explicit ``torch.Generator``
(``torch._standard_gamma`` and ``torch.poisson`` both take one), so a seeded generator gives
the same counts every time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import Distribution, constraints

_EPS = 1e-8  # as scvi-tools: keeps log(mu) finite for mu == 0


def _log1pexp_neg_abs(value: torch.Tensor) -> torch.Tensor:
    """softplus(-|value|) = log(1 + exp(-|value|)), the correction term of a two-term logsumexp."""
    return F.softplus(-value.abs())


def log_nb_from_logs(x: torch.Tensor, log_mu: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """Elementwise NB log-probability from log mean and log inverse dispersion (broadcasting)."""
    theta = log_theta.exp()
    delta = log_mu - log_theta  # log(mu / theta)
    # theta * log(theta / (theta + mu)) = -theta * softplus(log mu - log theta)
    # x * log(mu / (theta + mu))        = -x * softplus(log theta - log mu)
    return (
        -theta * F.softplus(delta)
        - x * F.softplus(-delta)
        + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1.0)
    )


def log_zinb_from_logs(x: torch.Tensor, log_mu: torch.Tensor, log_theta: torch.Tensor,
                       zi_logits: torch.Tensor) -> torch.Tensor:
    """Elementwise ZINB log-probability from log mean, log inverse dispersion and dropout logits."""
    theta = log_theta.exp()
    delta = log_mu - log_theta
    nb_zero = -theta * F.softplus(delta)  # log NB(0)
    softplus_pi = F.softplus(zi_logits)  # -log(1 - sigmoid(pi))
    # x == 0: log(sigmoid(pi) + sigmoid(-pi) * NB(0)) = logsumexp(pi, log NB(0)) - softplus(pi)
    high = torch.maximum(zi_logits, nb_zero)
    zero_case = high + _log1pexp_neg_abs(zi_logits - nb_zero) - softplus_pi
    nonzero_case = (
        -softplus_pi + nb_zero - x * F.softplus(-delta)
        + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1.0)
    )
    return torch.where(x < 0.5, zero_case, nonzero_case)


def log_nb_positive(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """log NB(x; mu, theta), elementwise (scvi-tools ``log_nb_positive``)."""
    return log_nb_from_logs(x, torch.log(mu + eps), torch.log(theta + eps))


def log_zinb_positive(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor,
                      eps: float = _EPS) -> torch.Tensor:
    """log ZINB(x; mu, theta, zi_logits), elementwise (scvi-tools ``log_zinb_positive``)."""
    return log_zinb_from_logs(x, torch.log(mu + eps), torch.log(theta + eps), zi_logits)


def _generator_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return torch.device(generator.device) if generator is not None else fallback


def sample_nb(mu: torch.Tensor, theta: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gamma-Poisson draw of NB(mu, theta), reproducible under ``generator``.

    The draws happen on the generator's device; the result is returned on ``mu``'s device.
    """
    device = _generator_device(generator, mu.device)
    mu_g, theta_g = mu.detach().to(device), theta.detach().to(device)
    # Gamma(shape=theta, scale=mu/theta); clamp keeps a zero-theta cell from giving NaN rates.
    rate = torch._standard_gamma(theta_g.clamp_min(1e-8), generator=generator) * (mu_g / theta_g.clamp_min(1e-8))
    return torch.poisson(rate, generator=generator).to(mu.device)


class NegativeBinomial(Distribution):
    """NB with mean ``mu`` and inverse dispersion ``theta`` (log_prob, mean, variance, sample)."""

    arg_constraints = {"mu": constraints.greater_than_eq(0), "theta": constraints.greater_than_eq(0)}
    support = constraints.nonnegative_integer

    def __init__(self, mu: torch.Tensor, theta: torch.Tensor, validate_args: bool = False):
        self.mu, self.theta = torch.broadcast_tensors(mu, theta)
        super().__init__(batch_shape=self.mu.shape, validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    @property
    def variance(self) -> torch.Tensor:
        return self.mu + self.mu ** 2 / self.theta

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return log_nb_positive(value, self.mu, self.theta)

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        return sample_nb(self.mu.expand(shape), self.theta.expand(shape), generator)


class ZeroInflatedNegativeBinomial(NegativeBinomial):
    """ZINB: a structural zero with probability sigmoid(zi_logits), else NB(mu, theta)."""

    arg_constraints = {
        "mu": constraints.greater_than_eq(0), "theta": constraints.greater_than_eq(0), "zi_logits": constraints.real,
    }

    def __init__(self, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor, validate_args: bool = False):
        mu, theta, zi_logits = torch.broadcast_tensors(mu, theta, zi_logits)
        self.zi_logits = zi_logits
        super().__init__(mu, theta, validate_args=validate_args)

    @property
    def zi_probs(self) -> torch.Tensor:
        return torch.sigmoid(self.zi_logits)

    @property
    def mean(self) -> torch.Tensor:
        return (1.0 - self.zi_probs) * self.mu

    @property
    def variance(self) -> torch.Tensor:
        keep = 1.0 - self.zi_probs
        # Var = (1 - pi) * (mu + mu^2 / theta) + pi * (1 - pi) * mu^2
        return keep * (self.mu + self.mu ** 2 / self.theta) + keep * self.zi_probs * self.mu ** 2

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return log_zinb_positive(value, self.mu, self.theta, self.zi_logits)

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        counts = sample_nb(self.mu.expand(shape), self.theta.expand(shape), generator)
        device = _generator_device(generator, counts.device)
        uniform = torch.rand(shape, generator=generator, device=device).to(counts.device)
        return torch.where(uniform < self.zi_probs.expand(shape), torch.zeros_like(counts), counts)
