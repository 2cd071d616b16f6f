"""The TAPE wall: sandbox, simulation, training, checkpoint and prediction (see the package docstring)."""
from __future__ import annotations

import contextlib
import copy
import io as _io
import logging
import os
import random
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from models.bulk import PROTOCOLS, counts_to_expression
from models.deconvolution.content import reference_library
from models.deconvolution.units import (MODEL_SCALE, align_genes, marker_genes, model_scale, reference_profile,
                                        scale_samples, select_genes)
from models.utils import InputError, bound_heap_fragmentation, set_torch_threads

log = logging.getLogger(__name__)

TAPE_VERSION = "1.1.2"
# TAPE's predict() runs adaptive_stage(step=300, max_iter=3) in mode="overall"; kept verbatim.
ADAPTIVE_STEP = 300
ADAPTIVE_MAX_ITER = 3
GENE_SELECTIONS = ("all", "markers")  # TapeSettings.gene_selection
MEMBER_DATA = ("shared", "bootstrap")  # TapeSettings.member_data

# ============================================================================= TAPE import
def import_tape():
    """Import TAPE without letting it silence every warning in the process."""
    with warnings.catch_warnings():  # restores warnings.filters on exit
        import TAPE  # noqa: F401
        import TAPE.model
        import TAPE.simulation
        import TAPE.train
    return TAPE


class _LogWriter(_io.TextIOBase):
    """A file-like object sending TAPE's ``print`` lines to our logger at DEBUG."""

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                log.debug("TAPE: %s", line.strip())
        return len(text)


@contextlib.contextmanager
def tape_sandbox(workdir: str | Path, n_threads: int | None = None):
    """Run TAPE code inside a scratch folder under ``workdir`` with every global restored.

    Restores: cwd, warnings filters, matplotlib rcParams (``sns.set()``), open figures
    (closes the new ones), torch thread count, the random/numpy/torch global RNG states.
    TAPE's prints go to DEBUG logging.
    """
    import matplotlib
    import matplotlib.pyplot as plt
    import torch

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    figures_before = set(plt.get_fignums())
    threads_before = torch.get_num_threads()
    # TAPE reseeds the global generators (np.random.seed in the simulation, reproducibility(0)
    # at every adaptive step); the caller's random streams continue as if it had not run.
    rng_states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    if n_threads is not None:
        set_torch_threads(n_threads)
    try:
        with tempfile.TemporaryDirectory(prefix=".tape_", dir=workdir) as scratch, \
                contextlib.chdir(scratch), warnings.catch_warnings(), matplotlib.rc_context(), \
                contextlib.redirect_stdout(_LogWriter()):
            # plt.show() on a non-interactive backend only warns; TAPE calls it after each plot.
            warnings.filterwarnings("ignore", message=".*non-interactive.*", category=UserWarning)
            # anndata notes TAPE's integer obs index being turned into strings; harmless.
            warnings.filterwarnings("ignore", message="Transforming to str index")
            yield Path(scratch)
            stray = sorted(os.listdir(scratch))
            if stray:
                log.debug("TAPE left %s in its scratch folder (removed)", stray)
    finally:
        for number in set(plt.get_fignums()) - figures_before:
            plt.close(number)
        torch.set_num_threads(threads_before)
        random.setstate(rng_states[0])
        np.random.set_state(rng_states[1])
        torch.set_rng_state(rng_states[2])


# ============================================================================= training
@dataclass
class TapeSettings:
    """Knobs of TAPE's simulation and training (names as in TAPE where it has them)."""

    samplenum: int = 2000  # simulated bulk samples
    n_cells: int = 500  # cells per simulated sample (TAPE's ``n``)
    epochs: int = 64
    batch_size: int = 128
    variance_threshold: float = 0.98
    adaptive: bool = False
    sparse: bool = True  # half the simulated samples get half the types set to zero
    seed: int = 0
    reference_protocol: str = "umi"  # "umi": simulated counts -> CPM; "full_length": -> TPM (TAPE's)
    platform_sd: float = 0.0  # augmentation: sd of per-(sample, gene) log-normal multipliers on the training bulks
    length_slope_sd: float = 0.0  # augmentation: sd of a per-sample slope of log expression on log gene length
    gene_selection: str = "all"  # "all": TAPE's variance filter only; "markers": also only units.marker_genes
    markers_per_type: int = 200  # with "markers": each type's most specific genes
    marker_min_detection: float = 0.1  # with "markers": detected in at least this share of the type's cells
    members: int = 1  # ensemble: TAPE fits with seeds seed .. seed + members - 1, averaged
    member_data: str = "shared"  # "shared": every member trains on the same simulated bulks; "bootstrap": member
    #                              m > 0 on bulks simulated (seed + m) from a per-type bootstrap of the reference cells


@dataclass
class TapeFit:
    """A trained TAPE model with what prediction needs; ``checkpoint_dict()`` saves it."""

    model: object  # TAPE.model.AutoEncoder (the first member)
    genes: list[str]
    cell_types: list[str]  # TAPE's output order (sorted reference names)
    settings: TapeSettings
    train_seconds: float = 0.0
    simulate_seconds: float = 0.0
    profile: pd.Series | None = None  # reference_profile(), for telling a new bulk's protocol
    halfwidth: pd.Series | None = None  # per-type half-width of the 90 % intervals (intervals.conformal_halfwidth)
    gene_ids: list[str] | None = None  # ids of `genes` (e.g. Ensembl) when the reference had them
    extra: dict = field(default_factory=dict)
    members: list = field(default_factory=list)  # every member's AutoEncoder, ``model`` first
    library: pd.Series | None = None  # each type's mean counts per cell in the reference (content.reference_library)
    calibration: tuple | None = None  # (model inputs [n, genes], truth [n, types]) of the interval calibration bulks

    def __post_init__(self):
        if not self.members:
            self.members = [self.model]


def simulate_bulks(reference: pd.DataFrame, settings: TapeSettings, workdir: str | Path,
                   n_threads: int | None = None):
    """TAPE's ``generate_simulated_data`` on a float32 copy of ``reference`` -> AnnData.

    reference: cells x genes raw counts, index = cell-type name (TAPE's txt layout).
    Returns AnnData (samplenum x genes counts, obs = proportions, columns sorted type names).
    """
    tape = import_tape()
    if "celltype" in reference.columns:
        raise InputError("the reference has a gene named 'celltype', which TAPE uses as its label column")
    frame = reference.astype(np.float32, copy=True)  # TAPE adds/drops columns in place
    with tape_sandbox(workdir, n_threads):
        simulated = tape.simulation.generate_simulated_data(
            frame, n=settings.n_cells, samplenum=settings.samplenum, random_state=settings.seed,
            sparse=settings.sparse)
    return simulated


def simulated_tpm(simulated, gene_lengths: pd.Series | None, protocol: str = "full_length") -> pd.DataFrame:
    """TPM of TAPE's simulated counts: CPM for "umi" counts, TAPE's counts2TPM for "full_length"."""
    counts = pd.DataFrame(np.asarray(simulated.X), columns=simulated.var_names.astype(str))
    tpm, overlap = counts_to_expression(counts, gene_lengths, protocol)
    log.info("simulated training bulks -> %s", "CPM (UMI counts: no length correction)" if overlap is None
             else f"TPM: {overlap}")
    return tpm


def calibration_bulks(reference: pd.DataFrame, settings: TapeSettings, n_samples: int,
                      gene_lengths: pd.Series | None, workdir: str | Path,
                      n_threads: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Bulks with known truth for the intervals: TAPE's simulation with another seed.

    Returns (TPM as :func:`prepare_bulk` gives it for the reference's protocol, samples x genes;
    true proportions, samples x sorted type names), ``n_samples`` rows each.
    """
    calib = TapeSettings(**{**asdict(settings), "samplenum": n_samples, "seed": settings.seed + 1})
    simulated = simulate_bulks(reference, calib, workdir, n_threads)
    counts = pd.DataFrame(np.asarray(simulated.X), columns=simulated.var_names.astype(str))
    tpm, _ = counts_to_expression(counts, gene_lengths, settings.reference_protocol)
    truth = pd.DataFrame(simulated.obs.to_numpy(np.float64), index=tpm.index,
                         columns=[str(c) for c in simulated.obs.columns])
    return tpm, truth


def augment_platform(train_tpm: pd.DataFrame, gene_lengths: pd.Series | None, platform_sd: float,
                     length_slope_sd: float, seed: int) -> pd.DataFrame:
    """Simulated bulks as if from other platforms: x * exp(sd * N(0, 1) + b * centred log length).

    Each (sample, gene) gets an independent log-normal multiplier and each sample a gene-length
    slope b ~ N(0, length_slope_sd), so the network cannot lean on exact per-gene levels that
    differ between a UMI reference and full-length bulks (DAISM-like augmentation). Rows are
    renormalised to 1e6. Genes without a length get the median length.
    """
    rng = np.random.default_rng([seed, 2])
    log_factor = rng.normal(0.0, platform_sd, train_tpm.shape) if platform_sd > 0 else np.zeros(train_tpm.shape)
    if length_slope_sd > 0 and gene_lengths is not None:
        log_length = np.log(gene_lengths.reindex(train_tpm.columns).fillna(gene_lengths.median()).to_numpy(float))
        log_factor += rng.normal(0.0, length_slope_sd, (len(train_tpm), 1)) * (log_length - log_length.mean())[None, :]
    values = train_tpm.to_numpy(np.float64) * np.exp(log_factor)
    values *= 1e6 / values.sum(axis=1, keepdims=True)
    return pd.DataFrame(values, index=train_tpm.index, columns=train_tpm.columns)


def bootstrap_reference(reference: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The reference's cells resampled with replacement within each type (type sizes kept)."""
    rng = np.random.default_rng([seed, 3])
    codes, _ = pd.factorize(reference.index)
    rows = np.concatenate([rng.choice(np.flatnonzero(codes == k), (codes == k).sum()) for k in range(codes.max() + 1)])
    return reference.iloc[np.sort(rows)]


def _training_tpm(simulated, gene_lengths: pd.Series, settings: TapeSettings, seed: int) -> pd.DataFrame:
    """TAPE's simulated counts -> TPM (augmented if asked) at the model's scale (:func:`model_scale`)."""
    train_tpm = simulated_tpm(simulated, gene_lengths, settings.reference_protocol)
    if settings.platform_sd > 0 or settings.length_slope_sd > 0:
        train_tpm = augment_platform(train_tpm, gene_lengths, settings.platform_sd, settings.length_slope_sd, seed)
        log.info("augmented the training bulks: per-gene log-normal sd %.2f, gene-length slope sd %.2f",
                 settings.platform_sd, settings.length_slope_sd)
    return model_scale(train_tpm, gene_lengths)


def fit_tape(reference: pd.DataFrame, bulk_tpm: pd.DataFrame, gene_lengths: pd.Series,
             settings: TapeSettings, workdir: str | Path, n_threads: int | None = None,
             simulated=None) -> TapeFit:
    """Simulate bulks from ``reference`` and train TAPE's AutoEncoder on the genes shared with ``bulk_tpm``.

    reference: cells x genes counts, index = cell-type name. bulk_tpm: samples x genes in
    transcripts per million (:func:`prepare_bulk`). Both go to :func:`model_scale` with
    ``gene_lengths``. ``simulated`` (AnnData from :func:`simulate_bulks`) skips the simulation.
    """
    tape = import_tape()
    bound_heap_fragmentation()
    start = time.perf_counter()
    if simulated is None:
        simulated = simulate_bulks(reference, settings, workdir, n_threads)
    simulate_seconds = time.perf_counter() - start
    if settings.reference_protocol not in PROTOCOLS:
        raise InputError(f"the reference protocol must be one of {PROTOCOLS}, got {settings.reference_protocol!r}")
    if settings.member_data not in MEMBER_DATA:
        raise InputError(f"member_data must be one of {MEMBER_DATA}, got {settings.member_data!r}")
    train_tpm = _training_tpm(simulated, gene_lengths, settings, settings.seed)
    genes = select_genes(train_tpm, model_scale(bulk_tpm, gene_lengths), settings.variance_threshold)
    if settings.gene_selection == "markers":
        markers = set(marker_genes(reference, settings.markers_per_type, settings.marker_min_detection,
                                   settings.reference_protocol, gene_lengths))
        log.info("gene selection: %d of %d genes are among the %d markers (%d per type, detected in >= %.0f %% "
                 "of the type's cells)", sum(g in markers for g in genes), len(genes), len(markers),
                 settings.markers_per_type, 100 * settings.marker_min_detection)
        genes = [g for g in genes if g in markers]
    elif settings.gene_selection not in GENE_SELECTIONS:
        raise InputError(f"GENE_SELECTION must be one of {GENE_SELECTIONS}, got {settings.gene_selection!r}")
    if not genes:
        raise InputError("no gene survives TAPE's variance filter and the intersection with the bulk")
    train_x = scale_samples(train_tpm, genes)
    train_y = simulated.obs.to_numpy(dtype=np.float64)  # TAPE passes obs.values (float64)
    cell_types = [str(c) for c in simulated.obs.columns]
    del train_tpm
    log.info("training TAPE on %d simulated samples x %d genes, %d cell types, %d epochs, batch %d",
             train_x.shape[0], train_x.shape[1], len(cell_types), settings.epochs, settings.batch_size)
    start = time.perf_counter()
    members = []
    for member in range(max(1, settings.members)):
        x, y = train_x, train_y
        if member > 0 and settings.member_data == "bootstrap":
            seed = settings.seed + member
            resampled = bootstrap_reference(reference, seed)
            boot = simulate_bulks(resampled, TapeSettings(**{**asdict(settings), "seed": seed}), workdir, n_threads)
            del resampled
            x = scale_samples(_training_tpm(boot, gene_lengths, settings, seed), genes)
            y = boot.obs[cell_types].to_numpy(dtype=np.float64)
            del boot
        with tape_sandbox(workdir, n_threads):
            tape.train.reproducibility(settings.seed + member)  # member 0 is the single fit
            members.append(tape.train.train_model(x, y, batch_size=settings.batch_size, epochs=settings.epochs))
    train_seconds = time.perf_counter() - start
    log.info("TAPE simulation %.1f s, training %.1f s (%d member%s)", simulate_seconds, train_seconds,
             len(members), "" if len(members) == 1 else "s")
    profile = reference_profile(reference, settings.reference_protocol, gene_lengths)
    return TapeFit(members[0], genes, cell_types, settings, train_seconds, simulate_seconds,
                   profile=profile.reindex(genes, fill_value=0.0), members=members,
                   library=reference_library(reference).reindex(cell_types))


# ============================================================================= checkpoint
def checkpoint_dict(fit: TapeFit) -> dict:
    """Everything prediction needs, as tensors and primitives (``torch.load(weights_only=True)``)."""
    import torch

    return {
        "state_dict": {k: v.detach().cpu() for k, v in fit.model.state_dict().items()},
        # Further ensemble members (absent for a single fit and in checkpoints from before ensembles).
        **({} if len(fit.members) < 2 else
           {"member_state_dicts": [{k: v.detach().cpu() for k, v in m.state_dict().items()}
                                   for m in fit.members[1:]]}),
        "input_dim": int(fit.model.inputdim),
        "output_dim": int(fit.model.outputdim),
        "genes": list(fit.genes),
        "cell_types": list(fit.cell_types),
        # How a bulk becomes the model's input (prepare_bulk, model_scale, scale_samples).
        "preprocessing": {"unit": "TPM", "reference_protocol": fit.settings.reference_protocol,
                          "scale": MODEL_SCALE, "transform": "log(x+1)", "scaler": "mms",
                          "axis": "per sample"},
        "settings": asdict(fit.settings),
        "tape_version": TAPE_VERSION,
        # no timings here (they go to the log): the same SEED gives a byte-identical tape.pt
        # The reference's mean TPM over `genes`: lets a reloaded model tell a new bulk's protocol.
        **({} if fit.profile is None else
           {"profile": torch.as_tensor(fit.profile.reindex(fit.genes).to_numpy(np.float64))}),
        # The genes' ids (a list of strings, so weights_only loading still works): a reloaded
        # model matches a bulk named by id too (models.genes.match_genes).
        **({} if fit.gene_ids is None else {"gene_ids": [str(g) for g in fit.gene_ids]}),
        # Each type's mean counts per cell in the reference, in cell_types order: the content per cell that
        # TAPE's proportions assume (content.py; absent in checkpoints from before CELL_CONTENT).
        **({} if fit.library is None else
           {"library": torch.as_tensor(fit.library.reindex(fit.cell_types).to_numpy(np.float64))}),
        # Per-type half-width of the 90 % intervals, in cell_types order (absent before they existed).
        **({} if fit.halfwidth is None else
           {"halfwidth": torch.as_tensor(fit.halfwidth.reindex(fit.cell_types).to_numpy(np.float64))}),
        # The calibration bulks themselves (model inputs in float16, truth in cell_types order): a bulk that departs
        # from them gets wider intervals (intervals.departure_halfwidth; absent before that existed).
        **({} if fit.calibration is None else
           {"calibration_x": torch.as_tensor(np.asarray(fit.calibration[0], np.float16)),
            "calibration_truth": torch.as_tensor(fit.calibration[1][list(fit.cell_types)].to_numpy(np.float64))}),
    }


def save_checkpoint(fit: TapeFit, path: str | Path) -> None:
    from models.io import save_torch

    save_torch(checkpoint_dict(fit), path)


def load_checkpoint(path: str | Path) -> dict:
    """Load ``tape.pt`` with ``weights_only=True`` (no pickled code is ever executed)."""
    from models.io import load_torch

    path = Path(path)
    if not path.exists():
        raise InputError(f"missing {path}: run _4_deconvolve_bulk.py with --RETRAIN=true first")
    needed = ("state_dict", "input_dim", "output_dim", "genes", "cell_types")
    ckpt = load_torch(path, "bulk2sc TAPE checkpoint", "retrain it with --RETRAIN=true", needed)
    if ckpt.get("preprocessing", {}).get("scale") != MODEL_SCALE:
        raise InputError(f"{path} was trained by an older bulk2sc whose bulk units differ (UMI references "
                         "were length-divided); rerun _2_prepare_sctape.py, then _4_ with --RETRAIN=true")
    return ckpt


def checkpoint_profile(ckpt: dict) -> pd.Series | None:
    """The reference profile saved in a checkpoint (None in checkpoints from before it was saved)."""
    if "profile" not in ckpt:
        return None
    return pd.Series(np.asarray(ckpt["profile"], dtype=np.float64), index=list(ckpt["genes"]))


def checkpoint_halfwidth(ckpt: dict) -> pd.Series | None:
    """The intervals' per-type half-width saved in a checkpoint (None in checkpoints from before them)."""
    if "halfwidth" not in ckpt:
        return None
    return pd.Series(np.asarray(ckpt["halfwidth"], dtype=np.float64), index=list(ckpt["cell_types"]))


def checkpoint_calibration(ckpt: dict) -> tuple[np.ndarray, pd.DataFrame] | None:
    """(model inputs, truth) of the calibration bulks saved in a checkpoint (None before they were saved)."""
    if "calibration_x" not in ckpt:
        return None
    return (np.asarray(ckpt["calibration_x"], dtype=np.float32),
            pd.DataFrame(np.asarray(ckpt["calibration_truth"], dtype=np.float64), columns=list(ckpt["cell_types"])))


def checkpoint_library(ckpt: dict) -> pd.Series | None:
    """The reference's mean counts per cell per type saved in a checkpoint (None before CELL_CONTENT)."""
    if "library" not in ckpt:
        return None
    return pd.Series(np.asarray(ckpt["library"], dtype=np.float64), index=list(ckpt["cell_types"]))


def checkpoint_protocol(ckpt: dict) -> str:
    """The reference protocol a checkpoint was trained with; older checkpoints used TAPE's TPM."""
    return str(ckpt.get("settings", {}).get("reference_protocol", "full_length"))


def model_from_checkpoint(ckpt: dict, member: int = 0):
    """TAPE's AutoEncoder with the saved weights of ensemble ``member``, in eval/test state."""
    tape = import_tape()
    model = tape.model.AutoEncoder(ckpt["input_dim"], ckpt["output_dim"])
    model.load_state_dict(ckpt["state_dict"] if member == 0 else ckpt["member_state_dicts"][member - 1])
    model.to(tape.model.device)
    model.eval()
    model.state = "test"
    return model


def models_from_checkpoint(ckpt: dict) -> list:
    """Every ensemble member's AutoEncoder (one for a single fit)."""
    return [model_from_checkpoint(ckpt, m) for m in range(1 + len(ckpt.get("member_state_dicts", [])))]


# ============================================================================= prediction
def _renormalise(pred: np.ndarray, source: str) -> np.ndarray:
    """Rows that TAPE's ReLU+sum made 0/0 become uniform (with a warning); rows sum to 1."""
    bad = ~np.isfinite(pred).all(axis=1)
    if bad.any():
        log.warning("%s: %d samples had all-zero TAPE outputs; set to uniform proportions", source, bad.sum())
        pred[bad] = 1.0 / pred.shape[1]
    return pred / pred.sum(axis=1, keepdims=True)


def predict_scaled(model, x: np.ndarray, adaptive: bool, n_threads: int | None = None,
                   workdir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """TAPE's prediction on preprocessed input ``x`` (n_samples, n_genes) -> (proportions, signature).

    adaptive=False: one forward pass in test state (ReLU, then divide by the row sum), as
    TAPE's ``predict(adaptive=False)``. adaptive=True: TAPE's ``adaptive_stage`` (mode
    "overall", 300 steps x 3) on a *copy* of the model, so the saved weights never change; it
    also returns the adapted signature matrix (n_types, n_genes).
    """
    import torch

    tape = import_tape()
    if not adaptive:
        threads_before = torch.get_num_threads()
        if n_threads is not None:
            set_torch_threads(n_threads)
        try:
            model.eval()
            model.state = "test"
            with torch.no_grad():
                _, pred, _ = model(torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(tape.model.device))
            return pred.cpu().numpy().astype(np.float64), None
        finally:
            torch.set_num_threads(threads_before)
    bound_heap_fragmentation()  # 1,800 Adam steps: without it RSS reached 13 GB on one Kang bulk (12,681 genes)
    adapted = copy.deepcopy(model)
    decoder = [{"params": [p for n, p in adapted.named_parameters() if "decoder" in n]}]
    encoder = [{"params": [p for n, p in adapted.named_parameters() if "encoder" in n]}]
    optimizer_d = torch.optim.Adam(decoder, lr=1e-4)
    optimizer_e = torch.optim.Adam(encoder, lr=1e-4)
    with tape_sandbox(workdir or tempfile.gettempdir(), n_threads):
        signature, _, pred = tape.train.adaptive_stage(
            adapted, np.asarray(x, np.float32), optimizer_d, optimizer_e,
            step=ADAPTIVE_STEP, max_iter=ADAPTIVE_MAX_ITER)
    return np.asarray(pred, np.float64), np.asarray(signature)


def predict_members(ckpt: dict, bulk_tpm: pd.DataFrame, gene_lengths: pd.Series, adaptive: bool | None = None,
                    min_shared_genes: int = 1, source: str = "bulk", n_threads: int | None = None,
                    workdir: str | Path | None = None, model=None) -> list[pd.DataFrame]:
    """Each ensemble member's proportions (samples x TAPE's cell types, rows sum to 1) of a bulk.

    bulk_tpm: samples x genes in transcripts per million (:func:`prepare_bulk`), brought to the
    model's scale with ``gene_lengths`` (:func:`model_scale`). ckpt: :func:`checkpoint_dict` /
    :func:`load_checkpoint`. ``adaptive`` defaults to the setting the model was trained with.
    ``model`` reuses already built AutoEncoders (one, or a list of the members).
    """
    if adaptive is None:
        adaptive = bool(ckpt.get("settings", {}).get("adaptive", False))
    x = model_inputs(ckpt, bulk_tpm, gene_lengths, min_shared_genes, source)
    models = models_from_checkpoint(ckpt) if model is None else (model if isinstance(model, list) else [model])
    frames = []
    for member in models:
        pred, _ = predict_scaled(member, x, adaptive, n_threads, workdir)
        frames.append(pd.DataFrame(_renormalise(pred, source), index=bulk_tpm.index, columns=list(ckpt["cell_types"])))
    return frames


def model_inputs(ckpt: dict, bulk_tpm: pd.DataFrame, gene_lengths: pd.Series, min_shared_genes: int = 1,
                 source: str = "bulk") -> np.ndarray:
    """A TPM bulk as the model's input [samples, the checkpoint's genes] (model_scale, align_genes, scale_samples)."""
    genes = list(ckpt["genes"])
    aligned = align_genes(model_scale(bulk_tpm, gene_lengths), genes, min(min_shared_genes, len(genes)), source)
    return scale_samples(aligned, genes)


def reconstruction(models, n_threads: int | None = None):
    """forward(x) -> (proportions [n, K], reconstruction [n, genes]), each the mean over ``models`` (one
    AutoEncoder or the members), in test state: TAPE's proportions and their signature mix."""
    import torch

    members = models if isinstance(models, list) else [models]
    device = import_tape().model.device

    def forward(x):
        threads_before = torch.get_num_threads()
        if n_threads is not None:
            set_torch_threads(n_threads)
        try:
            preds, recons = [], []
            for member in members:
                member.eval()
                member.state = "test"
                with torch.no_grad():
                    recon, pred, _ = member(torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(device))
                preds.append(pred.cpu().numpy().astype(np.float64))
                recons.append(recon.cpu().numpy().astype(np.float64))
            return np.mean(preds, axis=0), np.mean(recons, axis=0)
        finally:
            torch.set_num_threads(threads_before)
    return forward


def predict_proportions(ckpt: dict, bulk_tpm: pd.DataFrame, gene_lengths: pd.Series, adaptive: bool | None = None,
                        min_shared_genes: int = 1, source: str = "bulk", n_threads: int | None = None,
                        workdir: str | Path | None = None, model=None) -> pd.DataFrame:
    """Cell-type proportions (samples x TAPE's cell types, rows sum to 1) of a bulk: the mean over the
    ensemble's members (:func:`predict_members`, same arguments)."""
    frames = predict_members(ckpt, bulk_tpm, gene_lengths, adaptive, min_shared_genes, source, n_threads,
                             workdir, model)
    return sum(frames[1:], frames[0]) / len(frames)
