"""Gene identifiers (models.genes) and how stage 4 and 5 match a bulk's genes to the reference's."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from models import genes
from models.utils import InputError

SYMBOLS = ["TP53", "CD3E", "MS4A1", "RP11-34P13.7", "AL627309.1", "GAPDH"]
IDS = ["ENSG00000141510", "ENSG00000198851", "ENSG00000156738", "ENSG00000250575", "ENSG00000238009",
       "ENSG00000111640"]


@pytest.mark.parametrize("names, kind", [
    (IDS, "Ensembl gene ids"),
    ([f"{i}.{v}" for i, v in zip(IDS, range(1, 7))], "Ensembl gene ids"),
    (["ENSMUSG00000064370", "ENSMUSG00000051951"], "Ensembl gene ids"),
    (["ENST00000269305.9"], "Ensembl transcript ids"),
    (["7157", "916"], "Entrez (NCBI) gene ids"),
    (SYMBOLS, "gene symbols"),
])
def test_identifier_kind(names, kind):
    assert genes.identifier_kind(names)[:2] == (kind, len(names))


def test_versions_are_stripped_from_ensembl_ids_only():
    assert genes.relaxed_key("ENSG00000141510.17") == "ENSG00000141510"
    assert genes.relaxed_key("RP11-34P13.7") == "RP11-34P13.7"  # a symbol: its ".7" is part of the name
    assert genes.relaxed_key("al627309.1") == "AL627309.1"


def test_exact_then_case_and_version_matches_are_logged(caplog):
    query = ["TP53", "cd3e", "Ms4a1", "RP11-34P13", "NOT_A_GENE"]
    with caplog.at_level(logging.INFO, logger="models.genes"):
        match = genes.match_genes(query, SYMBOLS, source="bulk.tsv")
    assert match.mapping == {"TP53": "TP53", "cd3e": "CD3E", "Ms4a1": "MS4A1"}  # RP11-34P13 is another gene
    assert (match.n_exact, match.n_relaxed, len(match)) == (1, 2, 3)
    assert "bulk.tsv: matched 2 genes ignoring case / version" in caplog.text


def test_exact_matches_take_priority_and_collisions_are_not_merged(caplog):
    # "Tp53" would relax onto TP53, which "TP53" already matches exactly: left alone.
    # "cd3e" and "Cd3e" both relax onto CD3E: ambiguous, neither is merged.
    # The reference's "Sept1"/"SEPT1" share a relaxed key: "sept1" is ambiguous too.
    with caplog.at_level(logging.INFO, logger="models.genes"):
        match = genes.match_genes(["TP53", "Tp53", "cd3e", "Cd3e", "sept1"], ["TP53", "CD3E", "Sept1", "SEPT1"])
    assert match.mapping == {"TP53": "TP53"}
    assert sorted(match.ambiguous) == ["Cd3e", "cd3e", "sept1"]
    assert "3 gene names match several genes" in caplog.text


def test_ensembl_versions_match_the_reference_ids():
    versioned = [f"{i}.{v}" for i, v in zip(IDS, range(3, 9))]
    assert len(genes.match_genes(versioned, SYMBOLS)) == 0  # symbols only: nothing to match
    match = genes.match_genes(versioned + ["GAPDH"], SYMBOLS, IDS)
    assert match.via == "ids" and len(match) == 6
    assert match.mapping[versioned[0]] == "TP53"  # ids map to the reference's symbols


def test_reference_ids_are_used_only_when_they_overlap_more():
    match = genes.match_genes(SYMBOLS[:4] + [IDS[5]], SYMBOLS, IDS)
    assert match.via == "symbols" and match.mapping == {s: s for s in SYMBOLS[:4]}


def test_mismatch_message_names_both_kinds_and_the_conversion():
    text = genes.describe_mismatch([f"{i}.1" for i in IDS], SYMBOLS)
    assert "the bulk's genes are Ensembl gene ids (e.g. ENSG00000141510.1, 6 of 6)" in text
    assert "the reference's are gene symbols (e.g. TP53, 6 of 6)" in text
    assert "two columns" in text and "BioMart" in text and "mygene" in text
    assert "symbols to the reference's ids" in genes.describe_mismatch(SYMBOLS, IDS)
    assert "check the species" in genes.describe_mismatch(["A", "B"], SYMBOLS)


# ----------------------------------------------------------------------------- stage 4 and 5
def _bulk(columns, n_samples=3, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.integers(1, 100, (n_samples, len(columns))).astype(float),
                        index=[f"s{i}" for i in range(n_samples)], columns=columns)


REF_SYMBOLS = [f"GENE{i}" for i in range(60)]
REF_IDS = [f"ENSG{i:011d}" for i in range(60)]


def test_stage4_ensembl_bulk_against_symbol_reference_says_how_to_convert():
    from models.deconvolution import prepare_bulk

    table = _bulk([f"{i}.2" for i in REF_IDS]).T  # genes x samples, as many bulk tables come
    with pytest.raises(InputError) as err:
        prepare_bulk(table, "TPM", REF_SYMBOLS, None, 50, "ensembl_bulk.tsv")
    message = str(err.value)
    assert message.startswith("ensembl_bulk.tsv: only 0 genes shared with the reference (MIN_SHARED_GENES=50)")
    assert "Ensembl gene ids (e.g. ENSG00000000000.2, 60 of 60)" in message
    assert "the reference's are gene symbols (e.g. GENE0, 60 of 60)" in message
    assert "two columns gene_id<TAB>symbol" in message


def test_stage4_ensembl_bulk_matches_a_reference_with_ids():
    from models.deconvolution import prepare_bulk

    table = _bulk([f"{i}.2" for i in REF_IDS]).T
    tpm, report = prepare_bulk(table, "TPM", REF_SYMBOLS, None, 50, "ensembl_bulk.tsv", reference_ids=REF_IDS)
    assert report.orientation == "genes x samples (transposed)" and report.n_shared_reference == 60
    assert list(tpm.columns) == REF_SYMBOLS  # renamed to the reference's symbols
    np.testing.assert_array_equal(tpm.to_numpy(), table.T.to_numpy())


def test_stage4_lower_case_symbols_match(caplog):
    from models.deconvolution import prepare_bulk

    table = _bulk([g.lower() for g in REF_SYMBOLS])
    with caplog.at_level(logging.INFO):
        tpm, report = prepare_bulk(table, "TPM", REF_SYMBOLS, None, 50, "lower.tsv")
    assert report.n_shared_reference == 60 and list(tpm.columns) == REF_SYMBOLS
    assert "matched 60 genes ignoring case / version" in caplog.text


def test_stage4_saved_model_alignment_matches_relaxed_names():
    from models.deconvolution import align_genes

    aligned = align_genes(_bulk([g.lower() for g in REF_SYMBOLS]), REF_SYMBOLS, 50, "lower.tsv")
    assert list(aligned.columns) == REF_SYMBOLS and (aligned.to_numpy() > 0).all()
    with pytest.raises(InputError, match="Ensembl gene ids.*RETRAIN=true"):
        align_genes(_bulk(REF_IDS), REF_SYMBOLS, 50, "ensembl.tsv")


def test_stage5_conditioning_error_names_the_identifiers():
    from models import condition

    with pytest.raises(InputError, match=r"ensembl.tsv: only 0 of its genes.*Ensembl gene ids.*gene symbols"
                                         r".*CONDITION=none"):
        condition.bulk_profiles(_bulk(REF_IDS), REF_SYMBOLS, 50, "ensembl.tsv")


def test_tape_checkpoint_keeps_gene_ids_loadable_with_weights_only(tmp_path):
    import torch

    from models.deconvolution import tape

    class _Model(torch.nn.Module):
        inputdim, outputdim = 3, 2

    fit = tape.TapeFit(_Model(), ["A", "B", "C"], ["t1", "t2"], tape.TapeSettings(), gene_ids=["E1", "E2", "E3"])
    torch.save(tape.checkpoint_dict(fit), tmp_path / "tape.pt")
    assert torch.load(tmp_path / "tape.pt", weights_only=True)["gene_ids"] == ["E1", "E2", "E3"]
