"""Cell filtering by type size and the stratified train/test split (pure functions)."""
from __future__ import annotations

import numpy as np
import pandas as pd


def small_types(cell_types, min_cells: int) -> list[str]:
    """Names of the types with fewer than ``min_cells`` cells."""
    sizes = pd.Series(list(cell_types), dtype=str).value_counts()
    return sorted(sizes.index[sizes < min_cells])


def stratified_split(cell_types, test_fraction: float = 0.25, seed: int = 123) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test), taking ``round(test_fraction * n_k)`` cells of each type into test.

    Within each type the test cells are a seeded random choice, so the split is reproducible
    and each type's test share is within one cell of ``test_fraction``. Indices are sorted.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    labels = pd.Series(list(cell_types), dtype=str).to_numpy()
    rng = np.random.default_rng(seed)
    test = []
    for name in sorted(set(labels)):  # sorted: the draw order must not depend on hash order
        members = np.flatnonzero(labels == name)
        n_test = int(round(test_fraction * len(members)))
        test.append(rng.choice(members, size=n_test, replace=False))
    test = np.sort(np.concatenate(test)) if test else np.array([], dtype=np.int64)
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def cap_per_type(cell_types, max_per_type: int, seed: int = 123) -> np.ndarray:
    """Sorted indices keeping at most ``max_per_type`` cells of each type (a seeded random choice
    within the larger types; smaller types whole). ``max_per_type <= 0`` keeps every cell."""
    labels = pd.Series(list(cell_types), dtype=str).to_numpy()
    if max_per_type <= 0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    kept = []
    for name in sorted(set(labels)):  # sorted: the draw order must not depend on hash order
        members = np.flatnonzero(labels == name)
        kept.append(members if len(members) <= max_per_type else rng.choice(members, size=max_per_type, replace=False))
    return np.sort(np.concatenate(kept)) if kept else np.array([], dtype=np.int64)
