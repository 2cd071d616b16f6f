"""One optimisation step under torchrun (or one process), for tests/test_distributed.py.

    torchrun --standalone --nproc_per_node=2 tests/helpers/ddp_step.py OUT.pt PHASE

Builds the tiny model and cells of :func:`step_setup`, takes one step of ``PHASE`` ("train":
the GMVAE objective through DistributedDataParallel; "warmup": the assignment MLP) over this
rank's shard, and on rank 0 saves the gradients and parameters after the step to ``OUT.pt``.
"""
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from models import distributed  # noqa: E402
from models.gmvae import GMVAE  # noqa: E402
from models.streaming import InMemoryCells, train_batches  # noqa: E402
from models.train import make_optimizer, train_steps, warm_up_steps  # noqa: E402
from models.utils import exit_torchrun_rank  # noqa: E402

SEED, EPOCH, BATCH = 3, 1, 16
CONFIG = dict(n_genes=40, n_types=3, z_dim=4, enc_hidden1=16, enc_hidden2=8, cls_hidden=16, prior_hidden=8,
              dec_hidden1=8, dec_hidden2=16, chunk_elements=40 * 8)  # 8 pairs per chunk: several checkpointed chunks


def step_setup():
    """(model, cells, mask): 2 x BATCH cells, so each of two ranks gets exactly one batch."""
    rng = np.random.default_rng(0)
    labels = np.arange(2 * BATCH) % 3
    counts = sp.csr_matrix(rng.negative_binomial(2, 0.4, size=(2 * BATCH, 40)).astype(np.float32))
    torch.manual_seed(SEED)
    model = GMVAE(**CONFIG)
    return model, InMemoryCells(counts, labels), np.ones(2 * BATCH, dtype=bool)


def main(out: str, phase: str) -> None:
    ctx = distributed.init("cpu")
    model, cells, mask = step_setup()
    batches = train_batches(cells, mask, BATCH, SEED, EPOCH, "cpu", ctx.rank, ctx.world_size)
    if phase == "warmup":
        warm_up_steps(model, lambda _: batches, 1, 1e-2, ctx)
        params = model.classifier
    else:
        optimizer = make_optimizer(model, 1e-2)
        generator = torch.Generator().manual_seed(distributed.rank_seed(SEED, EPOCH, ctx.rank))
        train_steps(distributed.wrap(model, ctx), optimizer, batches, 1e-3, EPOCH, pi_grad=True,
                    generator=generator, ctx=ctx)
        params = model
    if ctx.is_main:
        torch.save({"grads": {n: p.grad.clone() for n, p in params.named_parameters()},
                    "params": {n: p.detach().clone() for n, p in params.named_parameters()}}, out)
    distributed.teardown(ctx)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    exit_torchrun_rank()  # as the stages do (run_stage): no interpreter teardown for gloo's threads to abort
