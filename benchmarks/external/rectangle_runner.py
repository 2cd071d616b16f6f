"""Run Rectangle (rectanglepy) on a folder written by bench_deconvolution, in Rectangle's own environment.

rectanglepy pins numpy<2, scipy==1.13 and anndata<0.10.9, so it cannot join bulk2sc's stack; the
benchmark calls this script with another Python (``--EXTERNAL_PYTHON``) to score Rectangle on the same
reference and bulks in the same run. Set that environment up once:

    python3.11 -m venv /tmp/rectangle && /tmp/rectangle/bin/pip install rectanglepy==1.7.0

Reads ``FOLDER/reference.npz`` (cells x genes counts), ``reference_genes.txt``, ``reference_labels.txt``
and one ``bulk_<name>.csv`` per cohort (samples x genes, TPM); writes ``rectangle_<name>.csv``
(samples x cell types, Rectangle's "Unknown" column included). Rectangle's defaults throughout.
Imports only what Rectangle's environment has: numpy, pandas, scipy, anndata, rectanglepy.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import rectanglepy
import scipy.sparse as sp


def main(folder: Path, n_cpus: int) -> None:
    counts = sp.load_npz(folder / "reference.npz").tocsr().astype(np.float32)
    genes = (folder / "reference_genes.txt").read_text().splitlines()
    labels = (folder / "reference_labels.txt").read_text().splitlines()
    cells = pd.DataFrame({"cell_type": labels}, index=[f"cell{i}" for i in range(len(labels))])
    adata = ad.AnnData(counts, obs=cells, var=pd.DataFrame(index=genes))
    for path in sorted(folder.glob("bulk_*.csv")):
        name = path.stem.removeprefix("bulk_")
        bulks = pd.read_csv(path, index_col=0)
        start = time.perf_counter()
        estimates, _ = rectanglepy.rectangle(adata, bulks, "cell_type", n_cpus=n_cpus)
        estimates.to_csv(folder / f"rectangle_{name}.csv")
        print(f"rectangle {rectanglepy.__version__}: {name}, {len(bulks)} bulks, {time.perf_counter() - start:.0f} s",
              flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2)
