"""Shared test data: one small simulated dataset (CellBender style) serves every test.

Nothing here touches the network. Tests that need the real files in ``../shared/data`` use
the ``shared_data`` fixture, which skips with a reason when the folder is absent.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models import io  # noqa: E402
from models.paths import Paths  # noqa: E402
from models.split import stratified_split  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"

TINY_TYPES = ["alpha", "beta", "gamma"]
TINY_CELLS_PER_TYPE = (90, 70, 50)
TINY_GENES = 120


def pytest_configure(config):
    config.addinivalue_line("markers", "internet: needs the network; skipped unless --run-internet")
    config.addinivalue_line("markers", "slow: the rest of the reliability suite (tens of seconds each, minutes in "
                                       "all); skipped unless --run-slow, so CI runs its representative subset")


def pytest_addoption(parser):
    parser.addoption("--run-internet", action="store_true", help="run tests that need the network")
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow")


def pytest_collection_modifyitems(config, items):
    skips = {}
    if not config.getoption("--run-internet"):
        skips["internet"] = pytest.mark.skip(reason="needs the network; run with --run-internet")
    if not config.getoption("--run-slow"):
        skips["slow"] = pytest.mark.skip(reason="slow; run with --run-slow")
    for item in items:
        for keyword, skip in skips.items():
            if keyword in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout, or skip."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it sits beside the checkout in CI)")
    return SHARED_DATA


def simulate_counts(seed: int = 0, cells_per_type=TINY_CELLS_PER_TYPE, n_genes: int = TINY_GENES):
    """Negative-binomial counts with type-specific means; gene names GENE0.. plus MT- genes.

    Returns (counts (n_cells, n_genes) int64, cell_type names, gene names).
    """
    rng = np.random.default_rng(seed)
    n_types = len(cells_per_type)
    base = rng.lognormal(mean=-0.5, sigma=1.2, size=n_genes)
    effects = rng.lognormal(mean=0.0, sigma=1.0, size=(n_types, n_genes))
    labels = np.repeat(np.arange(n_types), cells_per_type)
    library = rng.lognormal(mean=0.0, sigma=0.3, size=len(labels))
    mu = base[None, :] * effects[labels] * library[:, None]
    theta = 2.0
    counts = rng.negative_binomial(theta, theta / (theta + mu))
    genes = [f"GENE{i}" for i in range(n_genes - 3)] + ["MT-CO1", "MT-ND1", "MT-ATP6"]
    names = np.array(TINY_TYPES[:n_types] if n_types <= len(TINY_TYPES) else [f"type{k}" for k in range(n_types)])
    return counts.astype(np.int64), names[labels], genes


def gene_length_table(genes, seed: int = 0) -> pd.DataFrame:
    """A GeneLength.txt-style table for ``genes`` (one gene left out, to exercise the intersection)."""
    rng = np.random.default_rng(seed)
    kept = list(genes)[1:]
    start = rng.integers(1_000, 1_000_000, size=len(kept))
    return pd.DataFrame({
        "Gene name": kept,
        "Transcript start (bp)": start,
        "Transcript end (bp)": start + rng.integers(500, 50_000, size=len(kept)),
    })


@pytest.fixture(scope="session")
def tiny_adata():
    """210 cells x 120 genes of labelled raw counts (AnnData, CSR)."""
    counts, cell_types, genes = simulate_counts()
    barcodes = [f"CELL{i:04d}" for i in range(counts.shape[0])]
    return io.make_anndata(counts, genes, barcodes, cell_types)


@pytest.fixture(scope="session")
def tiny_split_dir(tmp_path_factory, tiny_adata) -> Path:
    """A DATA_DIR as stage _1_ leaves it (train/, test/) plus raw/GeneLength.txt. Read-only: copy to modify."""
    root = tmp_path_factory.mktemp("tiny_data")
    paths = Paths(root)
    train, test = stratified_split(tiny_adata.obs["cell_type"], 0.25, seed=123)
    io.write_dataset(tiny_adata[train].copy(), paths.train_dir)
    io.write_dataset(tiny_adata[test].copy(), paths.test_dir)
    paths.raw_dir.mkdir(parents=True, exist_ok=True)
    gene_length_table(tiny_adata.var_names).to_csv(paths.gene_length, index=False)
    return root
