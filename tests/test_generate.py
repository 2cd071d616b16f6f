"""Stage 5 generation: rounding, seeded reproducibility, chunking, files, errors, end to end."""
from __future__ import annotations

import filecmp
import json
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
import torch

import _5_generate_sc as stage5
from models import generate, io
from models.gmvae import GMVAE
from models.paths import Paths
from models.train import library_prior, make_optimizer, save_checkpoint, train_epoch
from models.utils import InputError


# ----------------------------------------------------------------------------- rounding
@pytest.mark.parametrize("proportions, n_total, expected", [
    ([0.5, 0.3, 0.2], 7, [4, 2, 1]),  # quotas 3.5, 2.1, 1.4: the spare cell goes to the largest remainder
    ([1 / 3, 1 / 3, 1 / 3], 10, [4, 3, 3]),  # ties go to the first type
    ([0.0, 1.0], 5, [0, 5]),
    ([2.0, 2.0], 3, [2, 1]),  # unnormalised weights are normalised
])
def test_largest_remainder_known_cases(proportions, n_total, expected):
    assert generate.largest_remainder(proportions, n_total).tolist() == expected


def test_largest_remainder_sums_exactly_and_stays_within_one_of_the_quota():
    rng = np.random.default_rng(0)
    for _ in range(200):
        weights = rng.dirichlet(np.full(rng.integers(2, 20), 0.5))
        n_total = int(rng.integers(1, 100_000))
        counts = generate.largest_remainder(weights, n_total)
        assert counts.sum() == n_total
        assert np.all(np.abs(counts - weights * n_total) < 1.0)


def test_largest_remainder_rejects_bad_input():
    with pytest.raises(ValueError):
        generate.largest_remainder([0.5, np.nan], 10)
    with pytest.raises(ValueError):
        generate.largest_remainder([0.5, -0.1], 10)


def test_cell_counts_from_proportions_rejects_nonpositive_n_cells():
    proportions = pd.DataFrame([[0.5, 0.5]], index=["s"], columns=["a", "b"])
    with pytest.raises(InputError, match="N_CELLS"):
        generate.cell_counts_from_proportions(proportions, 0)


def test_proportions_validation(tmp_path):
    types = ["alpha", "beta", "gamma"]
    path = tmp_path / "proportions.csv"
    pd.DataFrame({"sample": ["s1"], "alpha": [0.2], "beta": [float("nan")], "gamma": [0.8]}).to_csv(path, index=False)
    with pytest.raises(InputError, match="NaN"):
        generate.read_proportions(path, types)
    pd.DataFrame({"sample": ["s1"], "alpha": [0.2], "beta": [-0.1], "gamma": [0.9]}).to_csv(path, index=False)
    with pytest.raises(InputError, match="negative"):
        generate.read_proportions(path, types)
    pd.DataFrame({"sample": ["s1"], "alpha": [0.2], "delta": [0.8]}).to_csv(path, index=False)
    with pytest.raises(InputError, match="alpha, beta, gamma"):
        generate.read_proportions(path, types)
    pd.DataFrame({"sample": ["s1"], "gamma": [0.25], "alpha": [0.75]}).to_csv(path, index=False)
    table = generate.read_proportions(path, types)
    assert list(table.columns) == types and table.loc["s1"].tolist() == [0.75, 0.0, 0.25]
    with pytest.raises(InputError, match="_4_deconvolve_bulk.py"):
        generate.read_proportions(tmp_path / "absent.csv", types)


def test_cell_counts_unknown_type_lists_valid_names(tmp_path):
    path = tmp_path / "counts.csv"
    pd.DataFrame({"cell_type": ["alpha", "omega"], "n_cells": [3, 4]}).to_csv(path, index=False)
    with pytest.raises(InputError, match="valid names are: alpha, beta, gamma"):
        generate.read_cell_counts(path, ["alpha", "beta", "gamma"])
    pd.DataFrame({"cell_type": ["gamma", "alpha"], "n_cells": [3, 4]}).to_csv(path, index=False)
    assert generate.read_cell_counts(path, ["alpha", "beta", "gamma"]).tolist() == [4, 0, 3]


# ----------------------------------------------------------------------------- sampling and files
def test_format_triplets_matches_python_formatting():
    rng = np.random.default_rng(1)
    rows, cols, vals = rng.integers(1, 20000, 5000), np.sort(rng.integers(1, 10**6, 5000)), rng.integers(1, 300, 5000)
    expected = "".join(f"{r} {c} {v}\n" for r, c, v in zip(rows, cols, vals)).encode()
    assert generate.format_triplets(rows, cols, vals) == expected
    assert generate.format_triplets(np.array([7]), np.array([10]), np.array([100])) == b"7 10 100\n"


def _nb_sampler(n_types=3, n_genes=40, seed=0):
    rng = np.random.default_rng(seed)
    mu = torch.as_tensor(rng.lognormal(-0.5, 1.0, size=(n_types, n_genes)), dtype=torch.float32)
    return generate.NBBaselineSampler(mu, torch.full((n_types, n_genes), 2.0)), [f"G{i}" for i in range(n_genes)]


def test_same_seed_identical_files_and_chunking_does_not_change_cells(tmp_path):
    sampler, genes = _nb_sampler()
    types, counts = ["a", "b", "c"], [37, 0, 60]
    kwargs = dict(genes=genes, cell_types=types, counts_per_type=counts, seed=5, block_cells=8, progress=False)
    generate.write_generated(tmp_path / "one", sampler, chunk_cells=10_000, **kwargs)
    generate.write_generated(tmp_path / "again", sampler, chunk_cells=10_000, **kwargs)
    generate.write_generated(tmp_path / "chunked", sampler, chunk_cells=9, **kwargs)  # 2 blocks per chunk
    generate.write_generated(tmp_path / "other_seed", sampler, chunk_cells=10_000, **{**kwargs, "seed": 6})
    for name in ("matrix.mtx", "clusters.csv", "barcodes.tsv", "genes.tsv"):
        assert filecmp.cmp(tmp_path / "one" / name, tmp_path / "again" / name, shallow=False), name
        assert filecmp.cmp(tmp_path / "one" / name, tmp_path / "chunked" / name, shallow=False), name
    assert not filecmp.cmp(tmp_path / "one" / "matrix.mtx", tmp_path / "other_seed" / "matrix.mtx", shallow=False)
    first = ad.read_h5ad(tmp_path / "one" / "cells.h5ad")
    chunked = ad.read_h5ad(tmp_path / "chunked" / "cells.h5ad")
    assert (first.X != chunked.X).nnz == 0
    # and equal to drawing all cells at once in memory
    in_memory = generate.sample_in_memory(sampler, generate.type_codes_from_counts(counts), 5, block_cells=8)
    assert (first.X != in_memory).nnz == 0


def test_written_files_agree_and_read_back(tmp_path):
    sampler, genes = _nb_sampler()
    codes, kept = generate.write_generated(tmp_path / "g", sampler, genes, ["a", "b", "c"], [5, 20, 3], seed=0,
                                           chunk_cells=7, sample="bulk1", keep_cells=10, block_cells=4,
                                           progress=False)
    adata = ad.read_h5ad(tmp_path / "g" / "cells.h5ad")
    assert sp.issparse(adata.X) and adata.X.dtype == np.int32 and adata.shape == (28, 40)
    assert list(adata.var_names) == genes
    assert adata.obs["cell_type"].tolist() == ["a"] * 5 + ["b"] * 20 + ["c"] * 3
    assert set(adata.obs["sample"]) == {"bulk1"}
    matrix = scipy.io.mmread(tmp_path / "g" / "matrix.mtx")
    assert matrix.shape == (40, 28) and np.issubdtype(matrix.dtype, np.integer)
    assert (sp.csr_matrix(matrix).T != adata.X).nnz == 0
    clusters = pd.read_csv(tmp_path / "g" / "clusters.csv")
    assert list(clusters.columns) == ["partition", "cell_type"]
    assert clusters["partition"].tolist() == [0] * 5 + [1] * 20 + [2] * 3
    back = io.read_dataset(tmp_path / "g", prefer_h5ad=False)
    assert (back.X != adata.X.astype(np.float32)).nnz == 0
    # the kept evaluation subset is 10 of the written cells, with their own types
    assert kept.shape == (10, 40) and len(codes) == 10
    assert not list(tmp_path.joinpath("g").glob(".*tmp"))


def test_a_failed_run_leaves_no_files(tmp_path):
    _, genes = _nb_sampler()

    def broken(codes, generator):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        generate.write_generated(tmp_path / "g", broken, genes, ["a"], [5], seed=0, chunk_cells=4, progress=False)
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == []


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def stage5_dir(tmp_path_factory, tiny_split_dir):
    """tiny_split_dir plus a GMVAE trained for 2 epochs and a two-sample proportions.csv."""
    root = tmp_path_factory.mktemp("stage5") / "data"
    shutil.copytree(tiny_split_dir, root)
    paths = Paths(root)
    train = io.read_dataset(paths.train_dir)
    cell_types = list(train.obs["cell_type"].cat.categories)
    labels = train.obs["partition"].to_numpy()
    torch.manual_seed(0)
    model = GMVAE(train.n_vars, len(cell_types), z_dim=4, enc_hidden1=16, enc_hidden2=8, cls_hidden=16,
                  prior_hidden=16, dec_hidden1=8, dec_hidden2=16)
    model.set_library_prior(*library_prior(train.X, labels, len(cell_types)))
    optimizer = make_optimizer(model, 1e-3)
    for epoch in range(2):
        train_epoch(model, optimizer, train.X, labels, 64, torch.device("cpu"), np.random.default_rng(epoch), 0.0, epoch)
    save_checkpoint(paths.gmvae_checkpoint, model, optimizer, 2, train.var_names, cell_types)
    paths.deconvolution_dir.mkdir(parents=True)
    pd.DataFrame({"sample": ["bulk A", "bulk_B"], "alpha": [0.5, 0.2], "beta": [0.3, 0.2],
                  "gamma": [0.2, 0.6]}).to_csv(paths.proportions, index=False)
    return root


TINY = ["--N_TOP_GENES=50", "--N_PCS=5", "--N_CORR_GENES=20", "--UMAP=false"]


def test_end_to_end_two_samples_with_metrics_and_figures(stage5_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(stage5_dir, data)
    fig = tmp_path / "fig"
    summary = stage5.main([f"--DATA_DIR={data}", f"--FIG_DIR={fig}", "--N_CELLS=60", "--CHUNK_CELLS=16", *TINY])
    paths = Paths(data)
    for folder in ("bulk_A", "bulk_B"):
        adata = ad.read_h5ad(paths.generated_dir / folder / "cells.h5ad")
        assert adata.n_obs == 60
        assert adata.obs["cell_type"].value_counts().to_dict() == (
            {"alpha": 30, "beta": 18, "gamma": 12} if folder == "bulk_A" else {"alpha": 12, "beta": 12, "gamma": 36})
        assert (paths.generated_dir / folder / "matrix.mtx").exists()
        assert (paths.generated_dir / folder / "metrics.json").exists()
    metrics = json.loads(paths.generated_metrics.read_text())
    assert set(metrics["samples"]) == {"bulk A", "bulk_B"}
    sample = metrics["samples"]["bulk A"]
    for model in ("gmvae", "nb_baseline"):
        for key in ("proportion_mae", "per_type_mean_r_median", "auroc", "mmd", "ks_library_size",
                    "ks_zero_fraction", "gene_correlation_r"):
            assert np.isfinite(sample[model][key]), (model, key)
    assert "auroc" in metrics["real_vs_real"]
    assert set(summary) == {"bulk A", "bulk_B"}
    for name in ("generated_proportions.png", "generated_umap_bulk_A.png", "generated_gene_correlation_bulk_A.png"):
        assert (fig / name).stat().st_size > 1000, name
    assert not (fig / "generated_umap_bulk_B.png").exists()  # one UMAP / heatmap set: the first sample's


def test_end_to_end_cell_counts_is_reproducible(stage5_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(stage5_dir, data)
    counts = tmp_path / "counts.csv"
    pd.DataFrame({"cell_type": ["gamma", "alpha"], "n_cells": [7, 13]}).to_csv(counts, index=False)
    args = [f"--DATA_DIR={data}", f"--FIG_DIR={tmp_path / 'fig'}", f"--CELL_COUNTS={counts}", "--FIGURES=false",
            "--SEED=3", *TINY]
    stage5.main(args)
    generated = Paths(data).generated_dir
    first = (generated / "matrix.mtx").read_bytes()
    assert pd.read_csv(generated / "clusters.csv")["cell_type"].value_counts().to_dict() == {"alpha": 13, "gamma": 7}
    metrics = json.loads((generated / "metrics.json").read_text())
    assert metrics["n_cells"] == 20 and "gmvae" in metrics and "nb_baseline" in metrics
    stage5.main(args + ["--CHUNK_CELLS=3"])
    assert (generated / "matrix.mtx").read_bytes() == first


def test_errors_name_the_fix(stage5_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(stage5_dir, data)
    paths = Paths(data)
    base = [f"--DATA_DIR={data}", f"--FIG_DIR={tmp_path / 'fig'}", "--FIGURES=false", "--EVALUATE=false"]
    with pytest.raises(InputError, match="N_CELLS"):
        stage5.main(base + ["--N_CELLS=0"])
    with pytest.raises(InputError, match="N_CELLS"):
        stage5.main(base + ["--N_CELLS=-5"])
    with pytest.raises(InputError, match="whole number"):
        stage5.main(base + ["--N_CELLS=2.5"])
    with pytest.raises(InputError, match="SAMPLER"):
        stage5.main(base + ["--N_CELLS=5", "--SAMPLER=gamma"])
    counts = tmp_path / "counts.csv"
    pd.DataFrame({"cell_type": ["delta"], "n_cells": [3]}).to_csv(counts, index=False)
    with pytest.raises(InputError, match="valid names are: alpha, beta, gamma"):
        stage5.main(base + [f"--CELL_COUNTS={counts}"])
    paths.proportions.unlink()
    with pytest.raises(InputError, match="_4_deconvolve_bulk.py.*CELL_COUNTS"):
        stage5.main(base)
    # a test split with other genes than the checkpoint's
    test = io.read_dataset(paths.test_dir)
    io.write_dataset(test[:, 1:].copy(), paths.test_dir)
    with pytest.raises(InputError, match="genes differ"):
        stage5.main(base + ["--N_CELLS=5"])
    paths.gmvae_checkpoint.unlink()
    with pytest.raises(InputError, match="_3_train_gmvae.py"):
        stage5.main(base + ["--N_CELLS=5"])


# ----------------------------------------------------------------------------- the inversion sampler
@pytest.mark.parametrize("mu, theta, pi", [(0.05, 2.0, 0.0), (1.0, 0.5, 0.3), (5.0, 0.1, 0.0), (20.0, 3.0, 0.2),
                                           (100.0, 0.5, 0.0), (400.0, 40.0, 0.5)])
def test_inversion_sampler_matches_the_zinb_pmf(mu, theta, pi):
    from scipy import stats

    n = 40_000
    log_mu = torch.full((n, 1), float(np.log(mu)))
    log_theta = torch.full((n, 1), float(np.log(theta)))
    zi_logits = torch.full((n, 1), float(np.log(pi / (1 - pi)))) if pi > 0 else None
    draws = generate.sample_zinb_inversion(log_mu, log_theta, zi_logits, torch.Generator().manual_seed(0))
    values = draws.toarray().ravel()
    support = np.arange(values.max() + 1)
    pmf = (1 - pi) * stats.nbinom.pmf(support, theta, theta / (theta + mu))
    pmf[0] += pi
    gap = np.abs(np.cumsum(np.bincount(values, minlength=len(support)) / n) - np.cumsum(pmf)).max()
    assert gap < 0.012  # KS critical value at n = 40,000 is 0.0068 (5%); a wrong sampler is far off
    assert values.mean() == pytest.approx((1 - pi) * mu, rel=0.05)


def test_inversion_and_model_samplers_decode_the_same_cells(stage5_dir):
    from models.train import load_gmvae

    model, _ = load_gmvae(Paths(stage5_dir).gmvae_checkpoint)
    seen = {}
    decode = model.decode

    def recording(name):
        def wrapped(z, log_library=None):
            seen[name] = z.clone()
            return decode(z, log_library)
        return wrapped

    codes = torch.tensor([0, 0, 1, 2, 2, 2])
    for method in ("inversion", "model"):
        model.decode = recording(method)
        generate.gmvae_sampler(model, 0.7, method=method)(codes, torch.Generator().manual_seed(3))
    model.decode = decode
    assert torch.equal(seen["inversion"], seen["model"])
    # the inversion draw matches the decoded ZINB's mean and zero probability, gene by gene
    codes = torch.zeros(4000, dtype=torch.int64)
    log_mu, log_theta, zi_logits = model.generative_params(codes, torch.Generator().manual_seed(0))
    keep = 1 - torch.sigmoid(zi_logits)
    expected_mean = (keep * log_mu.exp()).mean(0).numpy()
    expected_zero = (1 - keep + keep * torch.exp(-log_theta.exp() * torch.nn.functional.softplus(log_mu - log_theta)))
    draws = generate.sample_zinb_inversion(log_mu, log_theta, zi_logits, torch.Generator().manual_seed(1))
    assert np.abs(np.asarray(draws.mean(axis=0)).ravel() / expected_mean - 1).max() < 0.15
    assert (draws.toarray() == 0).mean() == pytest.approx(float(expected_zero.mean()), abs=0.005)


# ----------------------------------------------------------------------------- COUNTS_FROM=draw
def _interval_inputs():
    proportions = pd.DataFrame([[0.6, 0.3, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25]], index=["s1", "s2"],
                               columns=["A", "B", "C", "D"])
    lower, upper = (proportions - 0.05).clip(lower=0), (proportions + 0.05).clip(upper=1)
    return proportions, lower, upper


def test_replicate_cell_counts_are_seeded_and_sum_to_n_cells():
    proportions, lower, upper = _interval_inputs()
    counts = generate.replicate_cell_counts(proportions, lower, upper, 1000, 4, seed=7)
    assert list(counts.index) == [f"{s}_rep{r}" for s in ("s1", "s2") for r in range(4)]
    assert (counts.sum(axis=1) == 1000).all() and (counts.to_numpy() >= 0).all()
    pd.testing.assert_frame_equal(counts, generate.replicate_cell_counts(proportions, lower, upper, 1000, 4, seed=7))
    assert not counts.equals(generate.replicate_cell_counts(proportions, lower, upper, 1000, 4, seed=8))
    assert counts.loc[["s1_rep0", "s1_rep1"]].nunique().max() > 1  # replicates differ from one another


def test_replicate_compositions_spread_as_the_intervals_say():
    """±0.05 intervals at 90 %: sd ~0.05 / 1.645 = 0.030 per type; the point estimate is the mean."""
    proportions, lower, upper = _interval_inputs()
    counts = generate.replicate_cell_counts(proportions.iloc[[0]], lower, upper, 100_000, 400, seed=0)
    shares = counts / 100_000
    np.testing.assert_allclose(shares.mean(), proportions.iloc[0], atol=0.006)
    assert 0.022 < shares["A"].std() < 0.040
    assert shares["D"].max() < 0.01  # a type at 0 stays (nearly) absent
    narrow = generate.replicate_cell_counts(proportions.iloc[[0]], proportions.iloc[[0]] - 0.005,
                                            proportions.iloc[[0]] + 0.005, 100_000, 100, seed=0) / 100_000
    assert narrow["A"].std() < shares["A"].std() / 4


def test_replicate_cell_counts_reject_bad_settings():
    proportions, lower, upper = _interval_inputs()
    with pytest.raises(InputError, match="REPLICATES"):
        generate.replicate_cell_counts(proportions, lower, upper, 10, 0, seed=0)
    with pytest.raises(InputError, match="N_CELLS"):
        generate.replicate_cell_counts(proportions, lower, upper, 0, 2, seed=0)


def test_read_interval_names_the_missing_file(tmp_path):
    proportions, _, _ = _interval_inputs()
    with pytest.raises(InputError, match="COUNTS_FROM=point"):
        generate.read_interval(tmp_path / "proportions_lower.csv", proportions)
