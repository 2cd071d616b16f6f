"""models.condition: a planted per-type shift is recovered, the reference's own bulk is left alone,
and stage 5's conditioning is seeded and leaves CONDITION=none's files as they were."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from models import condition, generate
from models.gmvae import GMVAE
from models.utils import InputError

N_GENES, N_TYPES = 80, 3


def tiny_model(seed: int = 0) -> GMVAE:
    torch.manual_seed(seed)
    model = GMVAE(N_GENES, N_TYPES, z_dim=4, enc_hidden1=16, enc_hidden2=8, cls_hidden=16, prior_hidden=8,
                  dec_hidden1=8, dec_hidden2=16)
    with torch.no_grad():  # means of ~0.1-20 counts that differ between types
        model.dec_mean.bias.copy_(torch.linspace(-2.0, 3.0, N_GENES))
        model.dec_in.weight.mul_(4.0)
        model.dec_dropout.bias.fill_(-2.0)
    return model.eval()


def planted_bulks(model, cells: np.ndarray, planted: torch.Tensor) -> np.ndarray:
    """Profiles [S, G] of the expected pseudo-bulks with type log factors ``planted`` [K, G]."""
    draws = condition.latent_draws(model, 256, 1.0, "posterior", generate.block_generator(0, 2_000_000, 0))
    base = condition.type_log_means(model, draws, calibrate=False)
    log_means = condition.expected_log_means(base[0], base[1], planted, True)
    shared = torch.ones(N_GENES, dtype=torch.bool)
    return condition.pseudo_bulk_profile(log_means, torch.as_tensor(cells, dtype=torch.float32), shared).numpy()


def test_planted_per_type_shift_is_recovered():
    model = tiny_model()
    rng = np.random.default_rng(0)
    cells = np.vstack([generate.largest_remainder(rng.dirichlet(np.ones(N_TYPES)), 1000) for _ in range(12)])
    planted = torch.zeros(N_TYPES, N_GENES)
    planted[0, 40:50] = 1.5  # up in type 0 only
    planted[1, 55:65] = -1.0  # down in type 1 only
    planted[:, 70:75] = 1.0  # up in every type
    profiles = planted_bulks(model, cells, planted)
    settings = condition.ConditionSettings(gene_steps=600)
    fits = condition.fit_conditions(model, cells, profiles, np.ones(N_GENES, bool), "absolute",
                                    generate.block_generator(0, 2_000_000, 0), settings, calibrate=False)
    shift = fits[0].log_mean_shift.numpy()
    assert np.corrcoef(shift.ravel(), planted.numpy().ravel())[0, 1] > 0.9
    assert shift[0, 40:50].mean() > 1.0 and abs(shift[1:, 40:50].mean()) < 0.5  # type 0's own
    assert shift[1, 55:65].mean() < -0.6 and abs(shift[[0, 2], 55:65].mean()) < 0.4
    assert shift[:, 70:75].mean() > 0.7
    assert fits[0].r_after > fits[0].r_before and fits[0].r_after > 0.99


def distinct_model() -> GMVAE:
    """tiny_model with types far apart in z (type profiles r 0.8-0.94, not 0.9996): a bulk tells them apart."""
    model = tiny_model()
    with torch.no_grad():
        model.prior_mu[2].weight.mul_(8.0)
        model.prior_mu[2].bias.zero_()
        model.prior_logvar[2].weight.zero_()
        model.prior_logvar[2].bias.fill_(-2.0)
        model.dec_mean.weight.mul_(3.0)
    return model


def test_composition_read_wrong_is_re_estimated_beside_the_shifts():
    """Bulks with a planted per-type shift, given shares half-way to equal (a state change read as composition)."""
    rng = np.random.default_rng(2)
    truth = np.vstack([rng.dirichlet(np.ones(N_TYPES)) for _ in range(10)])
    planted = torch.zeros(N_TYPES, N_GENES)
    planted[0, 40:50] = 1.5
    planted[:, 70:75] = 1.0
    given = 0.5 * truth + 0.5 / N_TYPES
    before = np.abs(given - truth).mean()  # 0.059
    shared = np.ones(N_GENES, bool)

    def fitted(model, rounds, mode="absolute"):
        profiles = planted_bulks(model, truth * 1000, planted)
        settings = condition.ConditionSettings(gene_steps=600, composition_rounds=rounds)
        fits = condition.fit_conditions(model, given * 1000, profiles, shared, mode,
                                        generate.block_generator(0, 2_000_000, 0), settings, calibrate=False)
        shares = [given[s] if fit.composition is None else fit.composition.numpy() for s, fit in enumerate(fits)]
        return fits, np.vstack(shares)

    kept, shares = fitted(distinct_model(), 0)
    assert all(fit.composition is None for fit in kept) and np.array_equal(shares, given)
    refit, shares = fitted(distinct_model(), 3)
    assert np.allclose(shares.sum(1), 1.0, atol=1e-5)
    assert np.abs(shares - truth).mean() < 0.35 * before  # 0.010
    planted_r = [np.corrcoef(fit.log_mean_shift.numpy().ravel(), planted.numpy().ravel())[0, 1]
                 for fit in (kept[0], refit[0])]
    assert planted_r[1] > planted_r[0] + 0.1  # 0.78 -> 0.92: the shift no longer carries the composition error
    # types a bulk can hardly tell apart (tiny_model, type profiles r 0.9996): the shares and the type deviations
    # trade off round after round (unchecked: 0.059 -> 0.038 after 1 round, 0.071 after 3, 0.106 after 6);
    # rounds stop where the moves stop shrinking, so the shares end no worse than given
    similar, shares = fitted(tiny_model(), 3)
    assert np.abs(shares - truth).mean() < before + 0.005
    assert min(fit.diagnostics["composition_rounds"] for fit in similar) < 3
    # the relative mode keeps the shares it is given (another platform's bulk: its ratios carry no composition)
    relative, _ = fitted(distinct_model(), 3, "relative")
    assert all(fit.composition is None for fit in relative)


def test_reference_own_bulk_is_left_nearly_unshifted():
    model = tiny_model()
    counts_per_type = np.array([600, 300, 100])
    sampler = generate.gmvae_sampler(model, prior="learned")
    cells = generate.sample_in_memory(sampler, generate.type_codes_from_counts(counts_per_type), seed=3)
    bulk = pd.DataFrame(np.asarray(cells.sum(axis=0)), columns=[f"g{i}" for i in range(N_GENES)])
    profiles, shared = condition.bulk_profiles(bulk, [f"g{i}" for i in range(N_GENES)], 10, "own bulk")
    fit = condition.fit_conditions(model, counts_per_type[None], profiles, shared, "absolute",
                                   generate.block_generator(0, 2_000_000, 0), prior="learned", calibrate=False)[0]
    planted = torch.zeros(N_TYPES, N_GENES)
    planted[0, 40:50] = 1.5
    moved = planted_bulks(model, counts_per_type[None], planted)
    moved_fit = condition.fit_conditions(model, counts_per_type[None], moved, shared, "absolute",
                                         generate.block_generator(0, 2_000_000, 0), prior="learned",
                                         calibrate=False)[0]
    own, shifted = fit.log_fold_change.abs().mean().item(), moved_fit.log_fold_change.abs().mean().item()
    assert own < 0.01 and own < 0.05 * shifted  # 0.002 against 0.28
    assert fit.diagnostics["genes_beyond_noise"] <= 4 and moved_fit.diagnostics["genes_beyond_noise"] >= 10
    # without the noise threshold the fit chases the sampling noise of the 1,000 cells
    chased = condition.fit_conditions(model, counts_per_type[None], profiles, shared, "absolute",
                                      generate.block_generator(0, 2_000_000, 0),
                                      condition.ConditionSettings(noise_threshold=0.0), prior="learned",
                                      calibrate=False)[0]
    assert chased.log_fold_change.abs().mean().item() > 5 * own


def test_noise_of_a_pseudo_bulk_matches_repeated_draws():
    """log_profile_noise: the sd of each gene's log profile over 120 pseudo-bulks of the model's own cells."""
    model = tiny_model()
    counts = np.array([150, 100, 50])
    sampler = generate.gmvae_sampler(model, prior="learned")
    codes = generate.type_codes_from_counts(counts)
    logs = []
    for rep in range(120):
        bulk = np.asarray(generate.sample_in_memory(sampler, codes, seed=100 + rep).sum(axis=0)).ravel()
        logs.append(np.log(bulk / bulk.sum() + 1e-5))
    empirical = np.std(logs, axis=0)
    draws = condition.latent_draws(model, 1000, 1.0, "learned", generate.block_generator(0, 2_000_000, 0))
    log_means, logits, log_variances = condition.type_moments(model, draws, calibrate=False)
    unshifted = condition.expected_log_means(log_means, logits, 0.0, False)
    predicted = condition.log_profile_noise(unshifted, log_variances, torch.tensor(counts[None], dtype=torch.float32),
                                            torch.ones(N_GENES, dtype=torch.bool), 1e-5)[0].numpy()
    assert np.corrcoef(empirical, predicted)[0, 1] > 0.95
    assert 0.85 < np.median(predicted / empirical) < 1.15
    # Poisson at a 100x deeper bulk of the same cells: less noise, most of all for the weakest genes
    deeper = condition.log_profile_noise(unshifted, log_variances, torch.tensor(counts[None], dtype=torch.float32),
                                         torch.ones(N_GENES, dtype=torch.bool), 1e-5,
                                         torch.tensor([100.0 * float(counts @ np.exp(unshifted.numpy()).sum(1))]))
    assert (deeper[0].numpy() <= predicted + 1e-6).all() and deeper[0, :10].mean() < 0.8 * predicted[:10].mean()


def test_denoise_targets_thresholds_residuals_by_their_noise():
    unshifted = torch.log(torch.full((1, 7), 1.0 / 7) + 1e-5)
    noise = torch.full((1, 7), 0.1)
    shared = torch.ones(7, dtype=torch.bool)
    change = torch.tensor([[0.0, 0.15, -0.19, -0.05, 0.3, 0.5, -0.6]])  # 0, 1.5, 1.9, 0.5, 3, 5, 6 sds
    offset = -0.2  # what every gene's share loses when some rise: the profile's normalisation, not a change
    target = unshifted + offset + change
    denoised, beyond = condition.denoise_targets(target, unshifted, noise, shared, 1e-5, 2.0, 2.0)
    kept = (denoised - unshifted - offset)[0].numpy()
    assert np.allclose(kept[:4], 0.0, atol=1e-3)  # within 2 sds: nothing to fit
    assert np.allclose(kept[5:], change[0, 5:].numpy(), atol=1e-3)  # beyond 4 sds: all of it
    assert 0.0 < kept[4] < change[0, 4]  # between: part of it
    assert beyond[0].tolist() == [False, False, False, False, True, True, True]
    same, _ = condition.denoise_targets(target, unshifted, noise, shared, 1e-5, 0.0, 2.0)
    assert torch.equal(same, target)


def test_bulk_depths_only_for_counts():
    genes = [f"g{i}" for i in range(4)]
    counts = pd.DataFrame([[1, 2, 3, 4], [0, 5, 5, 0]], columns=genes)
    assert condition.bulk_depths(counts, genes, None).tolist() == [10, 10]
    assert condition.bulk_depths(counts, genes[:2], "counts").tolist() == [3, 5]
    assert condition.bulk_depths(counts, genes, "TPM") is None
    assert condition.bulk_depths(counts / 10 * 1e6, genes, None) is None  # rows of a million: CPM
    assert condition.bulk_depths(counts * 0.37, genes, None) is None


def test_relative_mode_cancels_a_platform_factor():
    model = tiny_model()
    rng = np.random.default_rng(1)
    cells = np.vstack([generate.largest_remainder(rng.dirichlet(np.ones(N_TYPES)), 1000) for _ in range(6)])
    planted = torch.zeros(N_TYPES, N_GENES)
    planted[:, 40:50] = 1.5
    platform = np.exp(rng.normal(0.0, 1.0, N_GENES))
    stimulated = planted_bulks(model, cells, planted) * platform
    baseline = planted_bulks(model, cells, torch.zeros(N_TYPES, N_GENES)) * platform
    shared = np.ones(N_GENES, bool)
    stimulated, baseline = stimulated / stimulated.sum(1, keepdims=True), baseline / baseline.sum(1, keepdims=True)
    generator = generate.block_generator(0, 2_000_000, 0)
    fast = condition.ConditionSettings(gene_steps=300)
    relative = condition.fit_conditions(model, cells, stimulated, shared, "relative", generator, fast, prior="learned",
                                        calibrate=False, baseline=baseline.mean(0),
                                        baseline_cells=cells.mean(0))[0]
    absolute = condition.fit_conditions(model, cells, stimulated, shared, "absolute", generator, fast,
                                        prior="learned", calibrate=False)[0]
    truth = planted.numpy().ravel()
    assert np.corrcoef(relative.log_mean_shift.numpy().ravel(), truth)[0, 1] > 0.9
    assert np.corrcoef(absolute.log_mean_shift.numpy().ravel(), truth)[0, 1] < 0.6  # the platform leaks in


def test_too_few_shared_genes_is_an_error_naming_the_file():
    bulk = pd.DataFrame(np.ones((1, 5)), columns=[f"x{i}" for i in range(5)])
    with pytest.raises(InputError, match="my_bulk.tsv"):
        condition.bulk_profiles(bulk, [f"g{i}" for i in range(N_GENES)], 50, "my_bulk.tsv")


def test_all_zero_bulk_sample_is_an_error_naming_it():
    genes = [f"g{i}" for i in range(20)]
    bulk = pd.DataFrame([np.arange(1, 21), np.zeros(20)], index=["fine", "empty"], columns=genes)
    with pytest.raises(InputError, match=r"bulk.csv: samples \['empty'\] have no expression.*drop them"):
        condition.bulk_profiles(bulk, genes, 10, "bulk.csv")


def test_choose_mode():
    umi = {"protocol": "umi", "reference_protocol": "umi"}
    reads = {"protocol": "full_length", "reference_protocol": "umi"}
    assert condition.choose_mode("auto", umi, False, 1)[0] == "absolute"
    assert condition.choose_mode("auto", reads, False, 5)[0] == "relative"
    assert condition.choose_mode("auto", reads, False, 1)[0] is None  # nothing to compare with
    assert condition.choose_mode("auto", umi, True, 1)[0] == "relative"  # a baseline asks for it
    assert condition.choose_mode("none", umi, False, 3)[0] is None
    with pytest.raises(InputError):
        condition.choose_mode("sometimes", umi, False, 1)


# ----------------------------------------------------------------------------- stage 5
def stage5_dir(root, with_bulk: bool):
    """DATA_DIR with a tiny checkpoint, two samples' proportions and (optionally) their bulk + bulk.json."""
    from models.paths import Paths
    from models.train import save_checkpoint

    paths = Paths(root)
    model = tiny_model()
    genes, types = [f"g{i}" for i in range(N_GENES)], ["A", "B", "C"]
    save_checkpoint(paths.gmvae_checkpoint, model, None, 0, genes, types)
    paths.deconvolution_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]], index=pd.Index(["s1", "s2"], name="sample"),
                 columns=types).to_csv(paths.proportions)
    if with_bulk:
        rng = np.random.default_rng(0)
        bulk = pd.DataFrame(rng.poisson(50.0, (2, N_GENES)) * np.exp(np.linspace(-1, 1, N_GENES)),
                            index=["s1", "s2"], columns=genes)
        bulk.to_csv(root / "bulk.csv")
        paths.bulk_record.write_text(json.dumps({"path": str(root / "bulk.csv"), "unit": "counts",
                                                 "protocol": "umi", "reference_protocol": "umi"}))
    return paths


def run_stage5(paths, *extra):
    import _5_generate_sc as stage5

    stage5.main([f"--DATA_DIR={paths.data_dir}", f"--FIG_DIR={paths.fig_dir}", "--N_CELLS=120",
                 "--CONDITION_MIN_GENES=50", "--EVALUATE=false", *extra])
    folder = paths.generated_dir
    return {f"{s}/{name}": (folder / s / name).read_bytes() for s in ("s1", "s2")
            for name in ("matrix.mtx", "cells.h5ad", "clusters.csv", "barcodes.tsv", "condition.npz")
            if (folder / s / name).exists()}


def test_stage5_condition_none_gives_the_unconditioned_files_and_seed_repeats(tmp_path):
    plain = run_stage5(stage5_dir(tmp_path / "plain", with_bulk=False), "--FIGURES=false")
    none = run_stage5(stage5_dir(tmp_path / "none", with_bulk=True), "--FIGURES=false", "--CONDITION=none")
    assert plain == none and "s1/condition.npz" not in none
    paths = stage5_dir(tmp_path / "auto", with_bulk=True)
    first = run_stage5(paths)
    assert "s1/condition.npz" in first and first["s1/matrix.mtx"] != none["s1/matrix.mtx"]
    assert (paths.fig_dir / "condition_shifts_s1.png").exists()
    fits = json.loads(paths.generated_metrics.read_text())["condition"]
    assert fits["s1"]["mode"] == "absolute" and fits["s1"]["r_after"] > fits["s1"]["r_before"]
    with np.load(paths.generated_dir / "s1" / "condition.npz") as shifts:
        assert shifts["log_mean_shift"].shape == (N_TYPES, N_GENES)
    assert run_stage5(paths) == first  # same SEED, same bytes (condition.npz too)


def test_stage5_re_estimated_composition_is_generated_and_written(tmp_path):
    paths = stage5_dir(tmp_path / "refit", with_bulk=True)
    run_stage5(paths, "--FIGURES=false", "--CONDITION_COMPOSITION=true")
    composition = pd.read_csv(paths.generated_dir / "composition.csv", index_col=0)
    fits = json.loads(paths.generated_metrics.read_text())["condition"]
    for sample in ("s1", "s2"):
        generated = pd.read_csv(paths.generated_dir / sample / "clusters.csv")["cell_type"].value_counts()
        assert generated.sum() == 120  # N_CELLS still
        assert np.allclose(generated.reindex(composition.columns, fill_value=0) / 120, composition.loc[sample])
        assert np.allclose(list(fits[sample]["composition_after"].values()),
                           composition.loc[sample], atol=1 / 120)
    assert fits["s1"]["composition_before"] == pytest.approx({"A": 0.5, "B": 0.3, "C": 0.2}, abs=1e-9)
    kept = stage5_dir(tmp_path / "kept", with_bulk=True)
    run_stage5(kept, "--FIGURES=false")  # the default keeps _4_'s shares
    assert not (kept.generated_dir / "composition.csv").exists()
    counts = pd.read_csv(kept.generated_dir / "s1" / "clusters.csv")["cell_type"].value_counts()
    assert counts.to_dict() == {"A": 60, "B": 36, "C": 24}  # _4_'s 0.5 / 0.3 / 0.2 of 120


def test_stage5_auto_re_estimates_only_the_samples_that_depart_from_stage4s_simulated_bulks(tmp_path):
    paths = stage5_dir(tmp_path / "auto", with_bulk=True)
    pd.DataFrame({"residual_rms": [0.03, 0.09], "score": [10.0, 60.0], "p_value": [0.3, 1 / 401],
                  "departs": [False, True]}, index=pd.Index(["s1", "s2"], name="sample")).to_csv(paths.departure)
    run_stage5(paths, "--FIGURES=false")
    fits = json.loads(paths.generated_metrics.read_text())["condition"]
    assert "composition_before" not in fits["s1"] and "composition_before" in fits["s2"]
    s1 = pd.read_csv(paths.generated_dir / "s1" / "clusters.csv")["cell_type"].value_counts()
    assert s1.to_dict() == {"A": 60, "B": 36, "C": 24}  # s1 is like _4_'s simulated bulks: its shares are kept
    composition = pd.read_csv(paths.generated_dir / "composition.csv", index_col=0)
    s2 = pd.read_csv(paths.generated_dir / "s2" / "clusters.csv")["cell_type"].value_counts()
    assert np.allclose(s2.reindex(composition.columns, fill_value=0) / 120, composition.loc["s2"])
    assert list(fits["s2"]["composition_after"].values()) != pytest.approx([0.2, 0.2, 0.6], abs=1e-3)
    # every sample with true; none with false, as with a departure table of another bulk (BULK given to _5_)
    every = stage5_dir(tmp_path / "every", with_bulk=True)
    run_stage5(every, "--FIGURES=false", "--CONDITION_COMPOSITION=true")
    assert all("composition_before" in fit for fit in json.loads(every.generated_metrics.read_text())["condition"].values())
    other = stage5_dir(tmp_path / "other", with_bulk=True)
    paths.departure.replace(other.departure)
    run_stage5(other, "--FIGURES=false", f"--BULK={tmp_path / 'auto' / 'bulk.csv'}")
    assert not (other.generated_dir / "composition.csv").exists()
    with pytest.raises(InputError, match="CONDITION_COMPOSITION"):
        run_stage5(other, "--CONDITION_COMPOSITION=sometimes")
    # a damaged departure table is an error naming it, before any cells are written
    broken = stage5_dir(tmp_path / "broken", with_bulk=True)
    broken.departure.write_text("sample,departs\ns1,maybe\ns2,yes\n")
    with pytest.raises(InputError, match="departure.csv.*not True/False.*rerun _4_"):
        run_stage5(broken, "--FIGURES=false")
    assert not broken.generated_dir.exists()
