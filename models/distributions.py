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


# ----------------------------------------------------------------------------- fused row sums
class _RowLogLikelihood(torch.autograd.Function):
    """sum_g log (ZI)NB(x_pg | log_mu, log_theta, zi_logits) per row p, with hand-written gradients.

    x is given sparsely (nonzero row, column, value); every other entry is a zero. One forward
    pass computes the value and the three partial derivatives; backward only scales them by the
    incoming gradient. Versus autograd on the elementwise formula this keeps 2-3 [P, G] tensors
    alive instead of about ten, and makes about a third of the passes over memory (PERF_NOTES.md:
    this per-entry work, not the matmuls, dominates the GMVAE on CPU). ``lgamma``/``digamma`` run
    at the nonzeros only.
    """

    @staticmethod
    def forward(ctx, log_mu, log_theta, zi_logits, nz_row, nz_col, nz_val):
        n_rows, n_genes = log_mu.shape
        theta = log_theta.exp()
        delta = log_mu - log_theta
        theta_sig = torch.sigmoid(delta).mul_(theta)  # theta * sigmoid(d)
        nb_zero = F.softplus(delta).mul_(theta).neg_()  # f = log NB(0) = -theta * softplus(d)
        del delta
        # zero case: NB: f; ZINB: g = softplus(f - pi) - softplus(-pi) (= logsumexp(pi, f) - softplus(pi))
        # grad_mu is kept negated (theta * sigma(d) * dg/df); backward flips the sign for free.
        if zi_logits is not None:
            gap = nb_zero - zi_logits
            weight = torch.sigmoid(gap)  # d g / d f
            neg_zi = zi_logits.neg()
            value_rows = F.softplus(gap).sum(-1) - F.softplus(neg_zi).sum(-1)
            del gap
            grad_zi = torch.sigmoid(neg_zi).sub_(weight)
            del neg_zi
            neg_grad_mu = theta_sig.mul(weight)
            grad_theta = nb_zero.add_(theta_sig).mul_(weight)  # (f + theta sigma(d)) * dg/df
            del weight
        else:
            value_rows = nb_zero.sum(-1)
            grad_zi = None
            neg_grad_mu = theta_sig
            grad_theta = nb_zero.add_(theta_sig)
        del theta_sig, nb_zero

        if nz_row.numel():
            flat = nz_row * n_genes + nz_col
            x = nz_val.to(log_mu.dtype)
            g_lm, g_lt = log_mu.reshape(-1)[flat], log_theta.reshape(-1)[flat]
            g_theta, g_delta = g_lt.exp(), g_lm - g_lt
            g_theta_sig = g_theta * torch.sigmoid(g_delta)
            g_f = -g_theta * F.softplus(g_delta)
            x_sig = x * torch.sigmoid(-g_delta)
            nonzero = (g_f - x * F.softplus(-g_delta) + torch.lgamma(x + g_theta) - torch.lgamma(g_theta)
                       - torch.lgamma(x + 1.0))
            d_mu = x_sig - g_theta_sig
            d_theta = g_f + g_theta_sig - x_sig + g_theta * (torch.digamma(x + g_theta) - torch.digamma(g_theta))
            if zi_logits is not None:
                g_zi = zi_logits.reshape(-1)[flat]
                nonzero = nonzero - F.softplus(g_zi)
                zero = F.softplus(g_f - g_zi) - F.softplus(-g_zi)
                grad_zi.reshape(-1)[flat] = -torch.sigmoid(g_zi)
            else:
                zero = g_f
            value_rows = value_rows.index_add(0, nz_row, nonzero - zero)
            neg_grad_mu.reshape(-1)[flat] = -d_mu
            grad_theta.reshape(-1)[flat] = d_theta
        ctx.save_for_backward(neg_grad_mu, grad_theta, grad_zi if grad_zi is not None else torch.empty(0))
        ctx.has_zi = zi_logits is not None
        return value_rows

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):
        neg_grad_mu, grad_theta, grad_zi = ctx.saved_tensors
        scale = grad_rows[:, None]
        # In place: the saved partials are used by this one backward only (once_differentiable).
        grad_mu = neg_grad_mu.mul_(-scale) if ctx.needs_input_grad[0] else None
        grad_theta = grad_theta.mul_(scale) if ctx.needs_input_grad[1] else None
        grad_zi = grad_zi.mul_(scale) if ctx.has_zi and ctx.needs_input_grad[2] else None
        return grad_mu, grad_theta, grad_zi, None, None, None


def row_log_likelihood(log_mu: torch.Tensor, log_theta: torch.Tensor, zi_logits: torch.Tensor | None,
                       nz_row: torch.Tensor, nz_col: torch.Tensor, nz_val: torch.Tensor) -> torch.Tensor:
    """sum over genes of log NB (``zi_logits=None``) or log ZINB, per row: [P].

    log_mu, log_theta, zi_logits: [P, G]; x is sparse, given by its nonzeros (row, column, count)
    with at most one entry per (row, column). Differentiable in the three [P, G] inputs.
    """
    return _RowLogLikelihood.apply(log_mu, log_theta, zi_logits, nz_row, nz_col, nz_val)
