"""The deconvolution benchmark's reference loader (one folder, one condition of it, or several pooled), and
Rectangle run in another Python and scored as TAPE is."""
from __future__ import annotations

import gzip
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
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


def _fake_rectanglepy(root: Path) -> None:
    """A stand-in ``rectanglepy`` for the runner: each bulk gets the reference's label shares, scaled to
    0.9, plus 0.1 "Unknown"; it also records what it was given."""
    package = root / "rectanglepy"
    package.mkdir()
    (package / "__init__.py").write_text(
        "import pandas as pd\n"
        "__version__ = 'fake'\n"
        "def rectangle(adata, bulks, cell_type_col, n_cpus=None):\n"
        "    shares = adata.obs[cell_type_col].value_counts(normalize=True).sort_index() * 0.9\n"
        "    out = pd.DataFrame([shares.to_numpy()] * len(bulks), index=bulks.index, columns=shares.index)\n"
        "    out['Unknown'] = 0.1\n"
        "    pd.Series({'cells': adata.n_obs, 'genes': ','.join(adata.var_names), 'total': float(adata.X.sum()),\n"
        "               'bulk_genes': ','.join(bulks.columns)}).to_csv('seen.csv')\n"
        "    return out, None\n")


def test_rectangle_runs_in_another_python_and_is_scored_like_tape(tmp_path, monkeypatch, capsys):
    import bench_deconvolution as bench

    _fake_rectanglepy(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # the stand-in writes seen.csv here
    reference = pd.DataFrame([[1, 0, 2], [0, 3, 0], [4, 0, 1], [1, 1, 1]], dtype=np.float32,
                             index=["CD4 T", "CD14 Mono", "CD4 T", "NK"], columns=["G1", "G2", "G3"])
    bulks = {"Zheng pseudo-bulks": pd.DataFrame([[5.0, 6.0, 7.0]], index=["p0"], columns=["G1", "G2", "G3"]),
             "Finotello": pd.DataFrame([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], index=["s1", "s2"],
                                       columns=["G1", "G2", "G3"])}
    estimates = bench.run_rectangle(sys.executable, reference, bulks, 1)
    assert set(estimates) == set(bulks)
    assert list(estimates["Finotello"].index) == ["s1", "s2"]
    np.testing.assert_allclose(estimates["Finotello"].loc["s1", ["CD14 Mono", "CD4 T", "NK", "Unknown"]],
                               [0.225, 0.45, 0.225, 0.1])
    seen = pd.read_csv(tmp_path / "seen.csv", index_col=0).iloc[:, 0]
    assert seen["cells"] == "4" and seen["genes"] == "G1,G2,G3" and float(seen["total"]) == 14.0
    assert seen["bulk_genes"] == "G1,G2,G3"

    # scored as TAPE is: "Unknown" dropped and the rest renormalised (pseudo-bulks: over the reference's types)
    truth = {"Zheng pseudo-bulks": pd.DataFrame({"CD14 Mono": [0.25], "CD4 T": [0.5], "NK": [0.25]}, index=["p0"]),
             "Finotello": bench.to_categories(pd.DataFrame({"T cells CD4 conv": [0.5, 0.5], "Monocytes": [0.25, 0.25],
                                                            "NK cells": [0.25, 0.25], "B cells": [0.0, 0.0],
                                                            "T cells CD8": [0.0, 0.0]}, index=["s1", "s2"]))}
    cfg = SimpleNamespace(EXTERNAL_PYTHON=sys.executable)
    results = {}
    bench.external_rows(cfg, results, "ref", reference, {c: (bulks[c], truth[c]) for c in bulks})
    assert results["real/ref/Zheng pseudo-bulks/rectangle"]["mae"] == pytest.approx(0.0)
    assert results["real/ref/Finotello/rectangle"]["mae"] == pytest.approx(0.0)
    assert "| ref | Finotello | rectangle | 0.0000 |" in capsys.readouterr().out


def test_a_failing_rectangle_environment_says_how_to_set_it_up(tmp_path, monkeypatch):
    import bench_deconvolution as bench

    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # no rectanglepy there, nor in this environment
    reference = pd.DataFrame([[1.0, 2.0]], index=["NK"], columns=["G1", "G2"])
    with pytest.raises(RuntimeError, match="(?s)rectangle_runner.py .*failed.*No module named 'rectanglepy'.*EXTERNAL_PYTHON"):
        bench.run_rectangle(sys.executable, reference, {"x": reference}, 1)
