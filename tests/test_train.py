"""Checkpoints, the NB baseline, and _3_train_gmvae.py end to end on the tiny dataset."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st
import torch

from models.baseline import fit_nb_per_type, nb_nll_per_cell
from models.gmvae import GMVAE
from models.train import load_gmvae, make_optimizer, save_checkpoint
from models.utils import InputError

TINY = dict(n_genes=30, n_types=2, z_dim=4, enc_hidden1=8, enc_hidden2=8, cls_hidden=8, prior_hidden=8,
            dec_hidden1=8, dec_hidden2=8)


def test_checkpoint_round_trip_weights_only(tmp_path):
    torch.manual_seed(0)
    model = GMVAE(**TINY, library=True)
    model.set_library_prior([3.0, 4.0], [0.5, 0.25])
    optimizer = make_optimizer(model, 1e-3)
    path = tmp_path / "gmvae.pt"
    save_checkpoint(path, model, optimizer, epoch=5, genes=[f"g{i}" for i in range(30)], cell_types=["a", "b"])
    raw = torch.load(path, weights_only=True)
    assert raw["epoch"] == 5 and raw["cell_types"] == ["a", "b"] and raw["genes"][3] == "g3"
    loaded, meta = load_gmvae(path)
    assert meta["config"] == model.config and not loaded.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    codes = torch.tensor([0, 1, 1])
    assert torch.equal(model.sample_counts(codes, torch.Generator().manual_seed(1)),
                       loaded.sample_counts(codes, torch.Generator().manual_seed(1)))


def test_load_gmvae_missing_file_names_the_stage(tmp_path):
    with pytest.raises(InputError, match="_3_train_gmvae.py"):
        load_gmvae(tmp_path / "nope.pt")


def test_nb_baseline_ml_beats_moments_and_matches_scipy():
    rng = np.random.default_rng(0)
    mu = np.array([[0.3, 4.0, 60.0], [2.0, 0.5, 10.0]])
    theta = np.array([[0.5, 2.0, 8.0], [1.0, 3.0, 0.7]])
    partition = np.repeat([0, 1], 2000)
    counts = rng.negative_binomial(theta[partition], theta[partition] / (theta[partition] + mu[partition]))
    mu_ml, theta_ml = fit_nb_per_type(counts, partition, 2, method="ml")
    mu_mom, theta_mom = fit_nb_per_type(counts, partition, 2, method="moments")
    np.testing.assert_allclose(mu_ml, mu, rtol=0.1)
    np.testing.assert_allclose(theta_ml, theta, rtol=0.25)
    nll_ml = nb_nll_per_cell(counts, partition, mu_ml, theta_ml)
    reference = -st.nbinom.logpmf(counts, theta_ml[partition],
                                  theta_ml[partition] / (theta_ml[partition] + mu_ml[partition])).sum(1)
    np.testing.assert_allclose(nll_ml, reference, rtol=1e-10)
    assert nll_ml.sum() <= nb_nll_per_cell(counts, partition, mu_mom, theta_mom).sum()
    # theta is the maximiser: nudging it either way lowers the likelihood
    for factor in (0.9, 1.1):
        assert nll_ml.sum() < nb_nll_per_cell(counts, partition, mu_ml, theta_ml * factor).sum()
