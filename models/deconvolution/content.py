"""mRNA content per cell: TAPE's proportions under the reference's content -> under a given content.

What TAPE's output is. Its ``generate_simulated_data`` sums the *raw* counts of the cells it
draws (its ``normalize_total`` is commented out) and labels each simulated bulk with the drawn
cell fractions. So a type's share of a training bulk's RNA is its cell fraction times its mean
library size in the reference, ``L_k``, and TAPE learns cell fractions *under the reference's
content per cell*. A real bulk sums cells whose mRNA per cell is ``C_k``; TAPE then reads
``f*_k C_k`` as ``f_k L_k``, so the cell fractions are

    f*_k  ∝  f_k · L_k / C_k        (renormalised to sum 1)

With no content given, ``C = L`` and the proportions are TAPE's own. Content factors are
external knowledge about the cell types (EPIC publishes mRNA per cell for circulating immune
cells: ``GfellerLab/EPIC`` ``mRNA_cell_default``; quanTIseq its own); only their ratios matter.
The reference's library sizes are not a stand-in: in a reference sequenced per sorted
population (Zheng's) they carry each run's depth, not the cells' mRNA.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from models.utils import InputError

log = logging.getLogger(__name__)


def reference_library(reference: pd.DataFrame) -> pd.Series:
    """Each type's mean counts per cell in the reference (cells x genes, index = type name), sorted by name."""
    return reference.sum(axis=1).groupby(level=0, sort=True).mean().astype(np.float64)


def read_cell_content(path: str | Path, cell_types: list[str]) -> pd.Series:
    """A CELL_CONTENT table (columns ``cell_type,content``) -> relative mRNA per cell over ``cell_types``.

    Every type must be there with a finite content > 0; rows for other types are ignored (logged).
    """
    from models.io import read_csv_checked

    path = Path(path)
    fix = "give a CSV with columns cell_type,content: each reference type's relative mRNA per cell"
    if not path.exists():
        raise InputError(f"missing CELL_CONTENT file {path}; {fix}")
    table = read_csv_checked(path, fix)
    if not {"cell_type", "content"} <= set(table.columns):
        raise InputError(f"{path}: needs columns cell_type,content; found {list(table.columns)}; {fix}")
    names = table["cell_type"].astype(str)
    if names.duplicated().any():
        raise InputError(f"{path}: cell types {sorted(set(names[names.duplicated()]))} are listed twice; "
                         "give each type one row")
    content = pd.Series(pd.to_numeric(table["content"], errors="coerce").to_numpy(np.float64), index=names)
    missing = [t for t in cell_types if t not in content.index]
    if missing:
        raise InputError(f"{path}: no content for cell types {missing}; give a row for every reference type "
                         f"({', '.join(cell_types)})")
    content = content.reindex(cell_types)
    bad = content[~(np.isfinite(content) & (content > 0))]
    if len(bad):
        raise InputError(f"{path}: content must be a number > 0; found {bad.to_dict()}")
    extra = sorted(set(names) - set(cell_types))
    if extra:
        log.info("%s: rows for %s are not reference types (ignored)", path, extra)
    return content


def content_weights(library: pd.Series, content: pd.Series, cell_types: list[str]) -> np.ndarray:
    """Per-type factor ``L_k / C_k`` in ``cell_types`` order (the proportions are multiplied by it)."""
    return (library.reindex(cell_types) / content.reindex(cell_types)).to_numpy(np.float64)


def to_cell_content(pred: pd.DataFrame, weights: np.ndarray,
                    bounds: tuple[pd.DataFrame, pd.DataFrame] | None = None):
    """Proportions (samples x types, rows sum 1) under the reference's content -> under the given one.

    ``pred * weights`` renormalised per sample. ``bounds`` (lower, upper) are scaled by the same
    per-sample factor as the point, so they still contain it (clipped to [0, 1]).
    Returns (proportions, bounds or None).
    """
    scaled = pred * weights[None, :]
    norm = scaled.sum(axis=1)
    converted = scaled.div(norm, axis=0)
    if bounds is None:
        return converted, None
    return converted, tuple((b * weights[None, :]).div(norm, axis=0).clip(0.0, 1.0) for b in bounds)
