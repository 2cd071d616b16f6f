"""models/deconvolution.py and _4_deconvolve_bulk.py on tiny simulated data (seconds, no network)."""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import _4_deconvolve_bulk as stage4
from models import deconvolution as tape
from models import io
from models.bulk import counts_to_cpm, counts_to_tpm
from models.paths import Paths
from models.utils import InputError

TINY = tape.TapeSettings(samplenum=60, n_cells=60, epochs=2, batch_size=16, adaptive=False, seed=1)


# ----------------------------------------------------------------------------- fixtures
def write_sctape_inputs(root, n_samples: int = 4) -> None:
    """DATA_DIR/sctape as the pipeline makes it: stage _2_ run on train/ and test/."""
    import _2_prepare_sctape as stage2

    stage2.main([f"--DATA_DIR={root}", f"--N_PSEUDOBULK={n_samples}"])


@pytest.fixture(scope="module")
def data_dir(tiny_split_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage4") / "data"
    shutil.copytree(tiny_split_dir, root)
    write_sctape_inputs(root)
    return root


@pytest.fixture(scope="module")
def inputs(data_dir):
    paths = Paths(data_dir)
    reference = stage4.read_reference(paths.sctape_reference)
    lengths = io.read_gene_lengths(paths.gene_length)
    bulk = pd.read_csv(paths.pseudobulk_tpm, sep="\t", index_col=0)
    counts = pd.read_csv(paths.pseudobulk_counts, sep="\t", index_col=0)
    return reference, lengths, bulk, counts


@pytest.fixture(scope="module")
def simulated(inputs, tmp_path_factory):
    return tape.simulate_bulks(inputs[0], TINY, tmp_path_factory.mktemp("sim"))


@pytest.fixture(scope="module")
def fits(inputs, simulated, tmp_path_factory):
    """protocol -> TapeFit trained on the same simulated bulks, read as UMI or full-length counts."""
    reference, lengths, bulk, _ = inputs
    cache = {}

    def fit(protocol: str):
        if protocol not in cache:
            settings = dataclasses.replace(TINY, reference_protocol=protocol)
            cache[protocol] = tape.fit_tape(reference, bulk, lengths, settings, tmp_path_factory.mktemp("fit"),
                                            n_threads=1, simulated=simulated.copy())
        return cache[protocol]
    return fit


@pytest.fixture(scope="module")
def fitted(fits, simulated):
    return fits("umi"), simulated


def as_tape_sees_it(simulated, bulk_tpm, lengths, protocol: str):
    """(simulated copy, bulk, TAPE datatype) for which TAPE's own preprocessing is ours.

    A UMI reference is TAPE's datatype="TPM" on the raw simulated counts, with the bulk at the
    model's scale. A full-length reference is TAPE's datatype="counts" (no conversion) on
    simulated bulks already at the model's scale (TPM / length: counts / length^2).
    """
    simulated = simulated.copy()
    bulk = tape.model_scale(bulk_tpm, lengths)
    if protocol == "umi":
        return simulated, bulk, "TPM"
    counts = pd.DataFrame(np.asarray(simulated.X, np.float64), columns=simulated.var_names)
    scaled = tape.model_scale(counts_to_tpm(counts, lengths)[0], lengths)
    simulated = simulated[:, list(scaled.columns)].copy()
    simulated.X = scaled.to_numpy()
    return simulated, bulk, "counts"


# ----------------------------------------------------------------------------- bulk input
def test_orientation_is_detected_and_logged(inputs, caplog):
    reference, lengths, _, counts = inputs
    caplog.set_level(logging.INFO)
    straight, report = tape.prepare_bulk(counts, "counts", reference.columns, lengths, 50, "bulk.tsv")
    flipped, flipped_report = tape.prepare_bulk(counts.T, "counts", reference.columns, lengths, 50, "bulkT.tsv")
    assert report.orientation == "samples x genes"
    assert flipped_report.orientation.startswith("genes x samples")
    pd.testing.assert_frame_equal(straight, flipped)
    assert "bulkT.tsv" in caplog.text and "transposed" in caplog.text


def test_counts_unit_is_converted_to_tpm_and_tpm_passes_through(inputs, caplog):
    reference, lengths, tpm_file, counts = inputs
    tpm, report = tape.prepare_bulk(counts, "counts", reference.columns, lengths, 50, "bulk.tsv")
    expected, _ = counts_to_tpm(counts, lengths)
    pd.testing.assert_frame_equal(tpm, expected)
    assert np.allclose(tpm.sum(axis=1), 1e6)
    assert "GENE0" not in tpm.columns  # no gene length for it in the fixture table
    same, _ = tape.prepare_bulk(tpm_file, "TPM", reference.columns, lengths, 50, "tpm.tsv")
    pd.testing.assert_frame_equal(same, tpm_file.astype(np.float64))
    caplog.set_level(logging.WARNING)
    tape.prepare_bulk(counts, "TPM", reference.columns, lengths, 50, "counts_as_tpm.tsv")
    assert "--BULK_UNIT=counts" in caplog.text
    with pytest.raises(InputError, match="BULK_UNIT"):
        tape.prepare_bulk(counts, "FPKM", reference.columns, lengths, 50, "bulk.tsv")


def test_bulk_protocol_umi_is_cpm_and_auto_tells_umi_from_full_length(inputs, caplog):
    reference, lengths, _, counts = inputs
    profile = tape.reference_profile(reference, "umi", lengths)
    np.testing.assert_allclose(profile.sum(), 1e6)
    args = (reference.columns, lengths, 50)
    cpm, report = tape.prepare_bulk(counts, "counts", *args, "umi.tsv", protocol="umi")
    pd.testing.assert_frame_equal(cpm, counts_to_cpm(counts.astype(np.float64)))
    assert "GENE0" in cpm.columns and report.protocol == "umi"  # no length needed
    caplog.set_level(logging.INFO)
    # The pseudo-bulks are UMI sums of the reference's own cells: no length trend -> CPM.
    auto, report = tape.prepare_bulk(counts, "counts", *args, "pseudo.tsv", protocol="auto", profile=profile)
    assert report.protocol == "umi" and abs(report.length_slope) < tape.LENGTH_SLOPE_CUTOFF
    pd.testing.assert_frame_equal(auto, cpm)
    # The same molecules read as full-length RNA-seq: reads grow with gene length -> TPM.
    shared = counts.columns.intersection(lengths.index)
    reads = (counts[shared] * lengths[shared] / 100).round()
    tpm, report = tape.prepare_bulk(reads, "counts", *args, "reads.tsv", protocol="auto", profile=profile)
    assert report.protocol == "full_length" and report.length_slope > 0.8
    pd.testing.assert_frame_equal(tpm, counts_to_tpm(reads.astype(np.float64), lengths)[0])
    assert "reads.tsv" in caplog.text and "slope" in caplog.text
    # Explicit settings win, with a warning when the data disagree; no profile means full_length.
    caplog.clear()
    caplog.set_level(logging.WARNING)
    _, report = tape.prepare_bulk(reads, "counts", *args, "forced.tsv", protocol="umi", profile=profile)
    assert report.protocol == "umi" and "forced.tsv: BULK_PROTOCOL=umi" in caplog.text
    _, report = tape.prepare_bulk(counts, "counts", *args, "blind.tsv", protocol="auto")
    assert report.protocol == "full_length" and "--BULK_PROTOCOL=umi" in caplog.text
    with pytest.raises(InputError, match="BULK_PROTOCOL"):
        tape.prepare_bulk(counts, "counts", *args, "x.tsv", protocol="smartseq")


def test_gene_intersection_report(inputs, caplog):
    reference, lengths, _, counts = inputs
    partial = counts.iloc[:, 10:].copy()
    partial["NOT_A_GENE"] = 3
    caplog.set_level(logging.INFO)
    _, report = tape.prepare_bulk(partial, "counts", reference.columns, lengths, 50, "partial.tsv")
    assert report.n_genes == counts.shape[1] - 10 + 1
    assert report.n_shared_reference == counts.shape[1] - 10
    assert report.n_shared_lengths == counts.shape[1] - 10  # GENE0 (no length) was cut with the first 10
    assert f"{report.n_shared_reference:,} genes shared with the reference" in caplog.text


def test_bad_inputs_raise_errors_naming_the_file(inputs, caplog):
    reference, lengths, _, counts = inputs
    args = (reference.columns, lengths, 50, "my_bulk.tsv")
    with_nan = counts.astype(float)
    with_nan.iloc[0, 3] = np.nan
    with pytest.raises(InputError, match="my_bulk.tsv: NaN"):
        tape.prepare_bulk(with_nan, "counts", *args)
    negative = counts.copy()
    negative.iloc[1, 2] = -4
    with pytest.raises(InputError, match="my_bulk.tsv: negative"):
        tape.prepare_bulk(negative, "counts", *args)
    with pytest.raises(InputError, match="my_bulk.tsv: only 20 genes shared"):
        tape.prepare_bulk(counts.iloc[:, :20], "counts", *args)
    renamed = counts.rename(columns=lambda g: "ENSG_" + g)
    with pytest.raises(InputError, match="only 0 genes shared"):
        tape.prepare_bulk(renamed, "counts", *args)
    same_samples = counts.rename(index=lambda s: "one")
    with pytest.raises(InputError, match="duplicated sample names"):
        tape.prepare_bulk(same_samples, "counts", *args)
    text = counts.astype(object)
    text.iloc[0, 5] = "n/a"
    with pytest.raises(InputError, match="non-numeric"):
        tape.prepare_bulk(text, "counts", *args)


def test_duplicated_genes_are_summed_with_a_warning(inputs, caplog):
    reference, lengths, _, counts = inputs
    doubled = pd.concat([counts, counts[["GENE3"]]], axis=1)
    caplog.set_level(logging.WARNING)
    checked = tape.check_bulk_values(doubled, "dup.tsv")
    assert "dup.tsv: 1 gene names occur more than once" in caplog.text
    assert list(checked.columns) == list(counts.columns)
    np.testing.assert_allclose(checked["GENE3"], 2 * counts["GENE3"])


def test_read_table_sniffs_separator(tmp_path, inputs):
    counts = inputs[3]
    counts.to_csv(tmp_path / "b.csv")
    counts.T.to_csv(tmp_path / "b.tsv.gz", sep="\t")
    pd.testing.assert_frame_equal(tape.read_table(tmp_path / "b.csv"), counts)
    assert tape.read_table(tmp_path / "b.tsv.gz").shape == counts.T.shape
    with pytest.raises(InputError, match="missing bulk table"):
        tape.read_table(tmp_path / "absent.tsv")


# ----------------------------------------------------------------------------- preprocessing = TAPE's
@pytest.mark.parametrize("protocol", ["umi", "full_length"])
@pytest.mark.filterwarnings("ignore:Series.__getitem__ treating keys as positions:FutureWarning")
def test_preprocessing_matches_tape_process_input_data(fits, simulated, inputs, data_dir, tmp_path, protocol):
    fit = fits(protocol)
    lengths = inputs[1]
    TAPE = tape.import_tape()
    theirs, bulk, datatype = as_tape_sees_it(simulated, inputs[2], lengths, protocol)
    with tape.tape_sandbox(tmp_path):  # GeneLength.txt of the fixture is comma-separated, as TAPE reads it
        train_x, train_y, test_x, genes, celltypes, _ = TAPE.utils.ProcessInputData(
            theirs, bulk.copy(), datatype=datatype, genelenfile=str(Paths(data_dir).gene_length),
            variance_threshold=0.98, scaler="mms")
    assert genes == fit.genes
    assert list(celltypes) == fit.cell_types
    np.testing.assert_array_equal(tape.scale_samples(bulk, fit.genes), test_x.astype(np.float32))


def test_model_scale_is_tapes_tpm_of_umi_counts_and_one_length_more_for_reads(inputs):
    _, lengths, _, counts = inputs
    # UMI pseudo-bulk: CPM, then the model's scale = TAPE's counts2TPM of the raw counts.
    pd.testing.assert_frame_equal(tape.model_scale(counts_to_cpm(counts), lengths), counts_to_tpm(counts, lengths)[0])
    # Reads of the same molecules (x length): their TPM is the UMI CPM again, so the same input.
    shared = counts.columns.intersection(lengths.index)
    reads = counts[shared] * lengths[shared]
    from_reads = tape.model_scale(counts_to_tpm(reads, lengths)[0], lengths)
    pd.testing.assert_frame_equal(from_reads, counts_to_tpm(counts, lengths)[0], rtol=1e-9)


def test_single_bulk_sample_keeps_genes(fitted, inputs):
    _, lengths, bulk, _ = inputs
    genes = tape.select_genes(bulk, bulk.iloc[:1], 0.98)
    assert len(genes) > 0.9 * bulk.shape[1]  # TAPE's own filter would keep none (variance of one sample is NaN)


# ----------------------------------------------------------------------------- equivalence and checkpoint
@pytest.mark.parametrize(("protocol", "adaptive"), [("umi", False), ("umi", True), ("full_length", False)])
@pytest.mark.filterwarnings("ignore:Series.__getitem__ treating keys as positions:FutureWarning")
def test_fit_and_predict_equal_tape_deconvolution(fits, simulated, inputs, data_dir, tmp_path, monkeypatch,
                                                  protocol, adaptive):
    """Same simulated data, seed and settings: our route gives TAPE.Deconvolution's proportions."""
    fit = fits(protocol)
    lengths = inputs[1]
    simulated, bulk_scaled, datatype = as_tape_sees_it(simulated, inputs[2], lengths, protocol)
    genelen = Paths(data_dir).gene_length
    TAPE = tape.import_tape()
    # TAPE's 300 x 3 adaptive steps take ~10 s even here; both routes call this one function.
    full_adaptive_stage = TAPE.train.adaptive_stage
    monkeypatch.setattr(TAPE.train, "adaptive_stage", lambda model, data, opt_d, opt_e, step, max_iter:
                        full_adaptive_stage(model, data, opt_d, opt_e, step=15, max_iter=2))
    with tape.tape_sandbox(tmp_path, n_threads=1) as scratch:
        _, theirs = TAPE.Deconvolution(simulated, bulk_scaled, datatype=datatype, genelenfile=str(genelen),
                                       scaler="mms", mode="overall", adaptive=adaptive, batch_size=TINY.batch_size,
                                       epochs=TINY.epochs, seed=TINY.seed, save_model_name=str(scratch / "m"))
    bounded = []  # the adaptive stage's Adam steps fragment glibc's heap unless bounded (13 GB on one Kang bulk)
    monkeypatch.setattr(sys.modules[tape.predict_scaled.__module__], "bound_heap_fragmentation",
                        lambda: bounded.append(True))
    ours = tape.predict_proportions(tape.checkpoint_dict(fit), inputs[2], lengths, adaptive=adaptive, n_threads=1,
                                    workdir=tmp_path)
    theirs = theirs / theirs.to_numpy().sum(axis=1, keepdims=True)
    np.testing.assert_allclose(ours.to_numpy(), theirs[ours.columns].to_numpy(), atol=2e-6)
    assert bool(bounded) == adaptive


def test_checkpoint_reloads_with_weights_only_and_predicts_the_same(fitted, inputs, tmp_path):
    fit, _ = fitted
    bulk = inputs[2]
    path = tmp_path / "tape.pt"
    tape.save_checkpoint(fit, path)
    raw = torch.load(path, weights_only=True)  # would raise on any pickled class
    assert raw["genes"] == fit.genes and raw["cell_types"] == ["alpha", "beta", "gamma"]
    assert raw["settings"]["samplenum"] == TINY.samplenum
    assert raw["settings"]["reference_protocol"] == "umi" == tape.checkpoint_protocol(raw)
    profile = tape.checkpoint_profile(raw)  # the reference's CPM over the model's genes
    assert list(profile.index) == fit.genes
    np.testing.assert_allclose(profile.to_numpy(), fit.profile.loc[fit.genes].to_numpy())
    older = {k: v for k, v in raw.items() if k not in ("profile", "settings", "preprocessing")}
    assert tape.checkpoint_profile(older) is None and tape.checkpoint_protocol(older) == "full_length"
    torch.save(older, tmp_path / "old.pt")  # a tape.pt from before the unit fix: bulks would be misread
    with pytest.raises(InputError, match="RETRAIN=true"):
        tape.load_checkpoint(tmp_path / "old.pt")
    ckpt = tape.load_checkpoint(path)
    lengths = inputs[1]
    direct = tape.predict_proportions(tape.checkpoint_dict(fit), bulk, lengths, adaptive=False, model=fit.model)
    reloaded = tape.predict_proportions(ckpt, bulk, lengths, adaptive=False)
    np.testing.assert_allclose(reloaded.to_numpy(), direct.to_numpy(), atol=1e-7)
    np.testing.assert_allclose(reloaded.sum(axis=1), 1.0, atol=1e-6)
    # TAPE's own predict() on the reloaded weights (it writes model.pth into the cwd: sandboxed).
    TAPE = tape.import_tape()
    x = tape.scale_samples(tape.model_scale(bulk, lengths), ckpt["genes"])
    with tape.tape_sandbox(tmp_path):
        theirs = TAPE.train.predict(x, ckpt["genes"], ckpt["cell_types"], bulk.index,
                                    model=tape.model_from_checkpoint(ckpt), adaptive=False)
    np.testing.assert_allclose(reloaded.to_numpy(), theirs.to_numpy(), atol=1e-6)
    # Genes missing from a new bulk are zero-filled with a warning, too few is an error.
    with pytest.raises(InputError, match="retrain"):
        tape.predict_proportions(ckpt, bulk.iloc[:, :5], lengths, min_shared_genes=50, source="new.tsv")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="junk.pt"):
        tape.load_checkpoint(tmp_path / "junk.pt")


def test_sandbox_restores_globals_and_leaves_cwd_clean(tmp_path, monkeypatch):
    import matplotlib
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)
    filters = list(warnings.filters)
    rc = dict(matplotlib.rcParams)
    threads = torch.get_num_threads()
    torch.manual_seed(5)
    np.random.seed(5)
    expected_torch, expected_numpy = torch.rand(3), np.random.rand(3)
    torch.manual_seed(5)
    np.random.seed(5)
    TAPE = tape.import_tape()
    assert list(warnings.filters) == filters  # TAPE.model's filterwarnings("ignore") undone
    with tape.tape_sandbox(tmp_path / "work", n_threads=1):
        assert torch.get_num_threads() == 1
        TAPE.utils.showloss([3.0, 2.0, 1.0])  # sns.set() + an unclosed figure
        torch.save({"a": 1}, "model.pth")
        TAPE.train.reproducibility(0)  # as every adaptive step does
    assert torch.equal(torch.rand(3), expected_torch) and np.array_equal(np.random.rand(3), expected_numpy)
    assert list(warnings.filters) == filters
    assert dict(matplotlib.rcParams) == rc
    assert plt.get_fignums() == []
    assert torch.get_num_threads() == threads
    assert os.listdir(tmp_path) == ["work"] and os.listdir(tmp_path / "work") == []


# ----------------------------------------------------------------------------- the stage script
TINY_ARGS = ["--SAMPLENUM=60", "--N_CELLS=60", "--EPOCHS=2", "--BATCH_SIZE=16", "--MIN_SHARED_GENES=50",
             "--ADAPTIVE=false", "--TORCH_THREADS=1"]


def test_stage4_end_to_end_then_predict_from_checkpoint(data_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data_dir, root)
    fig = tmp_path / "fig"
    pred = stage4.main([f"--DATA_DIR={root}", f"--FIG_DIR={fig}", *TINY_ARGS])
    paths = Paths(root, fig)
    written = pd.read_csv(paths.proportions, index_col=0)
    assert list(written.columns) == ["alpha", "beta", "gamma"]
    assert written.index.name == "sample" and len(written) == 4
    np.testing.assert_allclose(written.sum(axis=1), 1.0, atol=1e-6)
    metrics = pd.read_csv(paths.deconvolution_metrics, index_col=0)
    assert list(metrics.index) == ["overall", *written.index]
    assert 0.0 <= metrics.loc["overall", "mae"] < 0.5
    assert paths.proportions_scatter.stat().st_size > 1000
    lower = pd.read_csv(paths.proportions_lower, index_col=0)
    upper = pd.read_csv(paths.proportions_upper, index_col=0)
    assert lower.shape == upper.shape == written.shape and list(lower.columns) == list(written.columns)
    assert (lower.to_numpy() <= written.to_numpy() + 1e-9).all() and (written.to_numpy() <= upper.to_numpy() + 1e-9).all()
    assert (upper.to_numpy() - lower.to_numpy()).max() > 0  # a tiny 2-epoch model is far from certain
    ckpt = torch.load(paths.tape_checkpoint, weights_only=True)
    assert ckpt["cell_types"] == ["alpha", "beta", "gamma"] and ckpt["halfwidth"].shape == (3,)
    # the calibration bulks travel with the model (float16 inputs), for the departure check of new bulks
    assert ckpt["calibration_x"].dtype == torch.float16 and ckpt["calibration_x"].shape[1] == len(ckpt["genes"])
    assert ckpt["calibration_truth"].shape == (ckpt["calibration_x"].shape[0], 3)
    assert not list(paths.checkpoints_dir.glob(".tape_*")) and not list(paths.checkpoints_dir.glob("*.pth"))
    departure = pd.read_csv(paths.departure, index_col=0)  # per sample: how far from the simulated bulks
    assert list(departure.index) == list(written.index)
    assert list(departure.columns) == ["residual_rms", "score", "p_value", "departs"]
    assert departure["departs"].dtype == bool and ((departure["p_value"] > 0) & (departure["p_value"] <= 1)).all()
    assert paths.departure_figure.stat().st_size > 1000

    # RETRAIN=false on a user's counts file, genes x samples, one sample, no truth.
    counts = pd.read_csv(paths.pseudobulk_counts, sep="\t", index_col=0)
    user = tmp_path / "user_bulk.csv"
    counts.iloc[[2]].T.to_csv(user)
    again = stage4.main([f"--DATA_DIR={root}", f"--FIG_DIR={fig}", "--RETRAIN=false", f"--BULK={user}",
                         "--BULK_UNIT=counts", *TINY_ARGS])
    np.testing.assert_allclose(again.to_numpy(), pred.iloc[[2]].to_numpy(), atol=1e-6)
    # the reloaded model's intervals: the same half-widths around the same point estimate
    np.testing.assert_allclose(pd.read_csv(paths.proportions_upper, index_col=0).to_numpy(), upper.iloc[[2]].to_numpy(),
                               atol=1e-6)
    assert list(pd.read_csv(paths.departure, index_col=0).index) == list(again.index)  # this bulk's, not the last
    # a checkpoint without calibration bulks gives no departure table: an earlier run's is removed, not left stale
    ckpt = {k: v for k, v in ckpt.items() if not k.startswith("calibration")}
    torch.save(ckpt, paths.tape_checkpoint)
    stage4.main([f"--DATA_DIR={root}", f"--FIG_DIR={fig}", "--RETRAIN=false", f"--BULK={user}",
                 "--BULK_UNIT=counts", *TINY_ARGS])
    assert not paths.departure.exists()


def test_stage4_ensemble_of_marker_fits_reloads_the_same(data_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data_dir, root)
    args = [f"--DATA_DIR={root}", f"--FIG_DIR={tmp_path / 'fig'}", "--MEMBERS=2", "--GENE_SELECTION=markers",
            "--MARKERS_PER_TYPE=20", *TINY_ARGS]
    pred = stage4.main(args)
    ckpt = torch.load(Paths(root).tape_checkpoint, weights_only=True)
    assert len(ckpt["member_state_dicts"]) == 1 and ckpt["settings"]["gene_selection"] == "markers"
    assert len(ckpt["genes"]) <= 3 * 20
    np.testing.assert_allclose(stage4.main([*args, "--RETRAIN=false"]).to_numpy(), pred.to_numpy(), atol=1e-6)


def test_stage4_cell_content_converts_proportions_and_intervals(data_dir, tmp_path):
    """CELL_CONTENT: the checkpoint keeps the reference's mean counts per cell; stage 4 writes TAPE's proportions
    (and bounds) times library / content, renormalised; a bad table stops it before anything is written."""
    root = tmp_path / "data"
    shutil.copytree(data_dir, root)
    paths = Paths(root, tmp_path / "fig")
    content = tmp_path / "content.csv"
    pd.DataFrame({"cell_type": ["alpha", "beta", "gamma"], "content": [1.0, 1.0, 4.0]}).to_csv(content, index=False)
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"cell_type": ["alpha", "beta"], "content": [1.0, 1.0]}).to_csv(bad, index=False)
    base = [f"--DATA_DIR={root}", f"--FIG_DIR={tmp_path / 'fig'}", *TINY_ARGS]
    with pytest.raises(InputError, match=r"bad.csv: no content for cell types \['gamma'\]"):
        stage4.main([*base, f"--CELL_CONTENT={bad}"])
    assert not paths.tape_checkpoint.exists() and not paths.proportions.exists()

    plain = stage4.main(base)
    plain_upper = pd.read_csv(paths.proportions_upper, index_col=0)
    ckpt = torch.load(paths.tape_checkpoint, weights_only=True)
    library = tape.reference_library(stage4.read_reference(paths.sctape_reference))
    np.testing.assert_allclose(ckpt["library"].numpy(), library.loc[ckpt["cell_types"]].to_numpy())

    converted = stage4.main([*base, "--RETRAIN=false", f"--CELL_CONTENT={content}"])
    weights = library.loc[["alpha", "beta", "gamma"]].to_numpy() / np.array([1.0, 1.0, 4.0])
    expected = plain * weights
    expected = expected.div(expected.sum(axis=1), axis=0)
    np.testing.assert_allclose(converted.to_numpy(), expected.to_numpy(), atol=1e-9)
    assert (converted["gamma"] < plain["gamma"]).all()  # 4x the mRNA per cell: fewer gamma cells
    written = pd.read_csv(paths.proportions, index_col=0)
    np.testing.assert_allclose(written.to_numpy(), converted.to_numpy(), atol=1e-9)
    upper = pd.read_csv(paths.proportions_upper, index_col=0)
    lower = pd.read_csv(paths.proportions_lower, index_col=0)
    assert (lower.to_numpy() <= written.to_numpy() + 1e-9).all() and (written.to_numpy() <= upper.to_numpy() + 1e-9).all()
    np.testing.assert_allclose(upper.to_numpy(), (plain_upper * weights).div((plain * weights).sum(axis=1), axis=0)
                               .clip(0, 1).to_numpy(), atol=1e-9)

    # a checkpoint from before CELL_CONTENT has no library: the conversion cannot run, and says so
    del ckpt["library"]
    torch.save(ckpt, paths.tape_checkpoint)
    with pytest.raises(InputError, match="no reference library sizes.*--RETRAIN=true"):
        stage4.main([*base, "--RETRAIN=false", f"--CELL_CONTENT={content}"])


def test_platform_augmentation_draws_seeded_gene_factors_and_length_slopes():
    """augment_platform: per-(bulk, gene) log-normal factors of the given sd and a per-bulk slope on log length."""
    from models.deconvolution.tape import augment_platform

    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(3000)]
    tpm = pd.DataFrame(rng.gamma(1.0, 1.0, (40, 3000)), columns=genes)
    tpm = tpm.div(tpm.sum(axis=1), axis=0) * 1e6
    lengths = pd.Series(np.exp(rng.uniform(6, 11, 3000)), index=genes)
    np.testing.assert_allclose(augment_platform(tpm, lengths, 0.0, 0.0, seed=1).to_numpy(), tpm.to_numpy())
    noisy = augment_platform(tpm, lengths, 0.5, 0.0, seed=1)
    np.testing.assert_array_equal(noisy.to_numpy(), augment_platform(tpm, lengths, 0.5, 0.0, seed=1).to_numpy())
    assert not np.allclose(noisy.to_numpy(), augment_platform(tpm, lengths, 0.5, 0.0, seed=2).to_numpy())
    np.testing.assert_allclose(noisy.sum(axis=1), 1e6)
    log_ratio = np.log(noisy.to_numpy() / tpm.to_numpy())
    assert np.std(log_ratio - log_ratio.mean(axis=1, keepdims=True)) == pytest.approx(0.5, rel=0.02)
    sloped = np.log(augment_platform(tpm, lengths, 0.0, 0.3, seed=1).to_numpy() / tpm.to_numpy())
    slopes = [np.polyfit(np.log(lengths.to_numpy()), row, 1)[0] for row in sloped]
    assert np.std(slopes) == pytest.approx(0.3, rel=0.35)  # 40 bulks: the sd of 40 N(0, 0.3) draws
    log_length = np.log(lengths.to_numpy())
    np.testing.assert_allclose(sloped - sloped[:, :1], np.array(slopes)[:, None] * (log_length - log_length[0]),
                               atol=1e-8)


def test_stage4_platform_augmentation_is_recorded_and_checked(data_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data_dir, root)
    base = [f"--DATA_DIR={root}", f"--FIG_DIR={tmp_path / 'fig'}", *TINY_ARGS]
    with pytest.raises(InputError, match="PLATFORM_SD and LENGTH_SLOPE_SD must be >= 0"):
        stage4.main([*base, "--PLATFORM_SD=-0.5"])
    plain = stage4.main(base)
    augmented = stage4.main([*base, "--PLATFORM_SD=0.5", "--LENGTH_SLOPE_SD=0.2"])
    settings = torch.load(Paths(root).tape_checkpoint, weights_only=True)["settings"]
    assert settings["platform_sd"] == 0.5 and settings["length_slope_sd"] == 0.2
    assert not np.allclose(plain.to_numpy(), augmented.to_numpy())  # trained on other bulks
    np.testing.assert_allclose(augmented.sum(axis=1), 1.0, atol=1e-6)


# ----------------------------------------------------------------------------- intervals
def test_intervals_contain_the_point_estimate_and_stay_in_unit_range():
    rng = np.random.default_rng(0)
    pred = pd.DataFrame(rng.dirichlet(np.ones(4), 30), columns=list("abcd"))
    lower, upper = tape.intervals(pred, pd.Series([0.0, 0.05, 0.3, 2.0], index=list("abcd")))
    assert (lower.to_numpy() <= pred.to_numpy()).all() and (pred.to_numpy() <= upper.to_numpy()).all()
    assert lower.to_numpy().min() >= 0 and upper.to_numpy().max() <= 1
    np.testing.assert_array_equal(lower["a"], pred["a"])  # zero width: the point itself
    assert (upper["d"] == 1).all() and (lower["d"] == 0).all()


def test_conformal_halfwidth_is_the_finite_sample_quantile():
    pred = pd.DataFrame({"a": np.zeros(9)})
    truth = pd.DataFrame({"a": np.arange(1, 10) / 100})  # errors 0.01 .. 0.09
    # ceil((9 + 1) * 0.9) = 9th smallest error; at level 0.5, the 5th
    assert tape.conformal_halfwidth(pred, truth, 0.9)["a"] == pytest.approx(0.09)
    assert tape.conformal_halfwidth(pred, truth, 0.5)["a"] == pytest.approx(0.05)
    with pytest.raises(ValueError):
        tape.conformal_halfwidth(pred, truth, 1.0)


def test_intervals_cover_simulated_truth_at_the_nominal_level(fitted, inputs, tmp_path):
    """Calibrated on one set of simulated bulks, the 90 % intervals cover ~90 % of a fresh set's truths."""
    fit, _ = fitted
    reference, lengths, _, _ = inputs
    ckpt = tape.checkpoint_dict(fit)

    def predicted(seed):
        settings = dataclasses.replace(fit.settings, seed=seed)
        tpm, truth = tape.calibration_bulks(reference, settings, 300, lengths, tmp_path, n_threads=1)
        pred = tape.predict_proportions(ckpt, tpm, lengths, adaptive=False, model=fit.model)
        return pred, truth[pred.columns]

    calib_pred, calib_truth = predicted(10)
    test_pred, test_truth = predicted(20)
    halfwidth = tape.conformal_halfwidth(calib_pred, calib_truth)
    assert 0.85 <= tape.coverage(*tape.intervals(test_pred, halfwidth), test_truth) <= 0.95
    # a half-width of half the size covers clearly less: the calibration is not vacuous
    assert tape.coverage(*tape.intervals(test_pred, halfwidth / 2), test_truth) < 0.8


def linear_deconvolver(rng, n_genes: int, shape: float, n_types: int = 4):
    """A known linear model for the interval tests: (forward: x -> (proportions read back by least squares,
    their reconstruction), bulks(n, factor=None) -> (x = truth @ signature with 5 % sampling noise, times a
    per-gene ``factor`` if given; truth), the type names)."""
    signature = rng.gamma(shape, 1.0, (n_types, n_genes))
    types = list("abcdefgh"[:n_types])

    def forward(x):
        pred = np.clip(np.linalg.lstsq(signature.T, np.asarray(x).T, rcond=None)[0].T, 0.0, None)
        pred = pred / pred.sum(axis=1, keepdims=True)
        return pred, pred @ signature

    def bulks(n, factor=None):
        truth = rng.dirichlet(np.ones(n_types), n)
        x = truth @ signature * np.exp(rng.normal(0.0, 0.05, (n, n_genes)))  # sampling noise
        return (x if factor is None else x * factor), pd.DataFrame(truth, columns=types)
    return forward, bulks, types


def test_a_bulk_that_departs_from_the_simulated_bulks_gets_wider_intervals():
    """departure_halfwidth with a known linear model (x = proportions @ signature, read back by least
    squares): bulks like the calibration ones keep its half-width; bulks of another platform (every gene
    x a fixed factor, so the model cannot reconstruct them) get wider intervals that cover their truth."""
    rng = np.random.default_rng(0)
    n_genes = 300
    forward, bulks, types = linear_deconvolver(rng, n_genes, 1.0)
    calib_x, calib_truth = bulks(400)
    halfwidth = tape.conformal_halfwidth(pd.DataFrame(forward(calib_x)[0], columns=types), calib_truth)
    platform = np.exp(rng.normal(0.0, 0.5, n_genes))
    widths, coverages = {}, {}
    for name, factor in (("same", None), ("other", platform)):
        x, truth = bulks(30, factor)
        widths[name], info = tape.departure_halfwidth(forward, calib_x, calib_truth, x, halfwidth)
        assert (widths[name].to_numpy() >= halfwidth.to_numpy()[None, :] - 1e-12).all()  # never below
        pred = pd.DataFrame(forward(x)[0], columns=types)
        unit = pd.Series(1.0, index=types)
        coverages[name] = (tape.coverage(*tape.intervals(pred, halfwidth), truth),
                           tape.coverage(*tape.intervals(pred, unit, widths[name]), truth))
        if name == "other":
            assert np.median(info["rms"]) > 2 * info["rms_simulated"] and (info["excess"] > 0.5).all()
    assert widths["same"].to_numpy().mean() < 1.1 * halfwidth.mean()  # like the calibration bulks: unchanged
    assert coverages["same"][1] >= 0.85
    assert widths["other"].to_numpy().mean() > 2 * halfwidth.mean()
    assert coverages["other"][0] < 0.7 and coverages["other"][1] >= 0.85  # plain intervals miss the platform


def test_a_state_change_in_a_few_genes_departs_where_the_rms_residual_does_not():
    """departure_scores with a known linear model: bulks like the simulated ones score within the simulated
    bulks' own scores; bulks whose cells changed 1 % of their genes by 40 % (a state the reference lacks)
    score above every simulated bulk, although their rms residual over all genes barely moves."""
    rng = np.random.default_rng(1)
    n_genes = 2000
    forward, bulks, types = linear_deconvolver(rng, n_genes, 2.0)
    calib_x, calib_truth = bulks(400)
    halfwidth = tape.conformal_halfwidth(pd.DataFrame(forward(calib_x)[0], columns=types), calib_truth)
    changed = np.ones(n_genes)
    changed[rng.choice(n_genes, n_genes // 100, replace=False)] = 1.4
    info, coverages = {}, {}
    for name, factor in (("same", None), ("changed", changed)):
        x, truth = bulks(30, factor)
        widths, info[name] = tape.departure_halfwidth(forward, calib_x, calib_truth, x, halfwidth)
        pred = pd.DataFrame(forward(x)[0], columns=types)
        coverages[name] = (tape.coverage(*tape.intervals(pred, halfwidth), truth),
                           tape.coverage(*tape.intervals(pred, pd.Series(1.0, index=types), widths), truth))
    assert (info["same"]["score"] <= info["same"]["score_simulated_max"]).mean() >= 0.9
    assert (info["changed"]["score"] > info["changed"]["score_simulated_max"]).all()
    assert (info["changed"]["excess"] == 1.0).all()  # their residual is added whole to the simulated bulks
    assert coverages["same"][1] == coverages["same"][0]  # like the simulated bulks: the same intervals
    assert coverages["changed"][1] >= 0.9 > coverages["changed"][0]  # 0.87 -> 0.94
    assert np.allclose(info["changed"]["p_value"], 1 / 401)
    assert np.median(info["changed"]["rms"]) < 1.3 * info["changed"]["rms_simulated"]  # the rms hardly sees it
    # the score is the mean squared z of the top 1 % of genes, z in units of the simulated bulks' residual
    residual = np.zeros((1, n_genes))
    residual[0, :20] = 3.0
    bulk_score, _ = tape.departure_scores(np.ones((5, n_genes)), residual)
    assert bulk_score[0] == pytest.approx(9.0, rel=1e-5)


def test_marker_genes_are_each_types_most_specific_detected_genes():
    rng = np.random.default_rng(0)
    types = np.repeat(["a", "b", "c"], 40)
    counts = rng.poisson(0.05, (120, 30)).astype(np.float32)  # mostly undetected background
    counts[types == "a", 3] += 40  # a's strong marker
    counts[types == "b", 7] += 20  # b's marker
    counts[types == "c", 11] += 10  # c's marker...
    counts[np.flatnonzero(types == "c")[:2], 20] += 2000  # ...and a huge gene seen in only 2 of its 40 cells
    reference = pd.DataFrame(counts, index=types, columns=[f"g{i}" for i in range(30)])
    assert tape.marker_genes(reference, 1) == ["g3", "g7", "g20"]  # pooled level alone prefers the rare gene
    assert tape.marker_genes(reference, 1, min_detection=0.2) == ["g3", "g7", "g11"]  # detected in >= 20 %
    two = tape.marker_genes(reference, 2, min_detection=0.2)
    assert {"g3", "g7", "g11"} <= set(two) and len(two) <= 6
    assert two == [g for g in reference.columns if g in two]  # the reference's gene order
    with pytest.raises(ValueError):
        tape.marker_genes(reference, 0)


def test_marker_selection_restricts_tapes_genes(inputs, simulated, tmp_path):
    reference, lengths, bulk, _ = inputs
    settings = dataclasses.replace(TINY, gene_selection="markers", markers_per_type=20)
    fit = tape.fit_tape(reference, bulk, lengths, settings, tmp_path, n_threads=1, simulated=simulated.copy())
    markers = set(tape.marker_genes(reference, 20, settings.marker_min_detection))
    assert 0 < len(fit.genes) <= len(markers) and set(fit.genes) <= markers
    assert tape.checkpoint_dict(fit)["settings"]["gene_selection"] == "markers"
    with pytest.raises(InputError, match="GENE_SELECTION"):
        tape.fit_tape(reference, bulk, lengths, dataclasses.replace(TINY, gene_selection="best"), tmp_path,
                      n_threads=1, simulated=simulated.copy())


def test_ensemble_averages_members_and_reloads(fitted, inputs, simulated, tmp_path):
    """Member 0 is the single fit; the prediction is the members' mean, also after a reload."""
    single, _ = fitted
    reference, lengths, bulk, _ = inputs
    fit = tape.fit_tape(reference, bulk, lengths, dataclasses.replace(TINY, members=3), tmp_path, n_threads=1,
                        simulated=simulated.copy())
    assert len(fit.members) == 3 and fit.model is fit.members[0]
    ckpt = tape.checkpoint_dict(fit)
    members = tape.predict_members(ckpt, bulk, lengths, adaptive=False, model=fit.members)
    np.testing.assert_allclose(members[0].to_numpy(), tape.predict_proportions(
        tape.checkpoint_dict(single), bulk, lengths, adaptive=False, model=single.model).to_numpy(), atol=1e-7)
    assert not np.allclose(members[0].to_numpy(), members[1].to_numpy())  # other seeds, other fits
    mean = tape.predict_proportions(ckpt, bulk, lengths, adaptive=False, model=fit.members)
    np.testing.assert_allclose(mean.to_numpy(), sum(m.to_numpy() for m in members) / 3, atol=1e-12)
    np.testing.assert_allclose(mean.sum(axis=1), 1.0, atol=1e-6)
    tape.save_checkpoint(fit, tmp_path / "ensemble.pt")
    reloaded = tape.load_checkpoint(tmp_path / "ensemble.pt")
    assert len(reloaded["member_state_dicts"]) == 2
    np.testing.assert_allclose(tape.predict_proportions(reloaded, bulk, lengths).to_numpy(), mean.to_numpy(),
                               atol=1e-7)
    assert "member_state_dicts" not in tape.checkpoint_dict(single)


def test_bootstrap_members_train_on_resampled_reference_cells(fitted, inputs, simulated, tmp_path):
    single, _ = fitted
    reference, lengths, bulk, _ = inputs
    resampled = tape.bootstrap_reference(reference, 5)
    assert resampled.index.value_counts().sort_index().equals(reference.index.value_counts().sort_index())
    assert not resampled.equals(reference)
    settings = dataclasses.replace(TINY, members=2, member_data="bootstrap")
    fit = tape.fit_tape(reference, bulk, lengths, settings, tmp_path, n_threads=1, simulated=simulated.copy())
    first, second = tape.predict_members(tape.checkpoint_dict(fit), bulk, lengths, model=fit.members)
    np.testing.assert_allclose(first.to_numpy(), tape.predict_proportions(
        tape.checkpoint_dict(single), bulk, lengths, model=single.model).to_numpy(), atol=1e-7)
    assert not np.allclose(first.to_numpy(), second.to_numpy())


def test_spread_scaled_intervals_contain_the_point_and_widen_with_the_spread():
    rng = np.random.default_rng(1)
    members = [pd.DataFrame(rng.dirichlet(np.ones(3), 50), columns=list("abc")) for _ in range(4)]
    scale = tape.ensemble_scale(members, floor=0.01)
    stacked = np.stack([m.to_numpy() for m in members])
    np.testing.assert_allclose(scale.to_numpy(), stacked.std(axis=0, ddof=1) + 0.01)
    mean = sum(members[1:], members[0]) / 4
    truth = members[0]
    multiplier = tape.conformal_halfwidth(mean, truth, scale=scale)
    # the normalised scores' conformal quantile, a multiplier of the spread
    errors = (mean - truth).abs() / scale
    assert multiplier["a"] == pytest.approx(np.sort(errors["a"])[45])  # the ceil(51 * 0.9) = 46th smallest
    lower, upper = tape.intervals(mean, multiplier, scale)
    assert (lower.to_numpy() <= mean.to_numpy()).all() and (mean.to_numpy() <= upper.to_numpy()).all()
    width = (upper - lower).to_numpy()
    inner = (lower.to_numpy() > 0) & (upper.to_numpy() < 1)
    np.testing.assert_allclose(width[inner], (2 * multiplier.to_numpy()[None, :] * scale.to_numpy())[inner])


def test_stage2_pseudobulk_tpm_follows_the_protocol(data_dir, tmp_path):
    import json

    paths = Paths(data_dir)
    counts = pd.read_csv(paths.pseudobulk_counts, sep="\t", index_col=0)
    tpm = pd.read_csv(paths.pseudobulk_tpm, sep="\t", index_col=0)
    pd.testing.assert_frame_equal(tpm, counts_to_cpm(counts), rtol=1e-9)  # UMI default: CPM
    assert json.loads(paths.sctape_config.read_text())["PROTOCOL"] == "umi"
    root = tmp_path / "data"
    shutil.copytree(data_dir, root)
    import _2_prepare_sctape as stage2

    stage2.main([f"--DATA_DIR={root}", "--N_PSEUDOBULK=4", "--PROTOCOL=full_length"])
    full = pd.read_csv(Paths(root).pseudobulk_tpm, sep="\t", index_col=0)
    pd.testing.assert_frame_equal(full, counts_to_tpm(counts, io.read_gene_lengths(paths.gene_length))[0],
                                  rtol=1e-9)
    with pytest.raises(InputError, match="PROTOCOL"):
        stage2.main([f"--DATA_DIR={root}", "--PROTOCOL=smartseq"])
    from models.config import constants_of

    assert "PROTOCOL" in constants_of(vars(stage2)) and "PROTOCOLS" not in constants_of(vars(stage2))
    # _4_ needs to know how the reference was counted; an older _2_ did not say.
    Paths(root).sctape_config.write_text("{}")
    with pytest.raises(InputError, match="rerun _2_prepare_sctape.py"):
        stage4.main([f"--DATA_DIR={root}", f"--FIG_DIR={tmp_path}", *TINY_ARGS])


def test_stage4_missing_inputs_name_the_stage(tiny_split_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_split_dir, root)
    with pytest.raises(InputError, match="_2_prepare_sctape.py"):
        stage4.main([f"--DATA_DIR={root}", f"--FIG_DIR={tmp_path}", *TINY_ARGS])
    with pytest.raises(InputError, match="tape.pt"):
        write_sctape_inputs(root)
        stage4.main([f"--DATA_DIR={root}", f"--FIG_DIR={tmp_path}", "--RETRAIN=false", *TINY_ARGS])
    with pytest.raises(InputError, match="GENE_SELECTION"):
        stage4.main([f"--DATA_DIR={root}", f"--FIG_DIR={tmp_path}", "--GENE_SELECTION=best", *TINY_ARGS])
    with pytest.raises(InputError, match="MEMBERS"):
        stage4.main([f"--DATA_DIR={root}", f"--FIG_DIR={tmp_path}", "--MEMBERS=0", *TINY_ARGS])
