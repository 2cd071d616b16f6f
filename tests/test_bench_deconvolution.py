"""The deconvolution benchmark's reference loader: one folder, one condition of it, or several pooled."""
from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_deconvolution import load_reference  # noqa: E402


def _folder(root: Path, name: str, genes: list[str], labels: list[str], conditions: list[str] | None,
            offset: int) -> np.ndarray:
    """A 10x-layout reference (genes x cells MTX); returns its cells x genes counts."""
    folder = root / name
    folder.mkdir()
    counts = (np.arange(len(labels) * len(genes)).reshape(len(labels), len(genes)) + offset) % 7
    with gzip.open(folder / "matrix.mtx.gz", "wb") as handle:
        scipy.io.mmwrite(handle, sp.coo_matrix(counts.T))
    (folder / "genes.tsv").write_text("".join(f"{g}\t{g}\n" for g in genes))
    barcodes = [f"{name}_{i}" for i in range(len(labels))]
    (folder / "barcodes.tsv").write_text("".join(f"{b}\n" for b in barcodes))
    table = pd.DataFrame({"barcode": barcodes[::-1], "cell_type": labels[::-1]})  # any row order
    if conditions is not None:
        table["condition"] = conditions[::-1]
    table.to_csv(folder / "celltypes.csv", index=False)
    return counts


def test_one_folder_a_condition_of_it_and_pooled_folders(tmp_path):
    first = _folder(tmp_path, "first", ["A", "B", "C"], ["T", "T", "Mono"], None, 1)
    second = _folder(tmp_path, "second", ["C", "D", "A"], ["T", "NK", "Mono", "T"], ["ctrl", "stim", "ctrl", "stim"], 3)

    counts, genes, labels = load_reference(tmp_path, "first")
    assert genes == ["A", "B", "C"] and list(labels) == ["T", "T", "Mono"]
    np.testing.assert_array_equal(counts.toarray(), first)

    counts, genes, labels = load_reference(tmp_path, "second:ctrl")
    assert list(labels) == ["T", "Mono"]
    np.testing.assert_array_equal(counts.toarray(), second[[0, 2]])

    counts, genes, labels = load_reference(tmp_path, "first+second:ctrl")
    assert genes == ["A", "C"]  # the genes both share
    assert list(labels) == ["T", "T", "Mono", "T", "Mono"]
    expected = np.vstack([first[:, [0, 2]], second[[0, 2]][:, [2, 0]]])
    np.testing.assert_array_equal(counts.toarray(), expected)
