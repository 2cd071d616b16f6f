"""Held-out metrics of stage 5 on cases with known answers."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from models import evaluation

from conftest import simulate_counts

TYPES = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def two_draws():
    """Two independent draws (seeds 0 and 1) of the same simulated population."""
    first, types_first, _ = simulate_counts(seed=0, cells_per_type=(150, 150, 150), n_genes=120)
    # same gene/type effects (they come from the seed), different cells: reuse seed 0's parameters
    rng = np.random.default_rng(0)
    base = rng.lognormal(mean=-0.5, sigma=1.2, size=120)
    effects = rng.lognormal(mean=0.0, sigma=1.0, size=(3, 120))
    labels = np.repeat(np.arange(3), (150, 150, 150))
    other = np.random.default_rng(99)
    library = other.lognormal(0.0, 0.3, size=len(labels))
    mu = base[None, :] * effects[labels] * library[:, None]
    second = other.negative_binomial(2.0, 2.0 / (2.0 + mu))
    return first, types_first, second, np.asarray(TYPES)[labels]


def test_log_normalize_by_hand():
    counts = np.array([[1, 3, 0], [0, 0, 0], [2, 2, 4]])
    normed = evaluation.log_normalize(counts, target_sum=4.0).toarray()
    np.testing.assert_allclose(normed[0], np.log1p([1.0, 3.0, 0.0]), rtol=1e-6)
    np.testing.assert_allclose(normed[1], 0.0)
    np.testing.assert_allclose(normed[2], np.log1p([1.0, 1.0, 2.0]), rtol=1e-6)


def test_simple_statistics():
    counts = sp.csr_matrix(np.array([[1, 0, 0, 3], [0, 0, 0, 0], [5, 5, 5, 5]]))
    np.testing.assert_allclose(evaluation.library_sizes(counts), [4, 0, 20])
    np.testing.assert_allclose(evaluation.zero_fractions(counts), [0.5, 1.0, 0.0])
    assert evaluation.proportion_mae(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b", "c"]) == pytest.approx(1 / 6)
    assert evaluation.ks_distance([1, 2, 3], [1, 2, 3]) == 0.0
    assert evaluation.ks_distance([1, 2, 3], [10, 11, 12]) == 1.0


def test_gene_correlation_matches_numpy_and_handles_constant_genes():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(50, 6))
    np.testing.assert_allclose(evaluation.gene_correlation(values), np.corrcoef(values.T), atol=1e-12)
    values[:, 2] = 1.0
    corr = evaluation.gene_correlation(values)
    assert np.all(np.isfinite(corr)) and corr[2, 2] == 1.0 and np.all(corr[2, [0, 1, 3]] == 0.0)


def test_mmd_is_near_zero_for_one_distribution_and_large_for_two():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 5)), rng.normal(size=(400, 5))
    shifted = rng.normal(loc=1.5, size=(400, 5))
    bandwidth = evaluation.rbf_bandwidth(a)
    same, different = evaluation.mmd_rbf(a, b, bandwidth), evaluation.mmd_rbf(a, shifted, bandwidth)
    assert abs(same) < 0.01 and different > 0.1


def test_identical_sets_score_perfectly(two_draws):
    counts, types, _, _ = two_draws
    metrics = evaluation.evaluate(counts, types, counts, types, TYPES, n_top_genes=100, n_comps=10, n_corr_genes=30)
    assert metrics["auroc"] == pytest.approx(0.5, abs=0.02)
    assert metrics["per_type_mean_r_median"] == pytest.approx(1.0)
    assert all(r == pytest.approx(1.0) for r in metrics["per_type_r"].values())
    assert metrics["gene_correlation_r"] == pytest.approx(1.0)
    assert metrics["gene_correlation_r_within_type"] == pytest.approx(1.0)
    assert metrics["auroc_quadratic"] == pytest.approx(0.5, abs=0.02)
    assert metrics["ks_library_size"] == 0.0 and metrics["ks_zero_fraction"] == 0.0
    assert metrics["proportion_mae"] == 0.0
    assert metrics["mmd"] < 0.01


def test_two_draws_of_one_population_are_hard_to_tell_apart(two_draws):
    first, types_first, second, types_second = two_draws
    metrics = evaluation.evaluate(first, types_first, second, types_second, TYPES, n_top_genes=100, n_comps=10,
                                  n_corr_genes=30)
    assert metrics["auroc"] < 0.62
    assert metrics["per_type_mean_r_median"] > 0.97
    assert metrics["ks_library_size"] < 0.15
    assert metrics["mmd"] < 3 * max(metrics["mmd_real_halves"], 0.005)


def test_clearly_different_sets_are_told_apart(two_draws):
    first, types_first, _, _ = two_draws
    rng = np.random.default_rng(5)
    # the same cells with every gene's counts shuffled across genes: library sizes kept, profiles destroyed
    shuffled = first[:, rng.permutation(first.shape[1])]
    metrics = evaluation.evaluate(first, types_first, shuffled, types_first, TYPES, n_top_genes=100, n_comps=10,
                                  n_corr_genes=30)
    assert metrics["auroc"] > 0.95 and metrics["auroc_quadratic"] > 0.95
    assert metrics["per_type_mean_r_median"] < 0.5
    assert metrics["mmd"] > 10 * max(metrics["mmd_real_halves"], 0.001)
    assert metrics["ks_library_size"] == 0.0  # a permutation of genes keeps every library size
    # Poisson-thinned counts: library sizes clearly smaller
    thinned = rng.binomial(first, 0.3)
    assert evaluation.ks_distance(evaluation.library_sizes(first), evaluation.library_sizes(thinned)) > 0.5


def test_real_vs_real_uses_two_halves(two_draws):
    first, types_first, _, _ = two_draws
    metrics = evaluation.real_vs_real(first, types_first, TYPES, n_top_genes=100, n_comps=10, n_corr_genes=30)
    assert metrics["n_real_cells"] + metrics["n_generated_cells"] == first.shape[0]
    assert metrics["auroc"] < 0.65 and metrics["per_type_mean_r_median"] > 0.9


def test_quadratic_classifier_sees_spread_that_a_linear_one_cannot():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(600, 8))
    wide = rng.normal(scale=2.0, size=(600, 8))  # same mean, twice the spread
    assert evaluation.classifier_auroc(real, wide, n_comps=8) < 0.65
    assert evaluation.classifier_auroc(real, wide, n_comps=8, quadratic=True) > 0.9


def test_within_type_correlation_ignores_type_structure():
    rng = np.random.default_rng(0)
    types = np.repeat(["a", "b"], 300)
    shift = np.where(types == "a", 0.0, 5.0)[:, None]
    program = rng.normal(size=(600, 1))
    correlated = shift + program + 0.3 * rng.normal(size=(600, 4))  # genes share a program within types
    independent = shift + rng.normal(size=(600, 4))
    within = evaluation.gene_correlation(evaluation.within_type_residuals(correlated, types))
    assert within[np.triu_indices(4, 1)].min() > 0.8
    within = evaluation.gene_correlation(evaluation.within_type_residuals(independent, types))
    assert np.abs(within[np.triu_indices(4, 1)]).max() < 0.15
    # pooled, the type shift alone makes the independent genes look correlated
    assert evaluation.gene_correlation(independent)[0, 1] > 0.8
