"""models/deconvolution/content.py: TAPE's proportions under the reference's mRNA per cell -> under a given one."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models import deconvolution as tape
from models.utils import InputError


def test_reference_library_is_each_types_mean_counts_per_cell():
    reference = pd.DataFrame([[1, 2], [3, 4], [10, 0]], index=["b", "b", "a"], columns=["g1", "g2"], dtype=np.float32)
    library = tape.reference_library(reference)
    assert list(library.index) == ["a", "b"]
    np.testing.assert_allclose(library.to_numpy(), [10.0, 5.0])


def test_conversion_recovers_cell_fractions_of_a_bulk_whose_content_differs_from_the_reference():
    """A bulk of equal cell numbers whose cells hold equal mRNA, read against a reference where type b's cells
    carry 3x the counts: an exact reader of TAPE's training bulks reports b at a third of a's; the conversion with
    the true content gives the true fractions back."""
    library = pd.Series({"a": 100.0, "b": 300.0})
    truth = np.array([0.5, 0.5])
    true_content = pd.Series({"a": 1.0, "b": 1.0})
    rna = truth * true_content.to_numpy()  # the bulk's RNA shares
    read = rna / library.to_numpy()  # TAPE's training bulks: fraction f gives RNA f * L
    tape_output = pd.DataFrame([read / read.sum()], columns=["a", "b"])
    np.testing.assert_allclose(tape_output.to_numpy(), [[0.75, 0.25]])
    converted, _ = tape.to_cell_content(tape_output, tape.content_weights(library, true_content, ["a", "b"]))
    np.testing.assert_allclose(converted.to_numpy(), [truth])


def test_content_equal_to_the_reference_library_changes_nothing_and_only_ratios_matter():
    rng = np.random.default_rng(0)
    pred = pd.DataFrame(rng.dirichlet(np.ones(3), 5), columns=list("abc"))
    library = pd.Series({"a": 900.0, "b": 1500.0, "c": 2400.0})
    same, _ = tape.to_cell_content(pred, tape.content_weights(library, library / 7.0, list("abc")))
    np.testing.assert_allclose(same.to_numpy(), pred.to_numpy())
    content = pd.Series({"a": 0.4, "b": 0.4, "c": 1.4})
    once, _ = tape.to_cell_content(pred, tape.content_weights(library, content, list("abc")))
    scaled, _ = tape.to_cell_content(pred, tape.content_weights(library, content * 1000, list("abc")))
    np.testing.assert_allclose(once.to_numpy(), scaled.to_numpy())
    np.testing.assert_allclose(once.sum(axis=1), 1.0)
    # more mRNA per cell than the reference assumes -> fewer cells of that type
    assert (once["c"] < pred["c"]).all()


def test_converted_intervals_still_contain_the_converted_point():
    rng = np.random.default_rng(1)
    pred = pd.DataFrame(rng.dirichlet(np.ones(4), 20), columns=list("abcd"))
    bounds = tape.intervals(pred, pd.Series([0.02, 0.1, 0.3, 0.05], index=list("abcd")))
    weights = np.array([0.3, 1.0, 2.5, 0.8])
    point, (lower, upper) = tape.to_cell_content(pred, weights, bounds)
    assert (lower.to_numpy() <= point.to_numpy() + 1e-12).all() and (point.to_numpy() <= upper.to_numpy() + 1e-12).all()
    assert lower.to_numpy().min() >= 0 and upper.to_numpy().max() <= 1


def test_read_cell_content_checks_the_table(tmp_path):
    good = tmp_path / "content.csv"
    pd.DataFrame({"cell_type": ["a", "b", "extra"], "content": [0.4, 1.4, 9.0]}).to_csv(good, index=False)
    np.testing.assert_allclose(tape.read_cell_content(good, ["b", "a"]).to_numpy(), [1.4, 0.4])
    cases = {
        "missing": (None, "missing CELL_CONTENT file"),
        "columns": (pd.DataFrame({"type": ["a", "b"], "mrna": [1, 2]}), "needs columns cell_type,content"),
        "absent": (pd.DataFrame({"cell_type": ["a"], "content": [1.0]}), r"no content for cell types \['b'\]"),
        "zero": (pd.DataFrame({"cell_type": ["a", "b"], "content": [0.0, 1.0]}), "must be a number > 0"),
        "text": (pd.DataFrame({"cell_type": ["a", "b"], "content": ["x", 1.0]}), "must be a number > 0"),
        "twice": (pd.DataFrame({"cell_type": ["a", "a", "b"], "content": [1, 2, 3]}), "listed twice"),
    }
    for name, (table, message) in cases.items():
        path = tmp_path / f"{name}.csv"
        if table is not None:
            table.to_csv(path, index=False)
        with pytest.raises(InputError, match=message) as err:
            tape.read_cell_content(path, ["a", "b"])
        assert str(path) in str(err.value)
