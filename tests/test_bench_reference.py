"""The speed benchmark's re-implementation of the published GMVAE computes the published objective.

benchmarks/bench_gmvae.py times our model against ``PublishedGMVAE``, a re-implementation of the
published bulk2sc code's cost structure. These tests check that the structure computes what the
published loss computes, so the speed-up is measured against real work: per type, the summed
probability-space ZINB (checked against the log-space ZINB where it does not underflow), the
Gaussian KL under p(z | k), weighted by pi, plus the published eps-smoothed KL(pi || onehot).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_gmvae import PublishedGMVAE, SimplifiedOriginalGMVAE  # noqa: E402

from models.distributions import log_zinb_positive  # noqa: E402


def _data(n_cells=6, n_genes=25, n_types=3, seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.negative_binomial(1.0, 0.4, size=(n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < 0.5)
    return torch.tensor(counts, dtype=torch.float32), torch.arange(n_cells) % n_types


def _published_expected(model: PublishedGMVAE, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The published loss with z = the encoder mean, written per cell and type from scratch."""
    n_types, eps = model.n_types, 1e-10
    pi = torch.softmax(model.cls(x), dim=1)
    total = torch.zeros(())
    for k in range(n_types):
        joint = torch.cat([x, model.onehot[k].expand(len(x), n_types)], 1)
        mu, logvar = model.enc_mu(joint), model.enc_logvar(joint)
        dropout, mean, disp = model.decoder(mu)
        logits = torch.log(dropout) - torch.log1p(-dropout)
        nll = -log_zinb_positive(x, mean, disp, logits, eps=0.0).sum(-1)
        p_mu = model.prior_mu(model.onehot)[k]
        p_logvar = model.prior_logvar(model.onehot)[k]
        kl = 0.5 * (p_logvar - logvar + (logvar.exp() + (mu - p_mu) ** 2) / p_logvar.exp() - 1).sum(-1)
        total = total + (pi[:, k] * (nll + kl)).sum()
    target = F.one_hot(labels, n_types).float()
    return total + (pi * (torch.log(pi + eps) - torch.log(target + eps))).sum()


def test_published_structure_computes_the_published_objective(monkeypatch):
    torch.manual_seed(0)
    x, labels = _data()
    model = PublishedGMVAE(x.shape[1], 3, z_dim=4, hidden1=16, hidden2=8, hidden=8)
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)  # z = the encoder mean
    loss = model(x, labels)
    expected = _published_expected(model, x, labels)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-3)
    loss.backward()
    # every part of the published network is trained by the loss
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())


def test_published_structure_costs_more_than_the_simplified_one():
    """Same loop over types and 3*K decoder calls; the published structure adds a second encoder."""
    published = PublishedGMVAE(25, 3)
    simplified = SimplifiedOriginalGMVAE(25, 3)
    n_published = sum(p.numel() for p in published.parameters())
    n_simplified = sum(p.numel() for p in simplified.parameters())
    encoder_first_layer = (25 + 3) * 128 + 128
    assert n_published - n_simplified >= encoder_first_layer
    x, labels = _data()
    assert torch.isfinite(simplified(x, labels))
