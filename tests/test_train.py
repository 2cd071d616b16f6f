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


# ----------------------------------------------------------------------------- the script
import shutil  # noqa: E402

import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402

import _3_train_gmvae as stage3  # noqa: E402
from models import io  # noqa: E402
from models.paths import Paths  # noqa: E402

SMALL = ["--Z_DIM=4", "--ENC_HIDDEN1=16", "--ENC_HIDDEN2=8", "--CLS_HIDDEN=16", "--PRIOR_HIDDEN=8",
         "--DEC_HIDDEN1=8", "--DEC_HIDDEN2=16", "--BATCH_SIZE=64", "--PATIENCE=100", "--CLS_WARMUP_EPOCHS=1"]


@pytest.fixture()
def data_dir(tiny_split_dir, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(tiny_split_dir, target)
    return target


def run(data_dir, *extra):
    stage3.main([f"--DATA_DIR={data_dir}", f"--FIG_DIR={data_dir / 'fig'}", *SMALL, *extra])
    return Paths(data_dir, data_dir / "fig")


def test_trains_writes_history_checkpoint_and_resumes(data_dir):
    paths = run(data_dir, "--EPOCHS=2", "--SAVE_EVERY=1")
    history = pd.read_csv(paths.gmvae_history)
    assert list(history["epoch"]) == [1, 2]
    for column in ("train_loss", "train_recon", "train_kl_z", "train_kl_pi", "val_loss", "val_accuracy", "seconds"):
        assert history[column].notna().all(), column
    assert not any(c.startswith("test_") for c in history.columns)  # test/ never chooses the epoch
    assert (paths.fig_dir / "gmvae_loss.png").exists()
    checkpoint = torch.load(paths.gmvae_checkpoint, weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["cell_types"] == ["alpha", "beta", "gamma"]
    steps = checkpoint["optimizer"]["state"][0]["step"]

    run(data_dir, "--EPOCHS=4", "--SAVE_EVERY=1", "--RESUME=true")
    history = pd.read_csv(paths.gmvae_history)
    assert list(history["epoch"]) == [1, 2, 3, 4]
    resumed = torch.load(paths.gmvae_checkpoint, weights_only=True)
    assert resumed["epoch"] == 4
    assert float(resumed["optimizer"]["state"][0]["step"]) == 2 * float(steps)  # optimizer continued
    model, meta = load_gmvae(paths.gmvae_checkpoint)
    counts = model.sample_counts(torch.tensor([0, 1, 2]), torch.Generator().manual_seed(0))
    assert counts.shape == (3, len(meta["genes"]))

    with pytest.raises(InputError, match="differ from the checkpoint"):
        run(data_dir, "--EPOCHS=5", "--RESUME=true", "--LIKELIHOOD=nb")


def test_nan_loss_stops_and_keeps_the_good_checkpoint(data_dir, monkeypatch):
    paths = run(data_dir, "--EPOCHS=1")
    good = paths.gmvae_checkpoint.read_bytes()
    real_forward = GMVAE.forward

    def poisoned(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(GMVAE, "forward", poisoned)
    with pytest.raises(InputError, match="epoch 2.*LR"):
        run(data_dir, "--EPOCHS=3", "--RESUME=true", "--SAVE_EVERY=1")
    assert paths.gmvae_checkpoint.read_bytes() == good


def test_input_errors_name_the_file_and_fix(data_dir, tmp_path):
    with pytest.raises(InputError, match="_1_split_train_test.py"):
        run(tmp_path / "empty", "--EPOCHS=1")
    paths = Paths(data_dir)
    with pytest.raises(InputError, match="VALIDATION_FRACTION"):
        run(data_dir, "--EPOCHS=1", "--VALIDATION_FRACTION=0")

    train = io.read_dataset(paths.train_dir)
    fractional = train.copy()
    fractional.X = sp.csr_matrix(fractional.X.toarray() * 0.5 + 0.25)
    (paths.train_dir / "cells.h5ad").unlink()
    import scipy.io as sio
    with open(paths.train_dir / "matrix.mtx", "wb") as handle:  # write real (non-integer) values
        sio.mmwrite(handle, sp.coo_matrix(fractional.X.T))
    with pytest.raises(InputError, match="not integers"):
        run(data_dir, "--EPOCHS=1")


def test_validation_comes_from_the_training_cells_and_test_is_never_read(data_dir):
    """Early stopping looks at a stratified, seeded share of train/; stage 3 runs without test/."""
    paths = Paths(data_dir)
    shutil.rmtree(paths.test_dir)
    run(data_dir, "--EPOCHS=1", "--VALIDATION_FRACTION=0.2")
    assert not paths.test_dir.exists() and paths.gmvae_checkpoint.exists()

    types = io.read_dataset(paths.train_dir).obs["cell_type"].astype(str).to_numpy()
    fit_rows, val_rows = stage3.validation_split(types, 0.2, 0, paths.train_dir)
    assert set(fit_rows).isdisjoint(val_rows) and len(fit_rows) + len(val_rows) == len(types)
    for name in set(types):
        assert abs((types[val_rows] == name).sum() - 0.2 * (types == name).sum()) <= 1  # stratified
    again, _ = stage3.validation_split(types, 0.2, 0, paths.train_dir)
    other, _ = stage3.validation_split(types, 0.2, 1, paths.train_dir)
    assert np.array_equal(again, fit_rows) and not np.array_equal(other, fit_rows)  # seeded by SEED


def test_classifier_warm_up_learns_the_labels(tiny_adata):
    from models.train import evaluate, warm_up_classifier

    torch.manual_seed(0)
    counts = tiny_adata.X.tocsr()
    labels = tiny_adata.obs["partition"].to_numpy()
    model = GMVAE(**{**TINY, "n_genes": counts.shape[1], "n_types": 3}, log_input=True)
    before = evaluate(model, counts, labels, 64, "cpu")["accuracy"]
    decoder_before = model.dec_mean.weight.clone()
    accuracy = warm_up_classifier(model, counts, labels, 64, "cpu", np.random.default_rng(0), epochs=20, lr=1e-2)
    after = evaluate(model, counts, labels, 64, "cpu")
    assert accuracy > 0.9 and after["accuracy"] > max(before, 0.9)
    assert torch.equal(model.dec_mean.weight, decoder_before)  # only the assignment MLP moved


def test_amp_setting_is_checked_and_explicit_values_win():
    from models.train import amp_enabled

    assert amp_enabled("off", "cpu") is False
    assert amp_enabled("bf16", "cpu") is True
    assert isinstance(amp_enabled("auto", "cpu"), bool)
    with pytest.raises(InputError, match="AMP"):
        amp_enabled("fp16", "cpu")


def test_bf16_layers_keep_float32_losses_close_to_float32():
    from models.gmvae import Batch
    from models.train import autocast

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    counts = rng.negative_binomial(2, 0.3, size=(16, 30)).astype(np.float32)
    labels = rng.integers(0, 2, size=16)
    import scipy.sparse as sp

    model = GMVAE(**TINY)
    batch = Batch.from_csr(sp.csr_matrix(counts), labels, "cpu")
    reference = model(batch, sample_z=False)
    with autocast("cpu", True):
        mixed = model(batch, sample_z=False)
    for name in ("loss", "recon", "kl_z", "kl_pi"):
        assert mixed[name].dtype == torch.float32, name
    # bfloat16 keeps ~3 significant digits in the layers; the losses agree to well under 1%
    assert torch.allclose(mixed["loss"], reference["loss"], rtol=1e-2)
    assert not torch.equal(mixed["loss"], reference["loss"])  # the layers really ran in bfloat16
    mixed["loss"].mean().backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


def test_checkpoint_without_the_fitted_prior_still_loads(tmp_path):
    """Checkpoints written before the fitted posterior prior existed load, with it marked unfitted."""
    torch.manual_seed(0)
    model = GMVAE(**TINY)
    path = tmp_path / "gmvae.pt"
    save_checkpoint(path, model, None, epoch=1, genes=[f"g{i}" for i in range(30)], cell_types=["a", "b"])
    raw = torch.load(path, weights_only=True)
    raw["state_dict"] = {k: v for k, v in raw["state_dict"].items() if not k.startswith("post_")}
    torch.save(raw, path)
    loaded, _ = load_gmvae(path)
    assert not bool(loaded.post_fitted)
    assert torch.equal(loaded.dec_mean.weight, model.dec_mean.weight)
