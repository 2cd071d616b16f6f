"""Supervised Gaussian-mixture VAE over K cell types (the bulk2sc generator), vectorised over K.

Architecture (faithful to the original bulk2sc GMVAE):

- assignment  pi(x) = softmax(MLP G -> 128 -> K)
- encoder     q(z | x, k): MLP on [x, onehot_k], G+K -> 128 -> 64 -> (mean, log-variance) of Z
- prior       p(z | k): two MLPs K -> 128 -> Z (mean and log-variance), held as [K, Z] tensors
- decoder     z -> 64, then three heads 64 -> 128 -> G: ZINB dropout logits, log mean, log theta
- loss        sum_k pi_k [KL(q_k || p_k) - log p(x | z_k)] + KL(onehot(label) || pi)

The last term is ``F.kl_div(log pi, onehot)`` i.e. the cross-entropy -log pi_label (KL in the
other direction is infinite against a one-hot target).

Vectorisation: the first encoder layer on [x, onehot_k] is ``W_x x + W_e[:, k]``, so ``W_x x``
is computed once per cell; all (cell, type) pairs go through the rest of the encoder and the
decoder in one batched pass, and the prior is one [K, Z] evaluation. There is no Python loop
over K.

Bounded memory: the decoder outputs are (pairs, G) tensors. Pairs are processed in chunks of at
most ``chunk_elements / G`` rows; with more than one chunk each is wrapped in activation
checkpointing, so the backward pass holds one chunk's activations at a time (exact, ~1/3 more
decoder compute). Optionally (``pi_min > 0``) pairs whose pi_k is below ``pi_min`` are skipped
(the label's own component is always kept). That drops terms whose total weight is reported as
``skipped_mass`` per cell; ``pi_min = 0`` is the full, faithful objective.

Likelihood work: the decoder never sees a dense copy of x per pair. The x == 0 term is summed
densely; at the nonzero counts (gathered from the batch's CSR) the nonzero term replaces it, so
``lgamma`` runs only at nonzeros; value and gradients come from one fused pass
(``models.distributions.row_log_likelihood``).

Options (all off = the original model): ``log_input`` feeds log1p(x) to the classifier and the
encoder; ``library`` makes the mean ``softmax(h) * library`` with the cell's observed total count
(scVI style); for generation the library is drawn from a per-type log-normal fitted on the
training cells and stored in the model (``lib_loc``, ``lib_scale`` buffers).
"""
from __future__ import annotations

import math

import numpy as np
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial, row_log_likelihood

LIKELIHOODS = ("zinb", "nb")


@dataclass
class Batch:
    """One minibatch on the device: counts as CSR pieces (never a dense copy per pair)."""

    dense: torch.Tensor  # [B, G] float counts (for the first layers)
    crow: torch.Tensor  # [B + 1] int64 CSR row pointers
    col: torch.Tensor  # [nnz] int64 gene index of each nonzero
    val: torch.Tensor  # [nnz] float count of each nonzero
    labels: torch.Tensor  # [B] int64 type codes

    @classmethod
    def from_csr(cls, csr, labels, device) -> "Batch":
        """From a scipy CSR slice (cells x genes) and numpy labels; transfers sparse, densifies on device."""
        crow = torch.as_tensor(csr.indptr, dtype=torch.int64).to(device)
        col = torch.as_tensor(csr.indices, dtype=torch.int64).to(device)
        val = torch.as_tensor(csr.data, dtype=torch.float32).to(device)
        rows = torch.repeat_interleave(torch.arange(csr.shape[0], device=device), crow[1:] - crow[:-1])
        dense = torch.zeros(csr.shape, dtype=torch.float32, device=device)
        dense[rows, col] = val
        return cls(dense, crow, col, val, torch.as_tensor(labels, dtype=torch.int64).to(device))


class GMVAE(nn.Module):
    """Supervised GMVAE; build with ``GMVAE(**config)`` where ``config`` holds only primitives."""

    def __init__(self, n_genes: int, n_types: int, z_dim: int = 32, enc_hidden1: int = 128,
                 enc_hidden2: int = 64, cls_hidden: int = 128, prior_hidden: int = 128,
                 dec_hidden1: int = 64, dec_hidden2: int = 128, likelihood: str = "zinb",
                 log_input: bool = False, library: bool = False, chunk_elements: int = 1 << 23):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        self.config = dict(
            n_genes=n_genes, n_types=n_types, z_dim=z_dim, enc_hidden1=enc_hidden1, enc_hidden2=enc_hidden2,
            cls_hidden=cls_hidden, prior_hidden=prior_hidden, dec_hidden1=dec_hidden1,
            dec_hidden2=dec_hidden2, likelihood=likelihood, log_input=log_input, library=library,
            chunk_elements=chunk_elements,
        )
        self.n_genes, self.n_types, self.z_dim = n_genes, n_types, z_dim
        self.likelihood, self.log_input, self.library = likelihood, log_input, library
        self.chunk_elements = chunk_elements

        self.classifier = nn.Sequential(nn.Linear(n_genes, cls_hidden), nn.ReLU(), nn.Linear(cls_hidden, n_types))
        # [x, onehot_k] -> 128 split as W_x x + W_e[:, k]; W_e is stored as [K, 128] rows.
        self.enc_x = nn.Linear(n_genes, enc_hidden1)
        self.enc_type = nn.Parameter(torch.empty(n_types, enc_hidden1))
        bound = 1.0 / math.sqrt(n_genes + n_types)  # nn.Linear's init for the joint G+K input
        nn.init.uniform_(self.enc_type, -bound, bound)
        with torch.no_grad():
            self.enc_x.weight.uniform_(-bound, bound)
            self.enc_x.bias.uniform_(-bound, bound)
        self.enc_hidden = nn.Linear(enc_hidden1, enc_hidden2)
        self.enc_mu = nn.Linear(enc_hidden2, z_dim)
        self.enc_logvar = nn.Linear(enc_hidden2, z_dim)

        self.prior_mu = nn.Sequential(nn.Linear(n_types, prior_hidden), nn.ReLU(), nn.Linear(prior_hidden, z_dim))
        self.prior_logvar = nn.Sequential(nn.Linear(n_types, prior_hidden), nn.ReLU(), nn.Linear(prior_hidden, z_dim))

        n_heads = 3 if likelihood == "zinb" else 2
        self.dec_in = nn.Linear(z_dim, dec_hidden1)
        # The heads' hidden layers run as one (64 -> n_heads * 128) matmul; outputs stay separate.
        self.dec_hidden = nn.Linear(dec_hidden1, n_heads * dec_hidden2)
        self.dec_mean = nn.Linear(dec_hidden2, n_genes)
        self.dec_theta = nn.Linear(dec_hidden2, n_genes)
        self.dec_dropout = nn.Linear(dec_hidden2, n_genes) if likelihood == "zinb" else None
        self.register_buffer("onehot", torch.eye(n_types))
        self.register_buffer("lib_loc", torch.zeros(n_types))  # per-type log-library mean
        self.register_buffer("lib_scale", torch.ones(n_types))  # per-type log-library sd
        # Per-type full-covariance Gaussian fitted to the training cells' encodings (fit_posterior_prior);
        # post_fitted == 0 until it is fitted, and generation then uses the learned p(z | k).
        self.register_buffer("post_mean", torch.zeros(n_types, z_dim))
        self.register_buffer("post_chol", torch.eye(z_dim).repeat(n_types, 1, 1))
        self.register_buffer("post_fitted", torch.zeros((), dtype=torch.bool))
        # Per-type, per-gene log factor that makes the generated mean counts equal the training
        # cells' (fit_mean_calibration); zeros = no calibration.
        self.register_buffer("mean_log_ratio", torch.zeros(n_types, n_genes))

    # ------------------------------------------------------------------ pieces
    def _input(self, dense: torch.Tensor) -> torch.Tensor:
        return torch.log1p(dense) if self.log_input else dense

    def prior_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [K, Z], log-variance [K, Z]) of p(z | k)."""
        return self.prior_mu(self.onehot), self.prior_logvar(self.onehot)

    def class_logits(self, dense: torch.Tensor) -> torch.Tensor:
        """Assignment logits [B, K] from counts [B, G]."""
        return self.classifier(self._input(dense))

    def encode_pairs(self, dense: torch.Tensor, rows: torch.Tensor, types: torch.Tensor):
        """q(z | x_rows, types): (mean, log-variance), each [P, Z], for P (cell, type) pairs."""
        shared = self.enc_x(self._input(dense))  # [B, H1], once per cell
        hidden = F.relu(shared[rows] + self.enc_type[types])
        hidden = F.relu(self.enc_hidden(hidden))
        return self.enc_mu(hidden), self.enc_logvar(hidden)

    def decode(self, z: torch.Tensor, log_library: torch.Tensor | None = None):
        """(log mean, log theta, dropout logits or None), each [P, G], from z [P, Z]."""
        hidden = F.relu(self.dec_hidden(F.relu(self.dec_in(z))))
        heads = hidden.chunk(3 if self.dec_dropout is not None else 2, dim=-1)
        log_mu = self.dec_mean(heads[0])
        if self.library:
            log_mu = torch.log_softmax(log_mu, dim=-1) + log_library[:, None]
        log_theta = self.dec_theta(heads[1])
        zi_logits = self.dec_dropout(heads[2]) if self.dec_dropout is not None else None
        return log_mu, log_theta, zi_logits

    def _pair_log_likelihood(self, z, log_library, nz_pair, nz_col, nz_val):
        """sum_g log p(x_g | z) per pair [P]; nonzeros given as (pair, gene, count) triplets."""
        log_mu, log_theta, zi_logits = (None if t is None else t.to(z.dtype) for t in self.decode(z, log_library))
        return row_log_likelihood(log_mu, log_theta, zi_logits, nz_pair, nz_col, nz_val)

    @staticmethod
    def _pair_nonzeros(batch: Batch, rows: torch.Tensor):
        """(pair index, gene, count) of every nonzero of every pair's cell, sorted by pair; plus per-pair offsets."""
        lengths = (batch.crow[1:] - batch.crow[:-1])[rows]
        offsets = torch.zeros(len(rows) + 1, dtype=torch.int64, device=rows.device)
        offsets[1:] = torch.cumsum(lengths, 0)
        n_total = int(offsets[-1])
        nz_pair = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), lengths, output_size=n_total)
        position = (torch.arange(n_total, device=rows.device) - offsets[:-1][nz_pair] + batch.crow[rows][nz_pair])
        return nz_pair, batch.col[position], batch.val[position], offsets

    def log_likelihood_pairs(self, batch: Batch, rows: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x_rows | z) summed over genes, [P], in memory-bounded chunks of pairs."""
        nz_pair, nz_col, nz_val, offsets = self._pair_nonzeros(batch, rows)
        log_library = torch.log(batch.dense.sum(-1).clamp_min(1.0))[rows] if self.library else None
        step = max(1, self.chunk_elements // self.n_genes)
        if len(rows) <= step:
            return self._pair_log_likelihood(z, log_library, nz_pair, nz_col, nz_val)
        parts = []
        for start in range(0, len(rows), step):
            stop = min(start + step, len(rows))
            a, b = int(offsets[start]), int(offsets[stop])
            args = (z[start:stop], None if log_library is None else log_library[start:stop],
                    nz_pair[a:b] - start, nz_col[a:b], nz_val[a:b])
            if torch.is_grad_enabled():
                parts.append(checkpoint(self._pair_log_likelihood, *args, use_reentrant=False))
            else:
                parts.append(self._pair_log_likelihood(*args))
        return torch.cat(parts)

    # ------------------------------------------------------------------ objective
    def forward(self, batch: Batch, pi_min: float = 0.0, generator: torch.Generator | None = None,
                sample_z: bool = True, pi_grad: bool = True) -> dict[str, torch.Tensor]:
        """Per-cell loss parts [B]: ``loss = recon + kl_z + kl_pi``.

        ``recon`` = sum_k pi_k * (-log p(x | z_k)), ``kl_z`` = sum_k pi_k * KL(q_k || p_k),
        ``kl_pi`` = -log pi_label. Also ``nelbo_label`` (-ELBO under the labelled type alone, an
        upper bound on -log p(x | label)), ``skipped_mass`` (pi mass of skipped pairs), ``pairs``
        (components evaluated per cell) and ``log_pi`` [B, K].

        ``pi_grad=False`` detaches pi where it weights the mixture terms: the loss value is the
        same, but the assignment MLP then learns from -log pi_label alone (the original lets the
        reconstruction terms pull pi too, which early in training scrambles it; see README).
        """
        n_cells = batch.dense.shape[0]
        # .to(dtype): under mixed precision (models.train.autocast) the layers run in bfloat16, the
        # losses always in the data's precision (float32).
        dtype = batch.dense.dtype
        log_pi = torch.log_softmax(self.class_logits(batch.dense).to(dtype), dim=-1)
        pi = log_pi.exp()
        if pi_min > 0:
            keep = pi.detach() >= pi_min
            keep[torch.arange(n_cells, device=keep.device), batch.labels] = True
            rows, types = keep.nonzero(as_tuple=True)
            skipped = (pi.detach() * (~keep)).sum(-1)
        else:
            rows = torch.arange(n_cells, device=pi.device).repeat_interleave(self.n_types)
            types = torch.arange(self.n_types, device=pi.device).repeat(n_cells)
            skipped = torch.zeros(n_cells, device=pi.device)

        q_mu, q_logvar = (t.to(dtype) for t in self.encode_pairs(batch.dense, rows, types))
        p_mu, p_logvar = (t.to(dtype) for t in self.prior_params())
        p_mu, p_logvar = p_mu[types], p_logvar[types]
        kl = 0.5 * (p_logvar - q_logvar + (q_logvar.exp() + (q_mu - p_mu) ** 2) * torch.exp(-p_logvar) - 1.0).sum(-1)
        if sample_z:
            noise = torch.randn(q_mu.shape, generator=generator, device=q_mu.device, dtype=q_mu.dtype)
            z = q_mu + torch.exp(0.5 * q_logvar) * noise
        else:
            z = q_mu
        nll = -self.log_likelihood_pairs(batch, rows, z)

        weight = pi[rows, types] if pi_grad else pi.detach()[rows, types]
        zeros = torch.zeros(n_cells, device=pi.device, dtype=pi.dtype)
        recon = zeros.index_add(0, rows, weight * nll)
        kl_z = zeros.index_add(0, rows, weight * kl)
        kl_pi = -log_pi.gather(1, batch.labels[:, None]).squeeze(1)
        is_label = (types == batch.labels[rows]).to(nll.dtype)
        nelbo_label = zeros.index_add(0, rows, is_label * (nll + kl).detach())
        pairs = torch.bincount(rows, minlength=n_cells).to(pi.dtype)
        return dict(loss=recon + kl_z + kl_pi, recon=recon, kl_z=kl_z, kl_pi=kl_pi, nelbo_label=nelbo_label,
                    skipped_mass=skipped, pairs=pairs, log_pi=log_pi.detach())

    def loss(self, batch: Batch, pi_min: float = 0.0, generator: torch.Generator | None = None,
             pi_grad: bool = True) -> torch.Tensor:
        """Mean per-cell loss of a batch (the training objective)."""
        return self(batch, pi_min=pi_min, generator=generator, pi_grad=pi_grad)["loss"].mean()

    def init_from_data(self, gene_means) -> None:
        """Start the mean head at each gene's average count (bias = log mean), so the first
        epochs fit structure, not scale. The likelihood and the architecture are unchanged."""
        log_means = torch.log(torch.as_tensor(gene_means, dtype=torch.float32).clamp_min(1e-4))
        with torch.no_grad():
            self.dec_mean.bias.copy_(log_means.to(self.dec_mean.bias.device))

    # ------------------------------------------------------------------ generation
    def set_library_prior(self, loc, scale) -> None:
        """Store the per-type log-normal library-size distribution used by ``sample_counts``."""
        with torch.no_grad():
            self.lib_loc.copy_(torch.as_tensor(loc, dtype=torch.float32))
            self.lib_scale.copy_(torch.as_tensor(scale, dtype=torch.float32))

    def distribution(self, z: torch.Tensor, log_library: torch.Tensor | None = None):
        """The count distribution p(x | z) as a (ZI)NB Distribution, batch shape [P, G]."""
        return self.distribution_from_params(*self.decode(z, log_library))

    @staticmethod
    def distribution_from_params(log_mu: torch.Tensor, log_theta: torch.Tensor, zi_logits: torch.Tensor | None):
        """A (ZI)NB Distribution from the decoder's outputs (log mean, log theta, dropout logits or None)."""
        if zi_logits is None:
            return NegativeBinomial(log_mu.exp(), log_theta.exp())
        return ZeroInflatedNegativeBinomial(log_mu.exp(), log_theta.exp(), zi_logits)

    @torch.no_grad()
    def fit_posterior_prior(self, batches) -> None:
        """Fit, per type, a full-covariance Gaussian to where the encoder puts that type's cells.

        ``batches`` yields :class:`Batch` objects of labelled (training) cells. Each cell is
        encoded under its own label; type k gets mean = the average of its cells' q means and
        covariance = their covariance + the average q variance (the moments of the aggregate
        posterior, the mixture of the cells' q(z | x, k)). Sampling z from it, instead of from
        the learned diagonal p(z | k), keeps the correlations between latent dimensions that the
        cells really have ("ex-post density estimation", Ghosh et al. 2020). A type with fewer
        than two cells keeps the learned prior.
        """
        means = [[] for _ in range(self.n_types)]
        variances = [[] for _ in range(self.n_types)]
        for batch in batches:
            rows = torch.arange(batch.dense.shape[0], device=batch.dense.device)
            q_mu, q_logvar = self.encode_pairs(batch.dense, rows, batch.labels)
            for k in torch.unique(batch.labels).tolist():
                take = batch.labels == k
                means[k].append(q_mu[take].double().cpu())
                variances[k].append(q_logvar[take].double().exp().cpu())
        p_mu, p_logvar = self.prior_params()
        post_mean = p_mu.detach().double().cpu().clone()
        post_cov = torch.diag_embed(p_logvar.detach().double().exp().cpu())
        for k in range(self.n_types):
            if sum(len(m) for m in means[k]) < 2:
                continue
            mu_k, var_k = torch.cat(means[k]), torch.cat(variances[k])
            post_mean[k] = mu_k.mean(0)
            post_cov[k] = torch.cov(mu_k.T).reshape(self.z_dim, self.z_dim) + torch.diag(var_k.mean(0))
        jitter = 1e-6 * torch.eye(self.z_dim, dtype=torch.float64)
        self.post_mean.copy_(post_mean.float())
        self.post_chol.copy_(torch.linalg.cholesky(post_cov + jitter).float())
        self.post_fitted.fill_(True)

    @torch.no_grad()
    def draw_prior(self, codes: torch.Tensor, generator: torch.Generator, noise_scale: float = 1.0,
                   prior=None, source: str = "learned"):
        """(z [N, Z], log library [N] or None) for cells of types ``codes`` (on the model's device).

        ``source="learned"``: z = p(z|k) mean + noise_scale * sd * eps (the original);
        ``"posterior"``: z = fitted mean + noise_scale * L eps with L the Cholesky factor of the
        fitted covariance (:meth:`fit_posterior_prior`; falls back to "learned" when not fitted).
        Then the library draw when the model has one; the one place these draws are made, so
        every sampler sees the same cells.
        """
        if source not in ("learned", "posterior"):
            raise ValueError(f"source must be 'learned' or 'posterior', got {source!r}")
        device, rand_device = codes.device, torch.device(generator.device)
        eps = torch.randn((len(codes), self.z_dim), generator=generator, device=rand_device).to(device)
        if source == "posterior" and bool(self.post_fitted):
            z = self.post_mean[codes] + noise_scale * torch.einsum("nij,nj->ni", self.post_chol[codes], eps)
        else:
            p_mu, p_logvar = prior if prior is not None else self.prior_params()
            z = p_mu[codes] + noise_scale * torch.exp(0.5 * p_logvar[codes]) * eps
        log_library = None
        if self.library:
            eps_lib = torch.randn(len(codes), generator=generator, device=rand_device).to(device)
            log_library = self.lib_loc[codes] + self.lib_scale[codes] * eps_lib
        return z, log_library

    @torch.no_grad()
    def generative_params(self, codes: torch.Tensor, generator: torch.Generator, noise_scale: float = 1.0,
                          source: str = "learned", calibrate: bool = False, prior=None,
                          z_shift: torch.Tensor | None = None, log_mean_shift: torch.Tensor | None = None,
                          frequency: bool = True):
        """(log mu, log theta, zi logits or None), float32 [N, G], of new cells of types ``codes``.

        z and the library from :meth:`draw_prior`, then the decoder; with ``calibrate`` each
        type's log means are shifted by ``mean_log_ratio`` (:meth:`fit_mean_calibration`).
        ``z_shift`` [K, Z] moves each type's z before the decoder and ``log_mean_shift`` [K, G]
        adds to each type's log means after it (a bulk sample's conditioning, models.condition).
        With ``frequency`` the gene shift is a change of burst frequency: log theta moves with the
        log mean and the log odds of a structural (dropout) zero against it, so an induced gene
        rises in every cell rather than in a few cells bursting larger; else only the mean moves.
        """
        z, log_library = self.draw_prior(codes, generator, noise_scale, prior, source)
        if z_shift is not None:
            z = z + z_shift.to(z.device)[codes]
        log_mu, log_theta, zi_logits = (None if t is None else t.float() for t in self.decode(z, log_library))
        if calibrate:
            log_mu = log_mu + self.mean_log_ratio[codes]
        if log_mean_shift is not None:
            shift = log_mean_shift.to(log_mu.device)[codes]
            log_mu = log_mu + shift
            if frequency:
                log_theta = log_theta + shift
                zi_logits = None if zi_logits is None else zi_logits - shift
        return log_mu, log_theta, zi_logits

    @torch.no_grad()
    def fit_mean_calibration(self, observed_means, n_cells, generator: torch.Generator, n_draws: int = 500,
                             source: str = "posterior", max_factor: float = 10.0) -> None:
        """Per type and gene, the factor that makes the generator's mean count equal the data's.

        ``observed_means``: [K, G] mean raw count of each gene in each type's (training) cells;
        ``n_cells``: [K] cells behind each row. The generator's mean E[(1 - pi) mu] is estimated
        from ``n_draws`` cells per type drawn from ``source``. The log ratio uses half a count
        per type as pseudo-count (so genes never seen in a type are pulled down, not to zero)
        and is clipped to +-log(max_factor). A VAE trained on the ELBO does not match the
        data's per-type means exactly (about 10% of (type, gene) pairs are off by more than
        1.5x on PBMC), which shows as a difference of spread in the generated cells; this puts
        the first moments where the data has them and leaves the covariance structure to the
        model. Types with no cells keep a factor of 1.
        """
        device = self.onehot.device
        observed = torch.as_tensor(np.asarray(observed_means), dtype=torch.float64, device=device)
        n_cells = torch.as_tensor(np.asarray(n_cells), dtype=torch.float64, device=device)
        ratio = torch.zeros(self.n_types, self.n_genes, dtype=torch.float64, device=device)
        for k in range(self.n_types):
            if n_cells[k] <= 0:
                continue
            codes = torch.full((n_draws,), k, dtype=torch.int64, device=device)
            log_mu, _, zi_logits = self.generative_params(codes, generator, source=source)
            keep = torch.sigmoid(-zi_logits) if zi_logits is not None else torch.ones_like(log_mu)
            expected = (keep * log_mu.exp()).double().mean(0)
            pseudo = 0.5 / n_cells[k]
            ratio[k] = torch.log((observed[k] + pseudo) / (expected + pseudo))
        self.mean_log_ratio.copy_(ratio.clamp(-math.log(max_factor), math.log(max_factor)).float())

    def sample_counts(self, type_codes: torch.Tensor, generator: torch.Generator,
                      noise_scale: float = 1.0, chunk_cells: int | None = None,
                      source: str = "learned", calibrate: bool = False, z_shift: torch.Tensor | None = None,
                      log_mean_shift: torch.Tensor | None = None, frequency: bool = True) -> torch.Tensor:
        """Integer-valued counts [N, G] (float32, CPU) for cells of the given type codes.

        Parameters from :meth:`generative_params` (z from ``source``, sd scaled by ``noise_scale``;
        the library, when on, log-normal with the type's stored (loc, scale); the means shifted by
        the fitted calibration when ``calibrate``; ``z_shift``/``log_mean_shift`` as there), then a
        Gamma-Poisson draw. All randomness
        comes from ``generator`` (its device is where the draws happen), so one seed gives the
        same cells.
        """
        device = self.onehot.device
        type_codes = torch.as_tensor(type_codes, dtype=torch.int64)
        if type_codes.numel() and (int(type_codes.min()) < 0 or int(type_codes.max()) >= self.n_types):
            raise ValueError(f"type codes must lie in 0..{self.n_types - 1}")
        p_mu, p_logvar = self.prior_params()
        chunk_cells = chunk_cells or max(1, self.chunk_elements // self.n_genes)
        out = torch.empty(len(type_codes), self.n_genes, dtype=torch.float32)
        for start in range(0, len(type_codes), chunk_cells):
            codes = type_codes[start:start + chunk_cells].to(device)
            log_mu, log_theta, zi_logits = self.generative_params(codes, generator, noise_scale, source, calibrate,
                                                                  (p_mu, p_logvar), z_shift, log_mean_shift, frequency)
            counts = self.distribution_from_params(log_mu, log_theta, zi_logits).sample(generator=generator)
            out[start:start + len(codes)] = counts.float().cpu()
        return out
