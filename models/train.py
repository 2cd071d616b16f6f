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
from typing import Callable, Iterable

import numpy as np
import scipy.sparse as sp
import torch

from models import distributed
from models.distributed import Context
from models.gmvae import GMVAE, Batch
from models.io import load_torch, save_torch
from models.utils import InputError

log = logging.getLogger(__name__)

# Buffers added after the first checkpoints were written: absent ones keep their defaults on load.
OPTIONAL_BUFFERS = ("post_mean", "post_chol", "post_fitted", "mean_log_ratio")
# What every GMVAE checkpoint holds (a TAPE one, say, lacks config and epoch).
CHECKPOINT_KEYS = ("state_dict", "config", "epoch", "genes", "cell_types")

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


def library_prior_from_sums(log_lib: np.ndarray, n_cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`library_prior` from per-type sums [2, K] of log library size and its square."""
    n = np.maximum(np.asarray(n_cells, dtype=np.float64), 1.0)
    loc = np.where(n_cells > 0, log_lib[0] / n, 0.0)
    var = np.maximum(log_lib[1] / n - loc ** 2, 0.0)
    scale = np.where(n_cells > 1, np.sqrt(var), np.where(n_cells == 1, 0.0, 1.0))
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
    """Mean per-cell loss parts and classification accuracy on a dataset (z drawn with fixed seeds)."""
    keyed = ((index, batch) for index, batch in enumerate(iterate_batches(counts, labels, batch_size, device)))
    return evaluate_batches(model, keyed, pi_min, seed)


@torch.no_grad()
def evaluate_batches(model: GMVAE, keyed_batches: Iterable[tuple], pi_min: float = 0.0, seed: int = 0,
                     ctx: Context | None = None) -> dict[str, float]:
    """Mean per-cell loss parts and accuracy over (key, batch) pairs, summed over the ranks.

    Each batch draws its z with a generator seeded by (seed, key), so the result does not depend
    on how the batches were dealt out to the ranks. Runs without DDP (no collectives but the
    final sum).
    """
    ctx = ctx or Context()
    model = distributed.unwrap(model)
    was_training = model.training
    model.eval()
    sums = np.zeros(len(LOSS_PARTS) + 2)  # loss parts, correct, cells
    for key, batch in keyed_batches:
        key = key if isinstance(key, tuple) else (key,)
        generator = torch.Generator(device=batch.dense.device).manual_seed(distributed.rank_seed(seed, *key))
        out = model(batch, pi_min=pi_min, generator=generator)
        sums[:len(LOSS_PARTS)] += [float(out[name].sum()) for name in LOSS_PARTS]
        sums[-2] += int((out["log_pi"].argmax(-1) == batch.labels).sum())
        sums[-1] += batch.dense.shape[0]
    model.train(was_training)
    sums = distributed.all_sum(sums, ctx)
    n_cells = max(sums[-1], 1.0)
    result = {name: float(value / n_cells) for name, value in zip(LOSS_PARTS, sums)}
    result["accuracy"] = float(sums[-2] / n_cells)
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
    def batches(_epoch):
        return iterate_batches(counts, labels, batch_size, device, order=rng.permutation(counts.shape[0]))

    return warm_up_steps(model, batches, epochs, lr)


def warm_up_steps(model: GMVAE, batches: Callable[[int], Iterable[Batch]], epochs: int, lr: float,
                  ctx: Context | None = None) -> float:
    """:func:`warm_up_classifier` over ``batches(epoch)`` for epochs 1..``epochs``. Under
    torchrun the assignment MLP is wrapped in its own DistributedDataParallel, so this phase's
    gradients are averaged over the ranks too. Returns the last epoch's accuracy (all ranks)."""
    ctx = ctx or Context()
    classifier = distributed.wrap(model.classifier, ctx)
    optimizer = torch.optim.Adam(model.classifier.parameters(), lr=lr)
    accuracy = 0.0
    for epoch in range(1, epochs + 1):
        correct = seen = 0
        for batch in batches(epoch):
            logits = classifier(model._input(batch.dense))
            loss = torch.nn.functional.cross_entropy(logits, batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            correct += int((logits.argmax(-1) == batch.labels).sum())
            seen += batch.dense.shape[0]
        total = distributed.all_sum([correct, seen], ctx)
        accuracy = float(total[0] / max(total[1], 1.0))
    del classifier  # its DDP hooks go with it, before the whole model is wrapped
    return accuracy


def train_epoch(model: GMVAE, optimizer, counts: sp.csr_matrix, labels: np.ndarray, batch_size: int,
                device, rng: np.random.Generator, pi_min: float, epoch: int,
                progress: Callable[[], None] | None = None, pi_grad: bool = True,
                amp: bool = False) -> dict[str, float]:
    """One pass over the training cells in a shuffled order; returns mean loss parts and accuracy.

    ``amp``: run the layers in bfloat16 (:func:`autocast`); the likelihood, the KL terms and the
    optimizer state stay float32. Evaluation (:func:`evaluate`) is always float32.
    """
    batches = iterate_batches(counts, labels, batch_size, device, order=rng.permutation(counts.shape[0]))
    return train_steps(model, optimizer, batches, pi_min, epoch, progress=progress, pi_grad=pi_grad, amp=amp)


def train_steps(model, optimizer, batches: Iterable[Batch], pi_min: float, epoch: int,
                progress: Callable[[], None] | None = None, pi_grad: bool = True, amp: bool = False,
                generator: torch.Generator | None = None, ctx: Context | None = None) -> dict[str, float]:
    """One optimisation step per batch; returns the mean loss parts and accuracy over every
    rank's cells. ``model`` may be DistributedDataParallel-wrapped (:func:`models.distributed.wrap`):
    its backward then averages the gradients over the ranks, which all run the same number of
    steps. A non-finite loss on any rank stops every rank at the same step (one small
    all-reduce per step under torchrun). ``generator`` draws the reparameterised z."""
    ctx = ctx or Context()
    model.train()
    sums = np.zeros(len(LOSS_PARTS) + 2)  # loss parts, correct, cells
    for batch in batches:
        device = batch.dense.device
        with autocast(device, amp):
            out = model(batch, pi_min=pi_min, pi_grad=pi_grad, generator=generator)
        loss = out["loss"].mean()
        finite = bool(torch.isfinite(loss))
        if ctx.distributed:
            finite = not distributed.any_rank(not finite, ctx)
        if not finite:
            raise TrainingDiverged(
                f"training loss became {float(loss.detach())} at epoch {epoch}; the checkpoint on disk was not "
                "overwritten. Lower LR, or set LOG_INPUT=True, then rerun (RESUME=True continues from it)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums[:len(LOSS_PARTS)] += [float(out[name].detach().sum()) for name in LOSS_PARTS]
        sums[-2] += int((out["log_pi"].argmax(-1) == batch.labels).sum())
        sums[-1] += batch.dense.shape[0]
        if progress is not None:
            progress()
    sums = distributed.all_sum(sums, ctx)
    n_cells = max(sums[-1], 1.0)
    result = {name: float(value / n_cells) for name, value in zip(LOSS_PARTS, sums)}
    result["accuracy"] = float(sums[-2] / n_cells)
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
    fit_generation_from(model, iterate_batches(counts, labels, batch_size, device), sums, n_cells, seed)


def fit_generation_from(model: GMVAE, batches: Iterable[Batch], type_sums: np.ndarray, n_cells: np.ndarray,
                        seed: int = 0) -> None:
    """:func:`fit_generation` from any pass over the training batches and the per-type gene sums."""
    model = distributed.unwrap(model)
    means = type_sums / np.maximum(n_cells, 1)[:, None]
    was_training = model.training
    model.eval()
    model.fit_posterior_prior(batches)
    model.fit_mean_calibration(means, n_cells, torch.Generator(device=model.onehot.device).manual_seed(seed))
    model.train(was_training)


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, model: GMVAE, optimizer, epoch: int, genes, cell_types, **extra) -> None:
    """Write the checkpoint dict atomically (a crash leaves the previous file intact)."""
    model = distributed.unwrap(model)  # the same keys with or without DDP: no "module." prefix
    state = {
        "state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
        "config": dict(model.config),
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "epoch": int(epoch),
        "genes": [str(g) for g in genes],
        "cell_types": [str(c) for c in cell_types],
    }
    state.update(extra)
    save_torch(state, path)


def load_checkpoint(path: Path, device="cpu", fix: str = "rerun _3_train_gmvae.py to write it") -> dict:
    """The checkpoint dict (weights_only=True). Missing file -> InputError naming _3_train_gmvae.py;
    an unreadable or foreign one -> InputError ending with ``fix``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"missing GMVAE checkpoint {path}: run _3_train_gmvae.py first")
    return load_torch(path, "GMVAE checkpoint", fix, CHECKPOINT_KEYS, device)


def load_gmvae(path: Path, device="cpu") -> tuple[GMVAE, dict]:
    """(model in eval mode on ``device``, checkpoint dict with genes, cell_types, config, epoch).

    Checkpoints written before the fitted posterior prior and the mean calibration existed load
    too (without them).
    """
    meta = load_checkpoint(path, device)
    try:
        model = GMVAE(**meta["config"])
        state = dict(meta["state_dict"])
        for name, default in model.state_dict().items():
            if name in OPTIONAL_BUFFERS and name not in state:
                state[name] = default
        model.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as err:  # unknown settings, missing or misshapen weights
        detail = " ".join(str(err).split())[:300]
        raise InputError(f"{path}: its weights do not fit its model settings ({detail}); it was written by "
                         "another model or version: rerun _3_train_gmvae.py") from None
    model.to(device).eval()
    return model, meta


def is_finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))


def now() -> float:
    return time.perf_counter()
