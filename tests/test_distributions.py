"""NB / ZINB log-likelihoods against scipy.stats.nbinom, and reproducible sampling."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st
import torch

from models.distributions import (
    NegativeBinomial,
    ZeroInflatedNegativeBinomial,
    log_nb_from_logs,
    log_nb_positive,
    log_zinb_from_logs,
    log_zinb_positive,
)


def _grid():
    """Counts x means x dispersions, including the confident corner where pow() underflows."""
    x = np.array([0, 1, 2, 5, 17, 100, 0, 3])
    mu = np.array([0.05, 0.7, 3.0, 12.0, 301.0, 250.0, 301.0, 1e-3])
    theta = np.array([0.2, 1.5, 10.0, 0.8, 61.0, 3.0, 61.0, 50.0])
    return x.astype(np.float64), mu, theta


def _scipy_nb(x, mu, theta):
    return st.nbinom.logpmf(x, theta, theta / (theta + mu))


def test_log_nb_matches_scipy():
    x, mu, theta = _grid()
    ours = log_nb_positive(torch.tensor(x), torch.tensor(mu), torch.tensor(theta), eps=0.0).numpy()
    np.testing.assert_allclose(ours, _scipy_nb(x, mu, theta), rtol=1e-10, atol=1e-10)


def test_log_zinb_matches_scipy_mixture():
    x, mu, theta = _grid()
    zi_logits = np.array([-3.0, 0.0, 1.5, -1.0, 2.0, -20.0, 25.0, 0.3])
    pi = 1.0 / (1.0 + np.exp(-zi_logits))
    expected = np.where(x == 0, np.log(pi + (1 - pi) * np.exp(_scipy_nb(x, mu, theta))),
                        np.log1p(-pi) + _scipy_nb(x, mu, theta))
    ours = log_zinb_positive(torch.tensor(x), torch.tensor(mu), torch.tensor(theta), torch.tensor(zi_logits),
                             eps=0.0).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-9)


def test_float32_stays_exact_where_probability_space_underflows():
    """mu=301, theta=61, x=0: the truth is about -97.7; pow() in float32 with eps 1e-10 capped it at 23.03."""
    x, mu, theta = torch.zeros(1), torch.tensor([301.0]), torch.tensor([61.0])
    value = log_nb_positive(x, mu, theta)
    expected = _scipy_nb(np.zeros(1), np.array([301.0]), np.array([61.0]))
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5)
    assert value.item() < -90
    logits = torch.tensor([30.0], requires_grad=True)  # sigmoid(30) == 1 in float32
    log_zinb_positive(torch.tensor([4.0]), mu, theta, logits).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.item() < -0.99


def test_from_logs_equal_the_mu_theta_forms():
    x, mu, theta = (torch.tensor(a) for a in _grid())
    zi = torch.linspace(-2, 2, len(x), dtype=torch.float64)
    torch.testing.assert_close(log_nb_from_logs(x, mu.log(), theta.log()), log_nb_positive(x, mu, theta, eps=0.0))
    torch.testing.assert_close(log_zinb_from_logs(x, mu.log(), theta.log(), zi),
                               log_zinb_positive(x, mu, theta, zi, eps=0.0))


def test_distribution_classes_log_prob_mean_variance():
    x, mu, theta = (torch.tensor(a) for a in _grid())
    zi = torch.linspace(-2, 2, len(x), dtype=torch.float64)
    nb = NegativeBinomial(mu, theta)
    torch.testing.assert_close(nb.log_prob(x), log_nb_positive(x, mu, theta))
    np.testing.assert_allclose(nb.variance.numpy(), st.nbinom.var(theta.numpy(), (theta / (theta + mu)).numpy()))
    zinb = ZeroInflatedNegativeBinomial(mu, theta, zi)
    torch.testing.assert_close(zinb.log_prob(x), log_zinb_positive(x, mu, theta, zi))
    pi = torch.sigmoid(zi)
    torch.testing.assert_close(zinb.mean, (1 - pi) * mu)


@pytest.mark.parametrize("zero_inflated", [False, True])
def test_sample_moments_and_reproducibility(zero_inflated):
    mu = torch.tensor([0.5, 4.0, 40.0])
    theta = torch.tensor([0.7, 2.0, 15.0])
    dist = (ZeroInflatedNegativeBinomial(mu, theta, torch.tensor([-1.0, 0.0, 1.0])) if zero_inflated
            else NegativeBinomial(mu, theta))
    draws = dist.sample((40_000,), generator=torch.Generator().manual_seed(7))
    again = dist.sample((40_000,), generator=torch.Generator().manual_seed(7))
    other = dist.sample((40_000,), generator=torch.Generator().manual_seed(8))
    assert draws.shape == (40_000, 3)
    assert torch.equal(draws, again)
    assert not torch.equal(draws, other)
    assert torch.equal(draws, draws.round()) and (draws >= 0).all()
    np.testing.assert_allclose(draws.mean(0).numpy(), dist.mean.numpy(), rtol=0.05)
    np.testing.assert_allclose(draws.var(0).numpy(), dist.variance.numpy(), rtol=0.1)


@pytest.mark.parametrize("zero_inflated", [True, False])
def test_fused_row_log_likelihood_value_and_gradients(zero_inflated):
    """The hand-written gradients equal autograd through the elementwise formula (float64)."""
    from models.distributions import row_log_likelihood

    torch.manual_seed(0)
    n_rows, n_genes = 6, 15
    x = ((torch.rand(n_rows, n_genes) < 0.4) * torch.randint(1, 40, (n_rows, n_genes))).double()
    log_mu = (2 * torch.randn(n_rows, n_genes, dtype=torch.float64)).requires_grad_()
    log_theta = (2 * torch.randn(n_rows, n_genes, dtype=torch.float64)).requires_grad_()
    zi = (3 * torch.randn(n_rows, n_genes, dtype=torch.float64)).requires_grad_() if zero_inflated else None
    rows, cols = x.nonzero(as_tuple=True)
    inputs = [log_mu, log_theta] + ([zi] if zero_inflated else [])
    elementwise = log_zinb_from_logs(x, log_mu, log_theta, zi) if zero_inflated else log_nb_from_logs(x, log_mu, log_theta)
    reference = elementwise.sum(-1)
    fused = row_log_likelihood(log_mu, log_theta, zi, rows, cols, x[rows, cols])
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-10)
    weights = torch.randn(n_rows, dtype=torch.float64)
    expected = torch.autograd.grad((reference * weights).sum(), inputs)
    got = torch.autograd.grad((fused * weights).sum(), inputs)
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
