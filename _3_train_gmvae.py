"""Stage 3: train the supervised GMVAE (the single-cell generator) on the training cells.

Reads:
    DATA_DIR/train/   cells.h5ad, or matrix.mtx + genes.tsv + barcodes.tsv + clusters.csv (_1_);
                      VALIDATION_FRACTION of each type's cells (seeded) are set aside for the
                      validation loss and early stopping. DATA_DIR/test/ is not read: those
                      cells stay unseen until stage 5 scores the generated cells against them.
Writes:
    DATA_DIR/checkpoints/gmvae.pt       state_dict, config, optimizer, epoch, genes, cell_types,
                                        settings (loads with torch.load(..., weights_only=True))
    DATA_DIR/checkpoints/history.csv    one row per epoch: train_* and val_* loss parts, accuracy, seconds
    FIG_DIR/gmvae_loss.png              training and validation loss per epoch

The model and loss are the original bulk2sc GMVAE's (see models/gmvae.py), vectorised over the
K cell types. ``LOG_INPUT``, ``LIBRARY``, ``PI_MIN``, ``PI_GRAD`` and ``CLS_WARMUP_EPOCHS`` are
options; with ``--LOG_INPUT=false --PI_MIN=0 --PI_GRAD=true --CLS_WARMUP_EPOCHS=0`` (and the
default ``LIBRARY=false``) the objective and its gradients are exactly the original ones.

Run:
    python _3_train_gmvae.py
    python _3_train_gmvae.py --EPOCHS=200 --RESUME=true          # continue to 200 epochs in total
    python _3_train_gmvae.py --LIKELIHOOD=nb --DATA_DIR=/tmp/pbmc
    torchrun --standalone --nproc_per_node=4 _3_train_gmvae.py        # DDP; BATCH_SIZE is per rank
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 _3_train_gmvae.py
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from models import distributed, io
from models.config import load_config
from models.gmvae import GMVAE
from models.paths import CLUSTERS, H5AD, Paths
from models.split import stratified_split
from models.streaming import (H5adCells, InMemoryCells, csr_nbytes, eval_batches, fit_batches,
                              memory_budget_bytes, train_batches, type_sums)
from models.train import (
    LOSS_PARTS,
    TrainingDiverged,
    amp_enabled,
    evaluate_batches,
    fit_generation_from,
    is_finite,
    library_prior_from_sums,
    load_checkpoint,
    make_optimizer,
    save_checkpoint,
    train_steps,
    warm_up_steps,
)
from models.utils import (
    InputError,
    bound_heap_fragmentation,
    peak_rss_mb,
    run_stage,
    set_seed,
    setup_logging,
)

log = logging.getLogger("bulk2sc.train_gmvae")

# -----------------------------------------------------------------------------
DATA_DIR = "data"  # root of every stage's inputs and outputs; relative paths are from the repo root
FIG_DIR = "fig"  # gmvae_loss.png goes here
SEED = 0  # seeds initialisation, shuffling and the z draws; same seed, same model
EPOCHS = 60  # total epochs (RESUME counts the ones already done); early stopping usually ends sooner
BATCH_SIZE = 128  # cells per step and rank (torchrun: the effective batch is BATCH_SIZE x ranks); the original used 37
LR = 1e-3  # Adam; the original's 6e-6 with a summed loss needed 4,000 epochs, this mean loss needs tens
LIKELIHOOD = "zinb"  # "zinb" (the original's) or "nb" (no dropout head)
Z_DIM = 32  # latent size, as the original
ENC_HIDDEN1 = 128  # encoder G+K -> 128 -> 64 -> Z, as the original
ENC_HIDDEN2 = 64
CLS_HIDDEN = 128  # assignment MLP G -> 128 -> K
PRIOR_HIDDEN = 128  # prior MLPs K -> 128 -> Z
DEC_HIDDEN1 = 64  # decoder Z -> 64, then per head 64 -> 128 -> G
DEC_HIDDEN2 = 128
LOG_INPUT = False  # true: log1p(counts) into the classifier and encoder; raw counts (the original) fit PBMC 10 nats/cell better
LIBRARY = False  # mean = softmax * observed library size (scVI style); generation draws a per-type log-normal
PI_MIN = 1e-3  # skip (cell, type) pairs with pi below this (label always kept); 0 = full sum over K
PI_GRAD = False  # true: the mixture terms also train the assignment MLP (the original); false: only -log pi_label does
CLS_WARMUP_EPOCHS = 5  # first fit the assignment MLP alone on -log pi_label (seconds), so pi starts near the labels
CHUNK_ELEMENTS = 1 << 22  # decoder outputs per chunk of pairs (4M floats = 16 MB per tensor): bounds memory
VALIDATION_FRACTION = 0.1  # share of each type's training cells held out for early stopping (seeded by SEED)
EVAL_BATCH_SIZE = 256  # cells per batch for the validation loss (no gradients)
TEST_EVERY = 1  # epochs between validation evaluations (early stopping looks only at these)
PATIENCE = 5  # stop after this many evaluations without a relative validation-loss gain of MIN_DELTA
MIN_DELTA = 1e-3  # relative improvement that counts as progress (0.1% of the validation loss)
MEMORY_BUDGET_GB = "auto"  # load train/ whole below this size (CSR bytes), else stream it from cells.h5ad by blocks;
#                           "auto" = a quarter of the memory available at start, shared by this machine's ranks
BLOCK_CELLS = 4096  # rows per block read from cells.h5ad when streaming (one h5py read each; ~4 MB at 1,000 nnz/cell)
BUFFER_BLOCKS = 4  # streamed cells are shuffled within this many blocks (the blocks themselves in shuffled order)
SAVE_EVERY = 5  # epochs between checkpoint writes (and always at the end or an early stop)
RESUME = False  # continue from checkpoints/gmvae.pt (weights, optimizer, epoch, history) up to EPOCHS
DEVICE = "auto"  # "auto": CUDA when present, else CPU; or "cpu", "cuda", "cuda:1"
TORCH_THREADS = 0  # 0 = one per core
AMP = "auto"  # bfloat16 layers (float32 losses and weights): "auto" = where the CPU/GPU has native bf16; "bf16"; "off"
BOUND_HEAP = False  # glibc mmap threshold 64 KB: flat RSS but ~25% slower here (page faults); chunks already bound memory
# -----------------------------------------------------------------------------

_WARMUP_EPOCH_KEY = 1 << 20  # warm-up epoch e shuffles with (SEED, _WARMUP_EPOCH_KEY + e): apart from the epochs'


def model_config(cfg, n_genes: int, n_types: int) -> dict:
    """GMVAE keyword arguments (primitives only) from the constants."""
    return dict(
        n_genes=n_genes, n_types=n_types, z_dim=cfg.Z_DIM, enc_hidden1=cfg.ENC_HIDDEN1, enc_hidden2=cfg.ENC_HIDDEN2,
        cls_hidden=cfg.CLS_HIDDEN, prior_hidden=cfg.PRIOR_HIDDEN, dec_hidden1=cfg.DEC_HIDDEN1,
        dec_hidden2=cfg.DEC_HIDDEN2, likelihood=cfg.LIKELIHOOD, log_input=cfg.LOG_INPUT, library=cfg.LIBRARY,
        chunk_elements=cfg.CHUNK_ELEMENTS,
    )


def read_training(paths: Paths):
    """(train AnnData, cell types), checked: every type 0..K-1 has training cells."""
    train = io.read_dataset(paths.train_dir, stage="_1_split_train_test.py")
    cell_types = list(train.obs["cell_type"].cat.categories)
    check_types_present(train.obs["partition"].to_numpy(), cell_types, paths)
    return train, cell_types


def open_training(cfg, paths: Paths, ctx):
    """(CellSource, genes, cell types) of train/: loaded whole, or streamed from cells.h5ad when its
    matrix is larger than MEMORY_BUDGET_GB (each rank then reads only its own blocks)."""
    h5ad = paths.train_dir / H5AD
    budget = memory_budget_bytes(cfg.MEMORY_BUDGET_GB, ctx.local_world_size)
    if h5ad.exists() and csr_nbytes(h5ad) > budget:
        source = H5adCells(h5ad, cfg.BLOCK_CELLS)
        genes, cell_types = source.var_names, source.cell_types
        check_types_present(source.labels, cell_types, paths)
        log.info("streaming %s by blocks of %d cells: its matrix (%.2f GB as CSR) exceeds MEMORY_BUDGET_GB (%.2f GB)",
                 h5ad, cfg.BLOCK_CELLS, csr_nbytes(h5ad) / 1e9, budget / 1e9)
        return source, genes, cell_types
    train, cell_types = read_training(paths)
    source = InMemoryCells(train.X, train.obs["partition"].to_numpy(), cfg.BLOCK_CELLS)
    return source, list(train.var_names), cell_types


def check_types_present(labels, cell_types, paths: Paths) -> None:
    missing = sorted(set(range(len(cell_types))) - set(np.unique(labels).tolist()))
    if missing:
        raise InputError(
            f"{paths.train_dir / CLUSTERS}: types {[cell_types[k] for k in missing]} have no training cells; "
            "labels must be 0..K-1 with every type present; rerun _1_split_train_test.py"
        )


def validation_split(labels, fraction: float, seed: int, source, names=None) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows) of the training cells: ``fraction`` of each type, seeded.

    ``labels``: per-cell type codes (or names; ``names`` maps codes to names in messages). Every
    type keeps at least one cell to fit on; early stopping then never looks at test/.
    """
    if not 0.0 < fraction < 1.0:
        raise InputError(f"VALIDATION_FRACTION must be in (0, 1), got {fraction}")
    fit_rows, val_rows = stratified_split(labels, fraction, seed=seed)
    labels = np.asarray(labels)
    lost = sorted(set(labels.tolist()) - set(labels[fit_rows].tolist()))
    if names is not None:
        lost = [names[k] for k in lost]
    if lost:
        raise InputError(f"{source}: VALIDATION_FRACTION={fraction} leaves types {lost[:5]} no cells to train on; "
                         "lower VALIDATION_FRACTION")
    if len(val_rows) == 0:
        raise InputError(f"{source}: VALIDATION_FRACTION={fraction} of {len(labels)} cells is no cell; "
                         "raise VALIDATION_FRACTION")
    return fit_rows, val_rows


def resume_state(cfg, paths: Paths, config: dict, genes, cell_types):
    """The checkpoint dict to resume from, checked against the data and the settings."""
    checkpoint = load_checkpoint(paths.gmvae_checkpoint, fix="set RESUME=false to train afresh (it is then replaced)")
    if checkpoint["genes"] != list(genes) or checkpoint["cell_types"] != list(cell_types):
        raise InputError(
            f"{paths.gmvae_checkpoint}: trained on other genes or cell types than {paths.train_dir}; "
            "set RESUME=false to train afresh"
        )
    if checkpoint["config"] != config:
        changed = sorted(k for k in config if checkpoint["config"].get(k) != config[k])
        raise InputError(
            f"{paths.gmvae_checkpoint}: model settings {changed} differ from the checkpoint's; "
            "use the same settings to resume, or RESUME=false"
        )
    return checkpoint


def read_history(path, up_to_epoch: int) -> list[dict]:
    if not path.exists():
        return []
    history = pd.read_csv(path)
    return history[history["epoch"] <= up_to_epoch].to_dict("records")


def plot_history(history: pd.DataFrame, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(history["epoch"], history["train_loss"], label="train")
    validated = history.dropna(subset=["val_loss"])
    ax.plot(validated["epoch"], validated["val_loss"], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss per cell (nats)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv=None):
    cfg = load_config(globals(), argv)
    setup_logging()
    if cfg.LIKELIHOOD not in ("zinb", "nb"):
        raise InputError(f"LIKELIHOOD must be 'zinb' or 'nb', got {cfg.LIKELIHOOD!r}")
    ctx = distributed.init(cfg.DEVICE)  # a world of one unless started by torchrun
    try:
        train_model(cfg, ctx)
    finally:
        distributed.teardown(ctx)


def train_model(cfg, ctx) -> None:
    paths = Paths(cfg.DATA_DIR, cfg.FIG_DIR)
    set_seed(cfg.SEED)
    distributed.set_rank_threads(cfg.TORCH_THREADS, ctx)
    if cfg.BOUND_HEAP:
        bound_heap_fragmentation()
    device = ctx.device
    amp = amp_enabled(cfg.AMP, device)

    source, genes, cell_types = open_training(cfg, paths, ctx)
    fit_rows, val_rows = validation_split(source.labels, cfg.VALIDATION_FRACTION, cfg.SEED, paths.train_dir,
                                          cell_types)
    fit_mask = np.zeros(source.n_cells, dtype=bool)
    fit_mask[fit_rows] = True
    val_mask = ~fit_mask
    log.info("training on %d cells x %d genes, %d types (validation: %d cells of %s) on %s%s%s",
             len(fit_rows), len(genes), len(cell_types), len(val_rows), paths.train_dir, device,
             " (bfloat16 layers)" if amp else "",
             f", {ctx.world_size} ranks: effective batch {cfg.BATCH_SIZE * ctx.world_size}" if ctx.distributed else "")

    config = model_config(cfg, len(genes), len(cell_types))
    model = GMVAE(**config)
    # per-type gene sums and library sizes of the training cells: rank 0 alone needs them (it
    # initialises the model, which is then broadcast, and fits the generation buffers)
    check_source = source.path if not source.in_memory else None
    stats = distributed.on_main(ctx, lambda: type_sums(source, fit_mask, len(cell_types), check_source))
    sums, n_per_type, log_lib = stats
    model.init_from_data(sums.sum(axis=0) / max(n_per_type.sum(), 1))
    model.set_library_prior(*library_prior_from_sums(log_lib, n_per_type))
    model.to(device)
    optimizer = make_optimizer(model, cfg.LR)
    start_epoch, best_loss, best_epoch, stale = 0, float("inf"), 0, 0
    history: list[dict] = []
    resumable = cfg.RESUME and distributed.broadcast_object(paths.gmvae_checkpoint.exists(), ctx)  # rank 0's disk
    if resumable:
        # rank 0 reads and checks it; every rank gets the same weights, optimizer state and counters
        checkpoint = distributed.on_main(ctx, lambda: resume_state(cfg, paths, config, genes, cell_types))
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch = checkpoint["epoch"]
        best_loss = checkpoint.get("best_val_loss", checkpoint.get("best_test_loss"))  # older checkpoints
        best_epoch = checkpoint["best_epoch"]
        stale = checkpoint["stale_evals"]
        history = read_history(paths.gmvae_history, start_epoch) if ctx.is_main else []
        log.info("resuming from epoch %d of %s", start_epoch, paths.gmvae_checkpoint)
    elif cfg.RESUME:
        log.warning("RESUME=true but %s does not exist; training from scratch", paths.gmvae_checkpoint)
    distributed.broadcast_module(model, ctx)  # every rank starts from rank 0's weights
    if start_epoch >= cfg.EPOCHS:
        log.info("checkpoint is already at epoch %d >= EPOCHS=%d; nothing to do", start_epoch, cfg.EPOCHS)
        return

    def batches(epoch: int):
        return train_batches(source, fit_mask, cfg.BATCH_SIZE, cfg.SEED, epoch, device, ctx.rank, ctx.world_size,
                             cfg.BUFFER_BLOCKS)

    settings = {k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool))}
    if start_epoch == 0 and cfg.CLS_WARMUP_EPOCHS > 0:
        accuracy = warm_up_steps(model, lambda e: batches(_WARMUP_EPOCH_KEY + e), cfg.CLS_WARMUP_EPOCHS, cfg.LR, ctx)
        log.info("assignment MLP warmed up for %d epochs on -log pi_label: training accuracy %.3f",
                 cfg.CLS_WARMUP_EPOCHS, accuracy)
    trained = distributed.wrap(model, ctx)  # DDP under torchrun: gradients averaged over the ranks

    def save(epoch: int) -> None:
        if not ctx.is_main:
            return
        # what _5_ samples from: the per-type Gaussian of the training encodings (PRIOR="posterior")
        # and the per-type gene-mean calibration (CALIBRATE=True)
        fit_generation_from(model, fit_batches(source, fit_mask, cfg.EVAL_BATCH_SIZE, device), sums, n_per_type,
                            cfg.SEED)
        save_checkpoint(paths.gmvae_checkpoint, model, optimizer, epoch, genes, cell_types,
                        best_val_loss=float(best_loss), best_epoch=int(best_epoch), stale_evals=int(stale),
                        settings=settings)

    def write_history() -> None:
        if ctx.is_main:
            io.write_table(pd.DataFrame(history), paths.gmvae_history, index=False)

    bar = tqdm(range(start_epoch + 1, cfg.EPOCHS + 1), initial=start_epoch, total=cfg.EPOCHS,
               desc="GMVAE", unit="epoch", dynamic_ncols=True, disable=not ctx.is_main)
    epoch = start_epoch
    for epoch in bar:
        started = time.perf_counter()
        generator = torch.Generator(device=device).manual_seed(distributed.rank_seed(cfg.SEED, epoch, ctx.rank))
        try:
            train_parts = train_steps(trained, optimizer, batches(epoch), cfg.PI_MIN, epoch, pi_grad=cfg.PI_GRAD,
                                      amp=amp, generator=generator, ctx=ctx)
        except TrainingDiverged:
            if history:
                write_history()
            raise
        row = {"epoch": epoch, **{f"train_{k}": v for k, v in train_parts.items()}}
        row.update({f"val_{k}": float("nan") for k in (*LOSS_PARTS, "accuracy")})
        stop = False
        if epoch % cfg.TEST_EVERY == 0 or epoch == cfg.EPOCHS:
            keyed = eval_batches(source, val_mask, cfg.EVAL_BATCH_SIZE, device, ctx.rank, ctx.world_size)
            val_parts = evaluate_batches(model, keyed, cfg.PI_MIN, cfg.SEED, ctx)  # summed over the ranks
            if not is_finite(val_parts["loss"]):
                write_history()
                raise TrainingDiverged(
                    f"validation loss became {val_parts['loss']} at epoch {epoch}; {paths.gmvae_checkpoint} was "
                    "not overwritten. Lower LR or set LOG_INPUT=True and rerun"
                )
            row.update({f"val_{k}": v for k, v in val_parts.items()})
            if val_parts["loss"] < best_loss - cfg.MIN_DELTA * abs(best_loss if is_finite(best_loss) else 0):
                best_loss, best_epoch, stale = val_parts["loss"], epoch, 0
            else:
                stale += 1
                stop = stale >= cfg.PATIENCE
            stop = distributed.broadcast_object(stop, ctx)  # rank 0 decides; every rank stops together
        row["seconds"] = time.perf_counter() - started
        history.append(row)
        write_history()
        bar.set_postfix(train=f"{row['train_loss']:.1f}", val=f"{row['val_loss']:.1f}",
                        acc=f"{row['val_accuracy']:.3f}")
        if stop or epoch % cfg.SAVE_EVERY == 0 or epoch == cfg.EPOCHS:
            save(epoch)
        if stop:
            log.info("validation loss has not improved for %d evaluations (best %.2f at epoch %d): stopping at "
                     "epoch %d", stale, best_loss, best_epoch, epoch)
            break
    bar.close()
    if not ctx.is_main:
        return
    plot_history(pd.DataFrame(history), paths.fig_dir / "gmvae_loss.png")
    last = history[-1]
    log.info("epoch %d: validation loss %.2f (label -ELBO %.2f), accuracy %.3f; peak RSS %.0f MB; wrote %s",
             epoch, last["val_loss"], last["val_nelbo_label"], last["val_accuracy"], peak_rss_mb(),
             paths.gmvae_checkpoint)


if __name__ == "__main__":
    run_stage(main)
