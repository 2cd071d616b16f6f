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
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from models import io
from models.config import load_config
from models.gmvae import GMVAE
from models.paths import CLUSTERS, Paths
from models.split import stratified_split
from models.train import (
    LOSS_PARTS,
    TrainingDiverged,
    amp_enabled,
    evaluate,
    fit_generation,
    is_finite,
    library_prior,
    load_checkpoint,
    make_optimizer,
    save_checkpoint,
    train_epoch,
    warm_up_classifier,
)
from models.utils import (
    InputError,
    bound_heap_fragmentation,
    get_device,
    peak_rss_mb,
    run_stage,
    set_seed,
    set_torch_threads,
    setup_logging,
)

log = logging.getLogger("bulk2sc.train_gmvae")

# -----------------------------------------------------------------------------
DATA_DIR = "data"  # root of every stage's inputs and outputs; relative paths are from the repo root
FIG_DIR = "fig"  # gmvae_loss.png goes here
SEED = 0  # seeds initialisation, shuffling and the z draws; same seed, same model
EPOCHS = 60  # total epochs (RESUME counts the ones already done); early stopping usually ends sooner
BATCH_SIZE = 128  # cells per step; the original used 37 (8x more steps per epoch, same memory bound)
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
SAVE_EVERY = 5  # epochs between checkpoint writes (and always at the end or an early stop)
RESUME = False  # continue from checkpoints/gmvae.pt (weights, optimizer, epoch, history) up to EPOCHS
DEVICE = "auto"  # "auto": CUDA when present, else CPU; or "cpu", "cuda", "cuda:1"
TORCH_THREADS = 0  # 0 = one per core
AMP = "auto"  # bfloat16 layers (float32 losses and weights): "auto" = where the CPU/GPU has native bf16; "bf16"; "off"
BOUND_HEAP = False  # glibc mmap threshold 64 KB: flat RSS but ~25% slower here (page faults); chunks already bound memory
# -----------------------------------------------------------------------------


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
    missing = sorted(set(range(len(cell_types))) - set(train.obs["partition"].to_numpy()))
    if missing:
        raise InputError(
            f"{paths.train_dir / CLUSTERS}: types {[cell_types[k] for k in missing]} have no training cells; "
            "labels must be 0..K-1 with every type present; rerun _1_split_train_test.py"
        )
    return train, cell_types


def validation_split(cell_types, fraction: float, seed: int, source) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows) of the training cells: ``fraction`` of each type, seeded.

    Every type keeps at least one cell to fit on; early stopping then never looks at test/.
    """
    if not 0.0 < fraction < 1.0:
        raise InputError(f"VALIDATION_FRACTION must be in (0, 1), got {fraction}")
    fit_rows, val_rows = stratified_split(cell_types, fraction, seed=seed)
    names = pd.Series(list(cell_types), dtype=str)
    lost = sorted(set(names) - set(names.iloc[fit_rows]))
    if lost:
        raise InputError(f"{source}: VALIDATION_FRACTION={fraction} leaves types {lost[:5]} no cells to train on; "
                         "lower VALIDATION_FRACTION")
    if len(val_rows) == 0:
        raise InputError(f"{source}: VALIDATION_FRACTION={fraction} of {len(names)} cells is no cell; "
                         "raise VALIDATION_FRACTION")
    return fit_rows, val_rows


def resume_state(cfg, paths: Paths, config: dict, genes, cell_types):
    """The checkpoint dict to resume from, checked against the data and the settings."""
    checkpoint = load_checkpoint(paths.gmvae_checkpoint)
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
    paths = Paths(cfg.DATA_DIR, cfg.FIG_DIR)
    set_seed(cfg.SEED)
    set_torch_threads(cfg.TORCH_THREADS)
    if cfg.BOUND_HEAP:
        bound_heap_fragmentation()
    device = get_device(cfg.DEVICE)
    amp = amp_enabled(cfg.AMP, device)

    train, cell_types = read_training(paths)
    genes = list(train.var_names)
    fit_rows, val_rows = validation_split(train.obs["cell_type"], cfg.VALIDATION_FRACTION, cfg.SEED,
                                          paths.train_dir)
    all_codes = train.obs["partition"].to_numpy().astype(np.int64)
    train_counts, train_codes = train.X[fit_rows], all_codes[fit_rows]
    val_counts, val_codes = train.X[val_rows], all_codes[val_rows]
    del train
    log.info("training on %d cells x %d genes, %d types (validation: %d cells of %s) on %s%s",
             len(fit_rows), len(genes), len(cell_types), len(val_rows), paths.train_dir, device,
             " (bfloat16 layers)" if amp else "")

    config = model_config(cfg, len(genes), len(cell_types))
    model = GMVAE(**config)
    model.init_from_data(np.asarray(train_counts.mean(axis=0)).ravel())
    model.set_library_prior(*library_prior(train_counts, train_codes, len(cell_types)))
    model.to(device)
    optimizer = make_optimizer(model, cfg.LR)
    start_epoch, best_loss, best_epoch, stale = 0, float("inf"), 0, 0
    history: list[dict] = []
    if cfg.RESUME and paths.gmvae_checkpoint.exists():
        checkpoint = resume_state(cfg, paths, config, genes, cell_types)
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch = checkpoint["epoch"]
        best_loss = checkpoint.get("best_val_loss", checkpoint.get("best_test_loss"))  # older checkpoints
        best_epoch = checkpoint["best_epoch"]
        stale = checkpoint["stale_evals"]
        history = read_history(paths.gmvae_history, start_epoch)
        log.info("resuming from epoch %d of %s", start_epoch, paths.gmvae_checkpoint)
    elif cfg.RESUME:
        log.warning("RESUME=true but %s does not exist; training from scratch", paths.gmvae_checkpoint)
    if start_epoch >= cfg.EPOCHS:
        log.info("checkpoint is already at epoch %d >= EPOCHS=%d; nothing to do", start_epoch, cfg.EPOCHS)
        return

    settings = {k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool))}
    rng = np.random.default_rng([cfg.SEED, start_epoch])  # resumed runs shuffle differently from epoch 1
    if start_epoch == 0 and cfg.CLS_WARMUP_EPOCHS > 0:
        accuracy = warm_up_classifier(model, train_counts, train_codes, cfg.BATCH_SIZE, device, rng,
                                      cfg.CLS_WARMUP_EPOCHS, cfg.LR)
        log.info("assignment MLP warmed up for %d epochs on -log pi_label: training accuracy %.3f",
                 cfg.CLS_WARMUP_EPOCHS, accuracy)

    def save(epoch: int) -> None:
        # what _5_ samples from: the per-type Gaussian of the training encodings (PRIOR="posterior")
        # and the per-type gene-mean calibration (CALIBRATE=True)
        fit_generation(model, train_counts, train_codes, cfg.EVAL_BATCH_SIZE, device, cfg.SEED)
        save_checkpoint(paths.gmvae_checkpoint, model, optimizer, epoch, genes, cell_types,
                        best_val_loss=float(best_loss), best_epoch=int(best_epoch), stale_evals=int(stale),
                        settings=settings)

    def write_history() -> None:
        io.write_table(pd.DataFrame(history), paths.gmvae_history, index=False)

    bar = tqdm(range(start_epoch + 1, cfg.EPOCHS + 1), initial=start_epoch, total=cfg.EPOCHS,
               desc="GMVAE", unit="epoch", dynamic_ncols=True)
    epoch = start_epoch
    for epoch in bar:
        started = time.perf_counter()
        try:
            train_parts = train_epoch(model, optimizer, train_counts, train_codes, cfg.BATCH_SIZE, device, rng,
                                      cfg.PI_MIN, epoch, pi_grad=cfg.PI_GRAD, amp=amp)
        except TrainingDiverged:
            if history:
                write_history()
            raise
        row = {"epoch": epoch, **{f"train_{k}": v for k, v in train_parts.items()}}
        row.update({f"val_{k}": float("nan") for k in (*LOSS_PARTS, "accuracy")})
        stop = False
        if epoch % cfg.TEST_EVERY == 0 or epoch == cfg.EPOCHS:
            val_parts = evaluate(model, val_counts, val_codes, cfg.EVAL_BATCH_SIZE, device, cfg.PI_MIN, cfg.SEED)
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
        row["seconds"] = time.perf_counter() - started
        history.append(row)
        write_history()
        bar.set_postfix(train=f"{row['train_loss']:.1f}", val=f"{row['val_loss']:.1f}",
                        acc=f"{row['val_accuracy']:.3f}")
        if stop or epoch % cfg.SAVE_EVERY == 0 or epoch == cfg.EPOCHS:
            save(epoch)
        if stop:
            log.info("validation loss has not improved for %d evaluations (best %.2f at epoch %d): stopping at epoch %d",
                     stale, best_loss, best_epoch, epoch)
            break
    bar.close()
    plot_history(pd.DataFrame(history), paths.fig_dir / "gmvae_loss.png")
    last = history[-1]
    log.info("epoch %d: validation loss %.2f (label -ELBO %.2f), accuracy %.3f; peak RSS %.0f MB; wrote %s",
             epoch, last["val_loss"], last["val_nelbo_label"], last["val_accuracy"], peak_rss_mb(),
             paths.gmvae_checkpoint)


if __name__ == "__main__":
    run_stage(main)
