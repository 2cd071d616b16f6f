"""The vectorised GMVAE against a straightforward per-type loop, chunking, pruning and sampling."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from models.distributions import log_nb_positive, log_zinb_positive
from models.gmvae import GMVAE, Batch

TINY = dict(n_genes=40, n_types=3, z_dim=4, enc_hidden1=16, enc_hidden2=8, cls_hidden=8, prior_hidden=8,
            dec_hidden1=8, dec_hidden2=16)


def _batch(n_cells=7, n_genes=40, n_types=3, seed=0):
    rng = np.random.default_rng(seed)
    dense = rng.negative_binomial(1.0, 0.3, size=(n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < 0.4)
    labels = np.arange(n_cells) % n_types
    return Batch.from_csr(sp.csr_matrix(dense.astype(np.float32)), labels, "cpu"), torch.tensor(dense, dtype=torch.float32)


def _reference_loss(model: GMVAE, x: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-cell loss the way the original computes it: a Python loop over k, dense x, [x, onehot_k] input."""
    n_cells, n_types = x.shape[0], model.n_types
    log_pi = torch.log_softmax(model.classifier(x), -1)
    weight = torch.cat([model.enc_x.weight, model.enc_type.T], dim=1)  # the G+K -> 128 layer
    total = -log_pi[torch.arange(n_cells), labels]
    for k in range(n_types):
        onehot = torch.zeros(n_cells, n_types)
        onehot[:, k] = 1.0
        hidden = F.relu(F.linear(torch.cat([x, onehot], 1), weight, model.enc_x.bias))
        hidden = F.relu(model.enc_hidden(hidden))
        q_mu, q_logvar = model.enc_mu(hidden), model.enc_logvar(hidden)
        p_mu = model.prior_mu(onehot)
        p_logvar = model.prior_logvar(onehot)
        z = q_mu + torch.exp(0.5 * q_logvar) * noise[:, k]
        hidden = F.relu(model.dec_in(z))
        heads = F.relu(model.dec_hidden(hidden)).chunk(3 if model.likelihood == "zinb" else 2, -1)
        mu, theta = model.dec_mean(heads[0]).exp(), model.dec_theta(heads[1]).exp()
        if model.likelihood == "zinb":
            log_lik = log_zinb_positive(x, mu, theta, model.dec_dropout(heads[2]), eps=0.0).sum(-1)
        else:
            log_lik = log_nb_positive(x, mu, theta, eps=0.0).sum(-1)
        kl = 0.5 * (p_logvar - q_logvar + (q_logvar.exp() + (q_mu - p_mu) ** 2) / p_logvar.exp() - 1).sum(-1)
        total = total + log_pi[:, k].exp() * (kl - log_lik)
    return total


@pytest.mark.parametrize("likelihood", ["zinb", "nb"])
def test_vectorised_forward_matches_per_type_loop(likelihood):
    torch.manual_seed(0)
    model = GMVAE(**TINY, likelihood=likelihood)
    batch, x = _batch()
    noise = torch.randn(x.shape[0] * model.n_types, model.z_dim, generator=torch.Generator().manual_seed(3))
    out = model(batch, generator=torch.Generator().manual_seed(3))
    reference = _reference_loss(model, x, batch.labels, noise.view(x.shape[0], model.n_types, -1))
    torch.testing.assert_close(out["loss"], reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], out["recon"] + out["kl_z"] + out["kl_pi"])
    # Gradients agree too.
    grads = torch.autograd.grad(out["loss"].sum(), list(model.parameters()), allow_unused=True)
    ref_grads = torch.autograd.grad(reference.sum(), list(model.parameters()), allow_unused=True)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_chunked_checkpointed_pass_equals_single_pass():
    torch.manual_seed(1)
    model = GMVAE(**TINY).double()  # float64: the two summation orders then agree to ~1e-12
    batch, _ = _batch(n_cells=9)
    batch.dense, batch.val = batch.dense.double(), batch.val.double()
    whole = model(batch, generator=torch.Generator().manual_seed(0))["loss"]
    grads_whole = torch.autograd.grad(whole.sum(), list(model.parameters()))
    model.chunk_elements = 5 * TINY["n_genes"]  # 5 pairs per chunk: 27 pairs -> 6 chunks
    chunked = model(batch, generator=torch.Generator().manual_seed(0))["loss"]
    grads_chunked = torch.autograd.grad(chunked.sum(), list(model.parameters()))
    torch.testing.assert_close(chunked, whole, rtol=1e-10, atol=1e-10)
    for ours, theirs in zip(grads_chunked, grads_whole):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-10)


def test_pruning_keeps_the_label_and_reports_the_skipped_mass():
    torch.manual_seed(2)
    model = GMVAE(**TINY)
    batch, _ = _batch()
    full = model(batch, generator=torch.Generator().manual_seed(0))
    same = model(batch, pi_min=1e-12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(same["loss"], full["loss"])
    only_label = model(batch, pi_min=1.1, sample_z=False)
    pi = full["log_pi"].exp()
    pi_label = pi[torch.arange(len(batch.labels)), batch.labels]
    torch.testing.assert_close(only_label["skipped_mass"], 1.0 - pi_label)
    # With only the label kept, the weighted parts are pi_label times the label's own -ELBO.
    torch.testing.assert_close(only_label["recon"] + only_label["kl_z"], pi_label * only_label["nelbo_label"])
    no_noise_full = model(batch, sample_z=False)
    torch.testing.assert_close(only_label["nelbo_label"], no_noise_full["nelbo_label"])


@pytest.mark.parametrize("options", [dict(), dict(log_input=True), dict(library=True, likelihood="nb")])
def test_sample_counts_reproducible_integer_counts(options):
    torch.manual_seed(3)
    model = GMVAE(**TINY, **options)
    model.set_library_prior(np.log([50.0, 80.0, 120.0]), [0.2, 0.2, 0.2])
    codes = torch.tensor([0, 0, 1, 2, 2, 2])
    first = model.sample_counts(codes, torch.Generator().manual_seed(11), chunk_cells=4)
    second = model.sample_counts(codes, torch.Generator().manual_seed(11))
    third = model.sample_counts(codes, torch.Generator().manual_seed(12))
    assert first.shape == (6, TINY["n_genes"]) and first.dtype == torch.float32
    assert torch.equal(first, first.round()) and (first >= 0).all()
    assert not torch.equal(first, third)
    if not options:  # chunking changes nothing when draws are consumed in the same order per chunk
        assert torch.equal(first, model.sample_counts(codes, torch.Generator().manual_seed(11), chunk_cells=4))
    assert second.shape == first.shape
    batch, _ = _batch()
    assert torch.isfinite(model(batch)["loss"]).all()
    with pytest.raises(ValueError):
        model.sample_counts(torch.tensor([3]), torch.Generator().manual_seed(0))


def test_library_samples_follow_the_stored_library_prior():
    torch.manual_seed(4)
    model = GMVAE(**TINY, library=True, likelihood="nb")
    with torch.no_grad():
        model.dec_theta.bias.fill_(8.0)  # nearly Poisson, so totals track the library
    model.set_library_prior(np.log([200.0, 2000.0, 20000.0]), [0.0, 0.0, 0.0])
    counts = model.sample_counts(torch.tensor([0] * 50 + [2] * 50), torch.Generator().manual_seed(0))
    totals = counts.sum(1)
    assert abs(totals[:50].mean() / 200.0 - 1) < 0.1
    assert abs(totals[50:].mean() / 20000.0 - 1) < 0.1


def test_prior_params_shapes_and_config_round_trip():
    model = GMVAE(**TINY)
    mu, logvar = model.prior_params()
    assert mu.shape == logvar.shape == (TINY["n_types"], TINY["z_dim"])
    clone = GMVAE(**model.config)
    clone.load_state_dict(model.state_dict())
    assert all(isinstance(v, (int, float, str, bool)) for v in model.config.values())
    with pytest.raises(ValueError):
        GMVAE(**{**TINY, "likelihood": "poisson"})


def test_posterior_prior_matches_the_encodings_moments():
    """fit_posterior_prior: per-type mean = mean of q means; covariance = their covariance + mean q variance."""
    import scipy.sparse as sp

    from models.gmvae import Batch

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = GMVAE(n_genes=20, n_types=2, z_dim=3, enc_hidden1=8, enc_hidden2=8, cls_hidden=8, prior_hidden=8,
                  dec_hidden1=8, dec_hidden2=8).eval()
    counts = sp.csr_matrix(rng.poisson(3.0, size=(60, 20)).astype(np.float32))
    labels = np.repeat([0, 1], 30)
    assert not bool(model.post_fitted)
    model.fit_posterior_prior(Batch.from_csr(counts[s:s + 16], labels[s:s + 16], "cpu") for s in range(0, 60, 16))
    assert bool(model.post_fitted)
    batch = Batch.from_csr(counts, labels, "cpu")
    with torch.no_grad():
        q_mu, q_logvar = model.encode_pairs(batch.dense, torch.arange(60), batch.labels)
    for k in range(2):
        mu_k, var_k = q_mu[labels == k].double(), q_logvar[labels == k].double().exp()
        expected = torch.cov(mu_k.T) + torch.diag(var_k.mean(0))
        chol = model.post_chol[k].double()
        assert torch.allclose(model.post_mean[k].double(), mu_k.mean(0), atol=1e-5)
        assert torch.allclose(chol @ chol.T, expected, atol=1e-4)
    # draws: same eps count as the learned prior, sample moments near the fitted ones
    codes = torch.zeros(20000, dtype=torch.int64)
    z, _ = model.draw_prior(codes, torch.Generator().manual_seed(0), source="posterior")
    chol = model.post_chol[0]
    assert torch.allclose(z.mean(0), model.post_mean[0], atol=0.05)
    assert torch.allclose(torch.cov(z.T), chol @ chol.T, atol=0.05)
    learned, _ = model.draw_prior(codes, torch.Generator().manual_seed(0), source="learned")
    assert not torch.allclose(learned.mean(0), z.mean(0), atol=1e-3)
    with pytest.raises(ValueError, match="source"):
        model.draw_prior(codes, torch.Generator(), source="nope")


def test_unfitted_posterior_prior_falls_back_to_the_learned_one():
    torch.manual_seed(0)
    model = GMVAE(n_genes=20, n_types=2, z_dim=3, enc_hidden1=8, enc_hidden2=8, cls_hidden=8, prior_hidden=8,
                  dec_hidden1=8, dec_hidden2=8).eval()
    codes = torch.tensor([0, 1, 1, 0])
    a, _ = model.draw_prior(codes, torch.Generator().manual_seed(3), source="posterior")
    b, _ = model.draw_prior(codes, torch.Generator().manual_seed(3), source="learned")
    assert torch.equal(a, b)


def test_mean_calibration_puts_generated_means_on_the_data_means():
    torch.manual_seed(0)
    model = GMVAE(n_genes=20, n_types=2, z_dim=3, enc_hidden1=8, enc_hidden2=8, cls_hidden=8, prior_hidden=8,
                  dec_hidden1=8, dec_hidden2=8).eval()
    rng = np.random.default_rng(0)
    observed = rng.gamma(1.0, 2.0, size=(2, 20))
    observed[0, 3] = 0.0  # never seen in type 0: pulled down by the pseudo-count, clipped at 1/10
    observed[1, 5] = 1e4  # far above the model: clipped at 10x
    model.fit_mean_calibration(observed, [50, 50], torch.Generator().manual_seed(0), n_draws=20000,
                               source="learned")
    ratio = model.mean_log_ratio
    assert float(ratio.max()) <= np.log(10) + 1e-6 and float(ratio.min()) >= -np.log(10) - 1e-6
    assert float(ratio[1, 5]) == pytest.approx(np.log(10), abs=1e-5)
    for k in range(2):
        codes = torch.full((20000,), k)
        log_mu, _, zi = model.generative_params(codes, torch.Generator().manual_seed(1), calibrate=True)
        mean = (torch.sigmoid(-zi) * log_mu.exp()).mean(0).double().numpy()
        ok = np.abs(ratio[k].numpy()) < np.log(10) - 1e-3
        # where not clipped: (data + 1/100) / (generated + 1/100) -> 1, up to Monte Carlo error
        np.testing.assert_allclose((mean[ok] + 0.01) / (observed[k, ok] + 0.01), 1.0, rtol=0.1)
    raw, _, _ = model.generative_params(torch.zeros(4, dtype=torch.int64), torch.Generator().manual_seed(2))
    calibrated, _, _ = model.generative_params(torch.zeros(4, dtype=torch.int64), torch.Generator().manual_seed(2),
                                               calibrate=True)
    torch.testing.assert_close(calibrated - raw, ratio[0].expand(4, -1))
