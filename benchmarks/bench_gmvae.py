"""GMVAE speed and memory: the original bulk2sc cost structure vs models/gmvae.py, same run.

Synthetic lung-scale data (7,600 cells x 16,318 genes, K=17, ~90% zeros, NB counts with
type-specific means and per-cell library sizes). Every configuration runs in its own
subprocess, so each peak RSS is that configuration's alone. Prints:

- s/epoch of the original cost structure at batch 37, timed on a few batches and
  extrapolated, in two re-implementations: ``published`` follows the published bulk2sc code
  (separate mean and log-variance encoders looped over K, the full decoder called 3*K times,
  outputs stacked to [B, G, K] tensors, probability-space ZINB on their per-type slices);
  ``simplified`` keeps the loop over K and the 3*K decoder calls but one encoder trunk and
  contiguous per-type tensors (the reference quoted before the published code was read);
- s/epoch of ours at batch 37 and at the default batch, with the full sum over K
  (PI_MIN=0, exact) and with pruning at the default PI_MIN after pi has converged;
- peak RSS of each configuration, and of a whole training run at the defaults;
- time to the held-out loss plateau at the defaults (early stopping as in _3_train_gmvae.py).

Run (heavy: about 5 min at full scale on 2 cores; hold the shared lock so timings do not overlap):
    flock /tmp/bulk2sc_heavy.lock .venv/bin/python benchmarks/bench_gmvae.py
Quick check (about a minute):
    .venv/bin/python benchmarks/bench_gmvae.py --N_CELLS=400 --N_GENES=600 --N_TYPES=5 \
        --ORIGINAL_BATCHES=2 --ORIGINAL_WARMUP=1 --OURS_BATCHES=3 --PLATEAU_MINUTES=0.5
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.config import load_config  # noqa: E402
from models.gmvae import GMVAE, Batch  # noqa: E402
from models.train import (  # noqa: E402
    amp_enabled, autocast, evaluate, library_prior, make_optimizer, train_epoch, warm_up_classifier)
from models.utils import peak_rss_mb, set_seed, set_torch_threads  # noqa: E402

# -----------------------------------------------------------------------------
N_CELLS = 7600  # lung scale (GSE130148 after QC: ~10,000 cells, 75% train)
N_GENES = 16318  # genes kept after the original QC
N_TYPES = 17  # Leiden clusters of the original
TEST_FRACTION = 0.25  # held-out cells for the plateau run (of N_CELLS, on top of them)
ORIGINAL_BATCH = 37  # the original's batch size
ORIGINAL_BATCHES = 3  # batches timed for each original structure (2-7 s each at full scale), after the warm-ups
ORIGINAL_WARMUP = 2  # untimed first batches of the originals (the first ones run slower: allocator warm-up)
OURS_BATCHES = 20  # batches timed for ours, after one warm-up (median)
DEFAULT_BATCH = 128  # _3_train_gmvae.py's BATCH_SIZE
DEFAULT_PI_MIN = 1e-3  # _3_train_gmvae.py's PI_MIN
PI_GRAD = False  # _3_train_gmvae.py's PI_GRAD
LOG_INPUT = False  # _3_train_gmvae.py's LOG_INPUT
CLS_WARMUP_EPOCHS = 5  # _3_train_gmvae.py's CLS_WARMUP_EPOCHS
LR = 1e-3  # _3_train_gmvae.py's LR
AMP = "auto"  # _3_train_gmvae.py's AMP (bfloat16 layers where the hardware has them)
PATIENCE = 5  # _3_train_gmvae.py's early stopping
MIN_DELTA = 1e-3
PLATEAU_MINUTES = 15.0  # cap on the plateau run (the target is a plateau within 15 min)
SEED = 0
PART = "all"  # "all", or internal: "worker"
WORKER = ""  # internal: JSON of a worker's job
DATA = ""  # internal: the .npz the workers read
# -----------------------------------------------------------------------------


# ----------------------------------------------------------------------------- data
def synthetic_counts(n_cells: int, n_genes: int, n_types: int, seed: int):
    """(CSR float32 counts, labels): NB(theta=2) with lognormal type profiles and libraries."""
    rng = np.random.default_rng(seed)
    base = rng.lognormal(-3.2, 1.6, size=n_genes)  # most genes rarely seen: ~90% zeros
    effects = rng.lognormal(0.0, 0.8, size=(n_types, n_genes))
    labels = rng.integers(0, n_types, size=n_cells)
    blocks = []
    for start in range(0, n_cells, 500):
        rows = labels[start:start + 500]
        mu = base * effects[rows] * rng.lognormal(0, 0.4, size=(len(rows), 1))
        counts = rng.negative_binomial(2.0, 2.0 / (2.0 + mu)).astype(np.float32)
        blocks.append(sp.csr_matrix(counts))
    return sp.vstack(blocks).tocsr(), labels


# ----------------------------------------------------------------------------- the original's structure
class PublishedGMVAE(nn.Module):
    """The published bulk2sc GMVAE's cost structure (GitHub wdnlotm/bulk2sc_GMVAE_NB, the ZINB model:
    _3_model_train_GMVAE/main_zinb.py and _model_source_codes/GMVAE_scrna_zinb.py,
    GMVAE_losses_zinb.py, GMVAE_utils.py), re-implemented here for timing:

    - two encoders, one for the mean and one for the log-variance, each (G+K) -> 128 -> 64 -> Z,
      run on [x, onehot_k] in a Python loop over K and written into [B, Z, K] tensors;
    - the full three-head decoder called 3*K times (once per output per type), each output
      stacked over K into a [B, G, K] tensor (type last);
    - the pi-weighted mixtures of the three outputs, computed in the forward pass;
    - the probability-space ZINB evaluated per type on the [:, :, k] slices of those stacks
      (strided: the type is the innermost dimension), zero and nonzero cases each re-stacked to
      [B, G, K], chosen with ``torch.where`` and weighted by pi, then summed;
    - decoder activations sigmoid (dropout), ELU + 1 (mean and dispersion); Adam with defaults.
    """

    def __init__(self, n_genes: int, n_types: int, z_dim: int = 32, hidden1: int = 128, hidden2: int = 64,
                 hidden: int = 128):
        super().__init__()
        self.n_types, self.z_dim = n_types, z_dim

        def encoder():
            return nn.Sequential(nn.Linear(n_genes + n_types, hidden1), nn.ReLU(), nn.Linear(hidden1, hidden2),
                                 nn.ReLU(), nn.Linear(hidden2, z_dim))

        def prior():
            return nn.Sequential(nn.Linear(n_types, hidden), nn.ReLU(), nn.Linear(hidden, z_dim))

        self.cls = nn.Sequential(nn.Linear(n_genes, hidden), nn.ReLU(), nn.Linear(hidden, n_types))
        self.enc_mu, self.enc_logvar = encoder(), encoder()
        self.prior_mu, self.prior_logvar = prior(), prior()
        self.dec1 = nn.Linear(z_dim, hidden2)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden2, hidden1), nn.ReLU(), nn.Linear(hidden1, n_genes)) for _ in range(3))
        self.register_buffer("onehot", torch.eye(n_types))

    def decoder(self, z):
        hidden = F.relu(self.dec1(z))
        return (torch.sigmoid(self.heads[0](hidden)), F.elu(self.heads[1](hidden)) + 1.0,
                F.elu(self.heads[2](hidden)) + 1.0)

    def forward(self, x, labels):
        n_cells, n_genes, n_types, eps = x.shape[0], x.shape[1], self.n_types, 1e-10
        pi = torch.softmax(self.cls(x), dim=1)
        mu_z = torch.empty(n_cells, self.z_dim, n_types)
        logvar_z = torch.empty(n_cells, self.z_dim, n_types)
        for k in range(n_types):
            joint = torch.cat([x, self.onehot[k].expand(n_cells, n_types)], 1)
            mu_z[:, :, k] = self.enc_mu(joint)
            logvar_z[:, :, k] = self.enc_logvar(joint)
        p_mu = self.prior_mu(self.onehot).t().expand(n_cells, self.z_dim, n_types)
        p_logvar = self.prior_logvar(self.onehot).t().expand(n_cells, self.z_dim, n_types)
        z = mu_z + torch.exp(0.5 * logvar_z) * torch.randn_like(mu_z)
        dropout, mean, disp = (torch.stack([self.decoder(z[:, :, k])[part] for k in range(n_types)], dim=2)
                               for part in range(3))
        weight = pi.unsqueeze(1).expand(n_cells, n_genes, n_types)
        mixtures = [torch.sum(out * weight, dim=2) for out in (dropout, mean, disp)]  # noqa: F841 (as published)
        zero = torch.stack([-torch.log(dropout[:, :, k] + (1.0 - dropout[:, :, k]) * torch.pow(
            disp[:, :, k] / (mean[:, :, k] + disp[:, :, k] + eps), disp[:, :, k]) + eps) for k in range(n_types)], dim=2)
        nonzero_gamma = torch.stack([torch.lgamma(x + 1.0) + torch.lgamma(disp[:, :, k] + eps)
                                     - torch.lgamma(x + disp[:, :, k] + eps) for k in range(n_types)], dim=2)
        nonzero_log = torch.stack([
            -torch.log(1.0 - dropout[:, :, k] + eps) - disp[:, :, k] * torch.log(disp[:, :, k] + eps)
            - x * torch.log(mean[:, :, k] + eps) + (disp[:, :, k] + x) * torch.log(disp[:, :, k] + mean[:, :, k] + eps)
            for k in range(n_types)], dim=2)
        observed = x.unsqueeze(2).expand(n_cells, n_genes, n_types)
        recon = torch.sum(torch.where(observed <= 0.01, zero, nonzero_gamma + nonzero_log) * weight)
        kl = 0.5 * ((p_logvar - logvar_z) + (logvar_z.exp() + (mu_z - p_mu) ** 2) / p_logvar.exp() - 1)
        kl = torch.sum(kl * pi.unsqueeze(1).expand(n_cells, self.z_dim, n_types))
        target = F.one_hot(labels, n_types).float()
        kl_pi = torch.sum(pi * (torch.log(pi + eps) - torch.log(target + eps)))
        return recon + kl + kl_pi


class SimplifiedOriginalGMVAE(nn.Module):
    """A lighter re-implementation of the original's loop structure, used for the figures quoted
    before the published code was read (README): encoder looped over K in Python (one shared
    trunk), the full decoder called 3*K times, probability-space ZINB, but every per-type tensor
    contiguous [B, G] and summed straight away (no [B, G, K] stacks, no second encoder)."""

    def __init__(self, n_genes: int, n_types: int, z_dim: int = 32):
        super().__init__()
        self.n_types = n_types
        self.cls = nn.Sequential(nn.Linear(n_genes, 128), nn.ReLU(), nn.Linear(128, n_types))
        self.enc1, self.enc2 = nn.Linear(n_genes + n_types, 128), nn.Linear(128, 64)
        self.enc_mu, self.enc_logvar = nn.Linear(64, z_dim), nn.Linear(64, z_dim)
        self.mu_w1, self.mu_w2 = nn.Linear(n_types, 128), nn.Linear(128, z_dim)
        self.logvar_w1, self.logvar_w2 = nn.Linear(n_types, 128), nn.Linear(128, z_dim)
        self.dec1 = nn.Linear(z_dim, 64)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, n_genes)) for _ in range(3))
        self.register_buffer("onehot", torch.eye(n_types))

    def decoder(self, z):
        hidden = F.relu(self.dec1(z))
        dropout = torch.sigmoid(self.heads[0](hidden))
        mean = torch.clamp(torch.exp(self.heads[1](hidden)), 1e-5, 1e6)
        disp = F.elu(self.heads[2](hidden)) + 1.0
        return dropout, mean, disp

    @staticmethod
    def zinb_nll(x, dropout, mean, disp, eps=1e-10):
        nb_case = (torch.lgamma(disp + eps) + torch.lgamma(x + 1.0) - torch.lgamma(x + disp + eps)
                   + (disp + x) * torch.log(1.0 + mean / (disp + eps)) + x * (torch.log(disp + eps) - torch.log(mean + eps)))
        nb_case = nb_case - torch.log(1.0 - dropout + eps)
        zero_nb = torch.pow(disp / (disp + mean + eps), disp)
        zero_case = -torch.log(dropout + (1.0 - dropout) * zero_nb + eps)
        return torch.where(x < 1e-8, zero_case, nb_case).sum(-1)

    def forward(self, x, labels):
        batch = x.shape[0]
        pi = torch.softmax(self.cls(x), -1)
        loss = 0.0
        for k in range(self.n_types):
            onehot = self.onehot[k].expand(batch, self.n_types)
            hidden = F.relu(self.enc2(F.relu(self.enc1(torch.cat([x, onehot], 1)))))
            mu, logvar = self.enc_mu(hidden), self.enc_logvar(hidden)
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            p_mu = self.mu_w2(F.relu(self.mu_w1(onehot)))
            p_logvar = self.logvar_w2(F.relu(self.logvar_w1(onehot)))
            dropout, mean, disp = self.decoder(z)[0], self.decoder(z)[1], self.decoder(z)[2]
            nll = self.zinb_nll(x, dropout, mean, disp)
            kl = 0.5 * (p_logvar - logvar + (logvar.exp() + (mu - p_mu) ** 2) / p_logvar.exp() - 1).sum(-1)
            loss = loss + (pi[:, k] * (nll + kl)).sum()
        return loss + F.kl_div(torch.log(pi + 1e-10), self.onehot[labels], reduction="sum")


ORIGINALS = {"published": PublishedGMVAE, "simplified": SimplifiedOriginalGMVAE}


# ----------------------------------------------------------------------------- workers
def _time_steps(step, n_batches: int, warmup: int = 1) -> float:
    """Median seconds per step over ``n_batches`` steps after ``warmup`` untimed ones (the VM is noisy: ±20%)."""
    for i in range(warmup):  # allocator, one-off setup
        step(i)
    seconds = []
    for i in range(warmup, warmup + n_batches):
        started = time.perf_counter()
        step(i)
        seconds.append(time.perf_counter() - started)
    return float(np.median(seconds))


def worker(job: dict, cfg) -> dict:
    set_torch_threads(0)
    data = np.load(cfg.DATA, allow_pickle=False)
    counts = sp.csr_matrix((data["data"], data["indices"], data["indptr"]), shape=tuple(data["shape"]))
    labels = data["labels"]
    n_train = int(data["n_train"])
    train, train_labels = counts[:n_train], labels[:n_train]
    test, test_labels = counts[n_train:], labels[n_train:]
    n_types = int(labels.max()) + 1
    rng = np.random.default_rng(cfg.SEED)
    set_seed(cfg.SEED)
    kind, batch_size = job["kind"], job["batch"]
    result = dict(job)
    if kind == "original":
        model = ORIGINALS[job["structure"]](counts.shape[1], n_types)
        optimizer = torch.optim.Adam(model.parameters(), lr=6e-6)
        order = rng.permutation(n_train)

        def step(i):
            index = order[i * batch_size:(i + 1) * batch_size]
            x = torch.as_tensor(train[index].toarray())
            loss = model(x, torch.as_tensor(train_labels[index]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        result["s_per_batch"] = _time_steps(step, job["n_batches"], warmup=job["warmup"])
    elif kind == "ours":
        model = GMVAE(counts.shape[1], n_types, log_input=LOG_INPUT)
        model.init_from_data(np.asarray(train.mean(axis=0)).ravel())
        if job.get("state"):
            model.load_state_dict(torch.load(job["state"], weights_only=True))
        optimizer = make_optimizer(model, LR)
        order = rng.permutation(n_train)
        pairs = []

        amp = amp_enabled(job.get("amp", cfg.AMP), "cpu")

        def step(i):
            index = order[(i * batch_size) % n_train:][:batch_size]
            with autocast("cpu", amp):
                out = model(Batch.from_csr(train[index], train_labels[index], "cpu"), pi_min=job["pi_min"],
                            pi_grad=PI_GRAD)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].mean().backward()
            optimizer.step()
            pairs.append(float(out["pairs"].mean()))

        result["s_per_batch"] = _time_steps(step, job["n_batches"])
        result["pairs_per_cell"] = float(np.mean(pairs))
    elif kind == "plateau":
        model = GMVAE(counts.shape[1], n_types, log_input=LOG_INPUT)
        model.init_from_data(np.asarray(train.mean(axis=0)).ravel())
        model.set_library_prior(*library_prior(train, train_labels, n_types))
        optimizer = make_optimizer(model, LR)
        best, best_time, stale, epochs = float("inf"), 0.0, 0, []
        started = time.perf_counter()
        result["warmup_accuracy"] = warm_up_classifier(model, train, train_labels, batch_size, "cpu", rng,
                                                       CLS_WARMUP_EPOCHS, LR)
        result["warmup_s"] = time.perf_counter() - started
        while True:
            epoch = len(epochs) + 1
            t0 = time.perf_counter()
            parts = train_epoch(model, optimizer, train, train_labels, batch_size, "cpu", rng, job["pi_min"], epoch,
                                pi_grad=PI_GRAD, amp=amp_enabled(cfg.AMP, "cpu"))
            train_seconds = time.perf_counter() - t0
            test_parts = evaluate(model, test, test_labels, 256, "cpu", job["pi_min"], cfg.SEED)
            elapsed = time.perf_counter() - started
            epochs.append(dict(epoch=epoch, train_s=round(train_seconds, 1), elapsed_s=round(elapsed, 1),
                               test_loss=round(test_parts["loss"], 2), accuracy=round(test_parts["accuracy"], 3),
                               pairs=round(parts["pairs"], 2)))
            print(json.dumps(epochs[-1]), file=sys.stderr, flush=True)
            if test_parts["loss"] < best - MIN_DELTA * abs(best if np.isfinite(best) else 0):
                best, best_time, stale = test_parts["loss"], elapsed, 0
            else:
                stale += 1
            if stale >= PATIENCE or elapsed > cfg.PLATEAU_MINUTES * 60:
                break
        result.update(epochs=epochs, plateau_s=best_time, plateau_loss=best, stopped=stale >= PATIENCE)
        torch.save(model.state_dict(), job["state"])
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def run_worker(job: dict, cfg) -> dict:
    """Run one job in a fresh process (its own peak RSS) and return its JSON result."""
    argv = [sys.executable, __file__, "--PART=worker", f"--DATA={cfg.DATA}", f"--WORKER={json.dumps(job)}",
            f"--SEED={cfg.SEED}", f"--PLATEAU_MINUTES={cfg.PLATEAU_MINUTES}", f"--AMP={cfg.AMP}"]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"worker {job} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report
def main(argv=None):
    cfg = load_config(globals(), argv)
    if cfg.PART == "worker":
        print(json.dumps(worker(json.loads(cfg.WORKER), cfg)))
        return
    n_test = int(round(cfg.N_CELLS * cfg.TEST_FRACTION))
    started = time.perf_counter()
    counts, labels = synthetic_counts(cfg.N_CELLS + n_test, cfg.N_GENES, cfg.N_TYPES, cfg.SEED)
    zeros = 1 - counts.nnz / (counts.shape[0] * counts.shape[1])
    print(f"command: {' '.join([sys.executable.split('/')[-1], *sys.argv])}")
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; AMP={cfg.AMP} -> "
          f"{'bfloat16 layers' if amp_enabled(cfg.AMP, 'cpu') else 'float32'}")
    print(f"data: {cfg.N_CELLS} train + {n_test} test cells x {cfg.N_GENES} genes, K={cfg.N_TYPES}, "
          f"{100 * zeros:.1f}% zeros (made in {time.perf_counter() - started:.0f} s)")
    workdir = Path(tempfile.mkdtemp(prefix="bench_gmvae_"))
    cfg.DATA = str(workdir / "data.npz")
    np.savez(cfg.DATA, data=counts.data, indices=counts.indices, indptr=counts.indptr,
             shape=np.array(counts.shape), labels=labels, n_train=cfg.N_CELLS)
    state = str(workdir / "plateau_state.pt")
    n_train = cfg.N_CELLS

    def per_epoch(result):
        return result["s_per_batch"] * int(np.ceil(n_train / result["batch"]))

    originals = {}
    for structure in ORIGINALS:
        result = run_worker(dict(kind="original", structure=structure, batch=cfg.ORIGINAL_BATCH,
                                 n_batches=cfg.ORIGINAL_BATCHES, warmup=cfg.ORIGINAL_WARMUP), cfg)
        originals[structure] = (result, per_epoch(result))
        print(f"\noriginal structure ({structure}), batch {cfg.ORIGINAL_BATCH}: {result['s_per_batch']:.2f} s/batch -> "
              f"{originals[structure][1]:.0f} s/epoch (extrapolated), peak RSS {result['peak_rss_mb']:.0f} MB")
    original_epoch = originals["published"][1]
    simplified_epoch = originals["simplified"][1]

    rows = []
    for batch in (cfg.ORIGINAL_BATCH, cfg.DEFAULT_BATCH):
        result = run_worker(dict(kind="ours", batch=batch, pi_min=0.0, n_batches=cfg.OURS_BATCHES), cfg)
        rows.append(("full sum over K (PI_MIN=0, exact)", result))
    plateau = run_worker(dict(kind="plateau", batch=cfg.DEFAULT_BATCH, pi_min=cfg.DEFAULT_PI_MIN, state=state), cfg)
    for amp in dict.fromkeys((cfg.AMP, "off")):
        for batch in (cfg.ORIGINAL_BATCH, cfg.DEFAULT_BATCH):
            result = run_worker(dict(kind="ours", batch=batch, pi_min=cfg.DEFAULT_PI_MIN, n_batches=cfg.OURS_BATCHES,
                                     state=state, amp=amp), cfg)
            precision = "bf16" if amp_enabled(amp, "cpu") else "fp32"
            rows.append((f"pruned, PI_MIN={cfg.DEFAULT_PI_MIN:g}, pi converged, {precision}", result))

    print(f"\n{'configuration':<42} {'batch':>5} {'pairs/cell':>10} {'s/epoch':>8} {'vs published':>12} "
          f"{'vs simplified':>13} {'peak RSS MB':>11}")
    for structure, (result, epoch) in originals.items():
        print(f"{f'original structure, {structure}':<42} {cfg.ORIGINAL_BATCH:>5} {cfg.N_TYPES:>10} {epoch:>8.0f} "
              f"{original_epoch / epoch:>11.1f}x {simplified_epoch / epoch:>12.1f}x {result['peak_rss_mb']:>11.0f}")
    for name, result in rows:
        epoch = per_epoch(result)
        print(f"{name:<42} {result['batch']:>5} {result['pairs_per_cell']:>10.2f} {epoch:>8.1f} "
              f"{original_epoch / epoch:>11.1f}x {simplified_epoch / epoch:>12.1f}x {result['peak_rss_mb']:>11.0f}")
    epochs = plateau["epochs"]
    print(f"\nplateau run at the defaults (batch {cfg.DEFAULT_BATCH}, LR {LR:g}, PI_MIN {cfg.DEFAULT_PI_MIN:g}, PI_GRAD {PI_GRAD}, "
          f"early stopping patience {PATIENCE}, min delta {MIN_DELTA:g}):")
    print(f"  classifier warm-up ({CLS_WARMUP_EPOCHS} epochs): {plateau['warmup_s']:.1f} s, "
          f"training accuracy {plateau['warmup_accuracy']:.3f}")
    for row in epochs:
        print(f"  epoch {row['epoch']:>3}: {row['train_s']:>6.1f} s train, test loss {row['test_loss']:>9.2f}, "
              f"accuracy {row['accuracy']:.3f}, pairs/cell {row['pairs']:.2f}, elapsed {row['elapsed_s']:.0f} s")
    status = "early stopping fired" if plateau["stopped"] else f"cap of {cfg.PLATEAU_MINUTES:g} min reached first"
    print(f"time to the held-out loss plateau: {plateau['plateau_s'] / 60:.1f} min (best test loss "
          f"{plateau['plateau_loss']:.2f}; {status}); whole run peak RSS {plateau['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
