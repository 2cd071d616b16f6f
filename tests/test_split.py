"""The stratified, reproducible train/test split and the small-type filter."""
from __future__ import annotations

import numpy as np

from models.split import small_types, stratified_split


def test_split_is_stratified_and_complete():
    labels = np.array(["a"] * 101 + ["b"] * 40 + ["c"] * 33)
    train, test = stratified_split(labels, 0.25, seed=123)
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    for name in "abc":
        n_type = (labels == name).sum()
        assert abs((labels[test] == name).sum() - 0.25 * n_type) <= 1


def test_split_is_reproducible_and_seed_dependent():
    labels = np.repeat(["x", "y"], 60)
    first = stratified_split(labels, 0.25, seed=123)[1]
    np.testing.assert_array_equal(first, stratified_split(labels, 0.25, seed=123)[1])
    assert not np.array_equal(first, stratified_split(labels, 0.25, seed=124)[1])


def test_small_types():
    assert small_types(["a"] * 30 + ["b"] * 29 + ["c"], 30) == ["b", "c"]
