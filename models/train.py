"""GMVAE training loop, evaluation, and checkpoints (save, resume, load for generation).

A checkpoint is a dict of primitives and tensors only (``torch.load(..., weights_only=True)``)::

    {"state_dict", "config" (GMVAE kwargs), "optimizer", "epoch", "genes", "cell_types",
     "best_val_loss", "best_epoch", "stale_evals", "settings" (the script's constants)}
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse as sp
import torch

from models.gmvae import GMVAE, Batch
from models.io import atomic_path
from models.utils import InputError

log = logging.getLogger(__name__)

# Buffers added after the first checkpoints were written: absent ones keep their defaults on load.
OPTIONAL_BUFFERS = ("post_mean", "post_chol", "post_fitted", "mean_log_ratio")

LOSS_PARTS = ("loss", "recon", "kl_z", "kl_pi", "nelbo_label", "skipped_mass", "pairs")


class TrainingDiverged(InputError):
    """The loss became NaN or infinite; the message names the epoch and what to change."""


# ----------------------------------------------------------------------------- data
def library_prior(counts: sp.csr_matrix, labels: np.ndarray, n_types: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-type (mean, sd) of log library size (total counts per cell), for generation."""
    log_library = np.log(np.maximum(np.asarray(counts.sum(axis=1)).ravel(), 1.0))
    loc, scale = np.zeros(n_types), np.ones(n_types)
    for k in range(n_types):
        values = log_library[labels == k]
        if len(values):
            loc[k] = values.mean()
            scale[k] = values.std() if len(values) > 1 else 0.0
    return loc, scale


def iterate_batches(counts: sp.csr_matrix, labels: np.ndarray, batch_size: int, device,
                    order: np.ndarray | None = None):
    """Yield ``Batch`` objects (sparse until they reach the device) in ``order`` (default: as stored)."""
    order = np.arange(counts.shape[0]) if order is None else order
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        yield Batch.from_csr(counts[index], labels[index], device)


@torch.no_grad()
def evaluate(model: GMVAE, counts: sp.csr_matrix, labels: np.ndarray, batch_size: int, device,
             pi_min: float = 0.0, seed: int = 0) -> dict[str, float]:
    """Mean per-cell loss parts and classification accuracy on a dataset (z drawn with a fixed seed)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    sums = dict.fromkeys(LOSS_PARTS, 0.0)
    correct = 0
    for batch in iterate_batches(counts, labels, batch_size, device):
        out = model(batch, pi_min=pi_min, generator=generator)
        for name in LOSS_PARTS:
            sums[name] += float(out[name].sum())
        correct += int((out["log_pi"].argmax(-1) == batch.labels).sum())
    model.train(was_training)
    n_cells = max(counts.shape[0], 1)
    result = {name: value / n_cells for name, value in sums.items()}
    result["accuracy"] = correct / n_cells
    return result


AMP_CHOICES = ("auto", "bf16", "off")


def amp_enabled(amp: str, device) -> bool:
    """Whether to train the layers in bfloat16 (``AMP`` setting): ``"auto"`` only where the hardware
    has native bfloat16 matmuls (CUDA with bf16 support, or a CPU with AVX512-BF16/AMX), since
    emulated bfloat16 is slower than float32; ``"bf16"`` always; ``"off"`` never."""
    if amp not in AMP_CHOICES:
        raise InputError(f"AMP must be one of {AMP_CHOICES}, got {amp!r}")
    if amp != "auto":
        return amp == "bf16"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def autocast(device, enabled: bool):
    """bfloat16 autocast for the layers (weights and the losses stay float32), or a no-op."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


def make_optimizer(model: GMVAE, lr: float) -> torch.optim.Optimizer:
    """Adam, fused where this torch build supports it (6x faster steps on CPU, PERF_NOTES.md)."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(model.parameters(), lr=lr)


# ----------------------------------------------------------------------------- loop
def warm_up_classifier(model: GMVAE, counts: sp.csr_matrix, labels: np.ndarray, batch_size: int, device,
                       rng: np.random.Generator, epochs: int, lr: float) -> float:
    """Fit the assignment MLP alone on its own supervised term, -log pi_label, for a few epochs.

    Cheap (one G x 128 layer per cell) and it leaves the objective unchanged: it only starts
    pi near the labels, so pairs with negligible pi can be skipped from the first GMVAE epoch
    (with PI_MIN > 0). Returns the training accuracy of the last epoch.
    """
    optimizer = torch.optim.Adam(model.classifier.parameters(), lr=lr)
    accuracy = 0.0
    for _ in range(epochs):
        correct = 0
        for batch in iterate_batches(counts, labels, batch_size, device, order=rng.permutation(counts.shape[0])):
            logits = model.class_logits(batch.dense)
            loss = torch.nn.functional.cross_entropy(logits, batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            correct += int((logits.argmax(-1) == batch.labels).sum())
        accuracy = correct / max(counts.shape[0], 1)
    return accuracy


def train_epoch(model: GMVAE, optimizer, counts: sp.csr_matrix, labels: np.ndarray, batch_size: int,
                device, rng: np.random.Generator, pi_min: float, epoch: int,
                progress: Callable[[], None] | None = None, pi_grad: bool = True,
                amp: bool = False) -> dict[str, float]:
    """One pass over the training cells in a shuffled order; returns mean loss parts and accuracy.

    ``amp``: run the layers in bfloat16 (:func:`autocast`); the likelihood, the KL terms and the
    optimizer state stay float32. Evaluation (:func:`evaluate`) is always float32.
    """
    model.train()
    sums = dict.fromkeys(LOSS_PARTS, 0.0)
    correct = 0
    for batch in iterate_batches(counts, labels, batch_size, device, order=rng.permutation(counts.shape[0])):
        with autocast(device, amp):
            out = model(batch, pi_min=pi_min, pi_grad=pi_grad)
        loss = out["loss"].mean()
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"training loss became {float(loss.detach())} at epoch {epoch}; the checkpoint on disk was not "
                "overwritten. Lower LR, or set LOG_INPUT=True, then rerun (RESUME=True continues from it)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for name in LOSS_PARTS:
            sums[name] += float(out[name].detach().sum())
        correct += int((out["log_pi"].argmax(-1) == batch.labels).sum())
        if progress is not None:
            progress()
    n_cells = counts.shape[0]
    result = {name: value / n_cells for name, value in sums.items()}
    result["accuracy"] = correct / n_cells
    return result


def fit_generation(model: GMVAE, counts: sp.csr_matrix, labels: np.ndarray, batch_size: int, device,
                   seed: int = 0) -> None:
    """What stage 5 samples from, fitted on the training cells after training: the per-type
    posterior Gaussian (``fit_posterior_prior``), then the per-type gene-mean calibration
    (``fit_mean_calibration``, with draws from that Gaussian and a generator seeded with ``seed``).
    Runs in eval mode without gradients."""
    n_types = model.n_types
    n_cells = np.bincount(labels, minlength=n_types)
    sums = np.vstack([np.asarray(counts[labels == k].sum(axis=0)).ravel() for k in range(n_types)])
    means = sums / np.maximum(n_cells, 1)[:, None]
    was_training = model.training
    model.eval()
    model.fit_posterior_prior(iterate_batches(counts, labels, batch_size, device))
    model.fit_mean_calibration(means, n_cells, torch.Generator(device=model.onehot.device).manual_seed(seed))
    model.train(was_training)


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, model: GMVAE, optimizer, epoch: int, genes, cell_types, **extra) -> None:
    """Write the checkpoint dict atomically (a crash leaves the previous file intact)."""
    state = {
        "state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
        "config": dict(model.config),
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "epoch": int(epoch),
        "genes": [str(g) for g in genes],
        "cell_types": [str(c) for c in cell_types],
    }
    state.update(extra)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, device="cpu") -> dict:
    """The checkpoint dict (weights_only=True). Missing file -> InputError naming _3_train_gmvae.py."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"missing GMVAE checkpoint {path}: run _3_train_gmvae.py first")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise InputError(f"{path}: cannot read the GMVAE checkpoint ({err}); rerun _3_train_gmvae.py") from None


def load_gmvae(path: Path, device="cpu") -> tuple[GMVAE, dict]:
    """(model in eval mode on ``device``, checkpoint dict with genes, cell_types, config, epoch).

    Checkpoints written before the fitted posterior prior and the mean calibration existed load
    too (without them).
    """
    meta = load_checkpoint(path, device)
    model = GMVAE(**meta["config"])
    state = dict(meta["state_dict"])
    for name, default in model.state_dict().items():
        if name in OPTIONAL_BUFFERS and name not in state:
            state[name] = default
    model.load_state_dict(state)
    model.to(device).eval()
    return model, meta


def is_finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))


def now() -> float:
    return time.perf_counter()
