"""What stage 5 decides and writes around the fit: the mode, the bulk's rows, the checks and the files."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from models.condition.fit import MODES
from models.utils import InputError


@torch.no_grad()
def own_type_share(model, sampler, n_types: int, n_per_type: int, generator: torch.Generator) -> list[float]:
    """Per type, the share of ``n_per_type`` cells drawn by ``sampler`` that the GMVAE's pi calls that type."""
    codes = torch.arange(n_types).repeat_interleave(n_per_type)
    counts = sampler(codes, generator)
    counts = torch.as_tensor(counts.toarray() if hasattr(counts, "toarray") else counts, dtype=torch.float32)
    called = model.class_logits(counts.to(model.onehot.device)).argmax(-1).cpu()
    return [float((called[codes == k] == k).float().mean()) for k in range(n_types)]


def top_shifted_genes(log_fold_change: np.ndarray, genes, cell_types, n_genes: int = 10) -> dict[str, pd.Series]:
    """Per type, the ``n_genes`` genes with the largest |log fold change| (signed values, by size)."""
    genes = np.asarray([str(g) for g in genes])
    out = {}
    for k, name in enumerate(cell_types):
        order = np.argsort(-np.abs(log_fold_change[k]), kind="stable")[:n_genes]
        out[str(name)] = pd.Series(log_fold_change[k][order], index=genes[order])
    return out


def choose_mode(requested: str, record: dict | None, has_baseline: bool, n_samples: int) -> tuple[str | None, str]:
    """(mode or None = do not condition, why) from CONDITION, stage 4's bulk record and the inputs.

    ``record``: stage 4's deconvolution/bulk.json for this bulk ({"protocol", "reference_protocol"}),
    or None when the bulk did not come through stage 4.
    """
    if requested not in ("auto", "none", *MODES):
        raise InputError(f"CONDITION must be 'auto', 'absolute', 'relative' or 'none', got {requested!r}")
    if requested == "none":
        return None, "CONDITION=none"
    if requested == "absolute":
        return "absolute", "CONDITION=absolute"
    if requested == "relative" or has_baseline:
        why = "CONDITION=relative" if requested == "relative" else "BULK_BASELINE is given"
        if not has_baseline and n_samples < 2:
            return None, f"{why}, but one bulk sample and no BULK_BASELINE leave nothing to compare with"
        return "relative", why + ("" if has_baseline else " (baseline: the mean of the samples)")
    if record is None:
        return "absolute", ("the bulk did not come through stage 4, so its platform is unknown: taken as the "
                            "reference's (pass --CONDITION=relative with BULK_BASELINE for another platform)")
    protocol, reference = record.get("protocol"), record.get("reference_protocol")
    if protocol is not None and protocol == reference:
        return "absolute", f"stage 4 read the bulk as {protocol} counts, as the reference's"
    what = f"{protocol} counts" if protocol else f"{record.get('unit', 'TPM')} of unknown protocol"
    if n_samples < 2:
        return None, (f"stage 4 read the bulk as {what} against a {reference} reference (another platform), and "
                      "one sample has nothing to compare with: pass BULK_BASELINE")
    return "relative", (f"stage 4 read the bulk as {what} against a {reference} reference (another platform): "
                        "log-ratios to the mean of the samples")


def align_samples(bulk: pd.DataFrame, samples, source: str) -> pd.DataFrame:
    """The bulk's rows in the order of the samples to generate (one and one match whatever the names)."""
    samples = [str(s) for s in samples]
    bulk = bulk.set_axis([str(s) for s in bulk.index], axis=0)
    if len(samples) == 1 and len(bulk) == 1:
        return bulk.set_axis(samples, axis=0)
    missing = [s for s in samples if s not in bulk.index]
    if missing:
        raise InputError(f"{source}: no bulk for samples {missing[:5]} (it has {list(bulk.index[:5])}); give the "
                         "bulk that stage 4 deconvolved, or pass --CONDITION=none")
    return bulk.loc[samples]


def save_npz(path, arrays: dict) -> None:
    """An .npz with fixed zip timestamps, so the same arrays give the same bytes (np.savez stamps the time)."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, value in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())
