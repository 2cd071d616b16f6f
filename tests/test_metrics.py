"""Proportion metrics against numpy/scipy on small hand-made tables."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from models.metrics import lin_ccc, pearson_r, per_type_metrics, proportion_metrics


def _frames(seed=0, n_samples=4, n_types=3):
    rng = np.random.default_rng(seed)
    truth = rng.dirichlet(np.ones(n_types), n_samples)
    pred = np.abs(truth + rng.normal(0, 0.05, truth.shape))
    pred /= pred.sum(1, keepdims=True)
    index, columns = [f"s{i}" for i in range(n_samples)], [f"t{k}" for k in range(n_types)]
    return pd.DataFrame(pred, index, columns), pd.DataFrame(truth, index, columns)


def test_overall_and_per_sample_match_direct_formulas():
    pred, truth = _frames()
    table = proportion_metrics(pred, truth)
    assert list(table.index) == ["overall", "s0", "s1", "s2", "s3"]
    p, t = pred.to_numpy().ravel(), truth.to_numpy().ravel()
    overall = table.loc["overall"]
    assert overall["n"] == 12
    assert overall["mae"] == pytest.approx(np.abs(p - t).mean())
    assert overall["rmse"] == pytest.approx(np.sqrt(((p - t) ** 2).mean()))
    assert overall["pearson_r"] == pytest.approx(stats.pearsonr(p, t)[0])
    s1 = table.loc["s1"]
    assert s1["mae"] == pytest.approx(np.abs(pred.loc["s1"] - truth.loc["s1"]).mean())
    assert s1["pearson_r"] == pytest.approx(stats.pearsonr(pred.loc["s1"], truth.loc["s1"])[0])


def test_ccc_formula_and_bias_penalty():
    x = np.array([0.1, 0.2, 0.3, 0.4])
    assert lin_ccc(x, x) == pytest.approx(1.0)
    # A constant offset keeps r at 1 but lowers CCC: 2*var / (2*var + 0.1^2).
    assert pearson_r(x + 0.1, x) == pytest.approx(1.0)
    assert lin_ccc(x + 0.1, x) == pytest.approx(2 * x.var() / (2 * x.var() + 0.01))
    assert np.isnan(pearson_r(np.ones(3), x[:3]))


def test_alignment_uses_truth_order_and_rejects_missing_types():
    pred, truth = _frames()
    shuffled = pred.iloc[::-1, ::-1]
    shuffled["extra"] = 0.0
    pd.testing.assert_frame_equal(proportion_metrics(shuffled, truth), proportion_metrics(pred, truth))
    with pytest.raises(ValueError, match="t2"):
        proportion_metrics(pred.drop(columns="t2"), truth)
    with pytest.raises(ValueError, match="share no sample"):
        proportion_metrics(pred.rename(index=lambda s: s + "x"), truth)


def test_per_type_metrics_rows_are_types():
    pred, truth = _frames()
    table = per_type_metrics(pred, truth)
    assert list(table.index) == ["t0", "t1", "t2"]
    assert table.loc["t0", "mae"] == pytest.approx(np.abs(pred["t0"] - truth["t0"]).mean())
