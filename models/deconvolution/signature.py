"""Signature-based estimates: least squares of a bulk on the reference's mean profiles (scipy)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from models.bulk import counts_to_expression


def nnls_proportions(reference: pd.DataFrame, bulk_tpm: pd.DataFrame, gene_lengths: pd.Series | None,
                     protocol: str = "umi") -> pd.DataFrame:
    """Baseline: non-negative least squares of each bulk on the reference's mean TPM profiles.

    reference: cells x genes counts, index = type name. Each type's mean count profile is
    converted to TPM as its ``protocol`` requires (CPM for UMI counts), so proportions are in the
    units of TPM mass per type; rows are normalised to sum to 1.
    """
    from scipy.optimize import nnls

    means = reference.groupby(level=0, sort=True).mean()
    profiles, _ = counts_to_expression(means, gene_lengths, protocol)
    genes = profiles.columns.intersection(bulk_tpm.columns)
    design = profiles[genes].to_numpy().T  # genes x types
    rows = []
    for sample in bulk_tpm.index:
        weights, _ = nnls(design, bulk_tpm.loc[sample, genes].to_numpy(dtype=np.float64))
        rows.append(weights / weights.sum() if weights.sum() > 0 else np.full(len(weights), 1 / len(weights)))
    return pd.DataFrame(np.vstack(rows), index=bulk_tpm.index, columns=[str(c) for c in profiles.index])
