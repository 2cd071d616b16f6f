"""counts -> FPKM -> TPM against hand-computed values, and independent pseudo-bulks."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from models.bulk import (counts_to_cpm, counts_to_expression, counts_to_fpkm, counts_to_tpm, length_bias_slope,
                         sample_pseudobulks)
from models.io import read_gene_lengths


def test_tpm_matches_hand_computation():
    # Gene C has no length and is dropped; the totals are over the kept genes (TAPE's convention).
    counts = pd.DataFrame([[10, 20, 5], [0, 40, 1]], index=["s1", "s2"], columns=["A", "B", "C"])
    lengths = pd.Series({"A": 1000.0, "B": 2000.0, "Z": 10.0})
    # s1: reads per kb A = 10, B = 10 -> TPM 5e5 each. s2: A = 0, B = 20 -> TPM 0, 1e6.
    tpm, overlap = counts_to_tpm(counts, lengths)
    expected = pd.DataFrame([[5e5, 5e5], [0.0, 1e6]], index=["s1", "s2"], columns=["A", "B"])
    pd.testing.assert_frame_equal(tpm, expected)
    assert (overlap.n_genes, overlap.n_shared, overlap.n_lost) == (3, 2, 1)
    assert "2 of 3 genes" in str(overlap)
    # FPKM of s1, gene A: 10 * 1e9 / (1000 * 30)
    assert counts_to_fpkm(counts, lengths).loc["s1", "A"] == pytest.approx(10 * 1e9 / (1000 * 30))


def test_tpm_rows_sum_to_a_million():
    rng = np.random.default_rng(1)
    counts = pd.DataFrame(rng.poisson(5, size=(4, 50)), columns=[f"g{i}" for i in range(50)])
    lengths = pd.Series(rng.integers(100, 10_000, size=50).astype(float), index=counts.columns)
    tpm, _ = counts_to_tpm(counts, lengths)
    np.testing.assert_allclose(tpm.sum(axis=1), 1e6)


def test_sample_with_no_counts_on_known_genes_is_an_error():
    counts = pd.DataFrame([[0, 3]], index=["empty"], columns=["A", "C"])
    with pytest.raises(ValueError, match="empty"):
        counts_to_tpm(counts, pd.Series({"A": 100.0}))


def test_gene_lengths_take_longest_span_and_read_tabs(tmp_path):
    table = "Gene name\tTranscript start (bp)\tTranscript end (bp)\nA\t100\t600\nA\t50\t1050\nB\t10\t30\n"
    (tmp_path / "len.txt").write_text(table)
    lengths = read_gene_lengths(tmp_path / "len.txt")
    assert lengths.to_dict() == {"A": 1000.0, "B": 20.0}


def test_pseudobulks_are_independent_sums_with_true_proportions():
    rng = np.random.default_rng(0)
    n_cells = 300
    counts = sp.csr_matrix(rng.poisson(1.0, size=(n_cells, 20)))
    partition = rng.integers(0, 3, size=n_cells)
    summed, truth, members = sample_pseudobulks(counts, partition, ["a", "b", "c"], n_samples=5, seed=7)
    assert summed.shape == (5, 20) and list(truth.columns) == ["a", "b", "c"]
    np.testing.assert_allclose(truth.sum(axis=1), 1.0)
    for row, cells in enumerate(members):
        assert 100 <= len(cells) <= 120
        np.testing.assert_array_equal(summed[row], counts[cells].toarray().sum(axis=0))
        np.testing.assert_allclose(truth.iloc[row], np.bincount(partition[cells], minlength=3) / len(cells))
    # Independent draws: no sample's cells are a subset of another's (the original's were nested).
    for i in range(5):
        for j in range(5):
            if i != j:
                assert not set(members[i]) <= set(members[j])
    again = sample_pseudobulks(counts, partition, ["a", "b", "c"], n_samples=5, seed=7)
    np.testing.assert_array_equal(again[0], summed)


def test_umi_counts_become_cpm_and_full_length_counts_tpm():
    counts = pd.DataFrame([[10, 30, 60], [1, 1, 2]], index=["s1", "s2"], columns=["A", "B", "NOLEN"])
    lengths = pd.Series({"A": 1000.0, "B": 3000.0})
    cpm, overlap = counts_to_expression(counts, lengths, "umi")
    assert overlap is None and list(cpm.columns) == ["A", "B", "NOLEN"]  # no gene needs a length
    np.testing.assert_allclose(cpm.loc["s1"], [1e5, 3e5, 6e5])
    pd.testing.assert_frame_equal(cpm, counts_to_cpm(counts))
    tpm, overlap = counts_to_expression(counts, lengths, "full_length")
    assert overlap.n_shared == 2
    np.testing.assert_allclose(tpm.loc["s1"], [5e5, 5e5])  # 10/1000 and 30/3000 are equal per base
    with pytest.raises(ValueError, match="protocol"):
        counts_to_expression(counts, lengths, "smartseq")
    with pytest.raises(ValueError, match="no counts"):
        counts_to_cpm(counts * 0)


@pytest.mark.parametrize("true_slope", [0.0, 0.35, 1.0])
def test_length_bias_slope_recovers_a_planted_length_effect(true_slope):
    rng = np.random.default_rng(3)
    n_genes = 3000
    genes = [f"G{i}" for i in range(n_genes)]
    lengths = pd.Series(np.exp(rng.uniform(np.log(500), np.log(50_000), n_genes)), index=genes)
    profile = pd.Series(np.exp(rng.normal(3.0, 1.5, n_genes)), index=genes)
    # Two samples: the profile with gene-wise biological noise, times length**slope, Poisson reads.
    means = profile.to_numpy() * np.exp(rng.normal(0, 0.3, (2, n_genes))) * lengths.to_numpy() ** true_slope
    means *= 2e7 / means.sum(axis=1, keepdims=True)
    counts = pd.DataFrame(rng.poisson(means), columns=genes)
    slopes = length_bias_slope(counts, profile, lengths)
    np.testing.assert_allclose(slopes, true_slope, atol=0.05)
    # Genes without a length or below min_cpm are ignored; too few genes left gives NaN.
    assert np.isnan(length_bias_slope(counts.iloc[:, :40], profile, lengths)).all()
