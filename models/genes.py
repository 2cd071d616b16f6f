"""Gene identifiers: which kind a list of genes holds, and matching a bulk's genes to a reference's.

A bulk table often names its genes by Ensembl id (``ENSG00000141510``, with or without a
``.N`` version) while the reference has symbols (``TP53``), or spells symbols in another case.
:func:`match_genes` maps a bulk's names onto the reference's:

1. exact matches first;
2. then, for the rest, names equal ignoring case and an Ensembl version suffix (``\\.\\d+``
   is stripped from Ensembl-like ids only: ``RP11-34P13.7`` is a symbol and keeps its ``.7``).
   A relaxed key that several bulk names, or several reference names, share is ambiguous and
   is not merged (logged); a reference gene already matched exactly is not matched again;
3. when the reference also carries ids (a 10x two-column ``genes.tsv``, as in ``features.tsv``),
   the bulk is matched against its symbols and its ids, and whichever overlaps more wins.

:func:`describe_mismatch` says which kind each side uses and how to convert, for the error
raised when too few genes are shared.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Sequence

log = logging.getLogger(__name__)

# (kind, pattern) in the order tried; anything else counts as a gene symbol.
KINDS = (
    ("Ensembl gene ids", re.compile(r"ENS[A-Z]*G\d{6,}(\.\d+)?")),
    ("Ensembl transcript ids", re.compile(r"ENS[A-Z]*T\d{6,}(\.\d+)?")),
    ("Entrez (NCBI) gene ids", re.compile(r"\d+")),
)
SYMBOLS = "gene symbols"
_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*[GTP]\d{6,})\.\d+$")


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.fullmatch(name):
            return kind
    return SYMBOLS


def identifier_kind(names: Sequence[str]) -> tuple[str, int, str]:
    """(the most common kind, how many names are of it, an example) of a list of gene names."""
    names = [str(n) for n in names]
    counts: dict[str, list[str]] = {}
    for name in names:
        counts.setdefault(kind_of(name), []).append(name)
    if not counts:
        return SYMBOLS, 0, ""
    kind, members = max(counts.items(), key=lambda item: len(item[1]))
    return kind, len(members), members[0]


def relaxed_key(name: str) -> str:
    """Upper case, and an Ensembl id without its ``.N`` version (symbols keep theirs)."""
    name = str(name).strip()
    versioned = _ENSEMBL_VERSION.match(name)
    return (versioned.group(1) if versioned else name).upper()


@dataclass
class GeneMatch:
    """Bulk name -> reference gene (the reference's own name, a symbol), and how it was found."""

    mapping: dict[str, str]
    n_exact: int
    n_relaxed: int
    via: str = "symbols"  # "symbols" or "ids": which of the reference's names matched
    ambiguous: list[str] = field(default_factory=list)  # bulk names left unmatched as ambiguous

    def __len__(self) -> int:
        return len(set(self.mapping.values()))


def _match_names(query: Sequence[str], targets: Sequence[str]) -> tuple[dict[str, str], int, int, list[str]]:
    """(query -> target, n exact, n relaxed, ambiguous query names) of ``query`` onto ``targets``."""
    target_set = set(targets)
    mapping = {q: q for q in query if q in target_set}
    taken = set(mapping.values())
    n_exact = len(taken)
    by_key: dict[str, list[str]] = {}
    for target in targets:
        if target not in taken:
            by_key.setdefault(relaxed_key(target), []).append(target)
    asking: dict[str, list[str]] = {}
    for q in dict.fromkeys(query):
        if q not in mapping:
            key = relaxed_key(q)
            if key in by_key:
                asking.setdefault(key, []).append(q)
    ambiguous = []
    for key, names in asking.items():
        candidates = by_key[key]
        if len(names) == 1 and len(candidates) == 1:
            mapping[names[0]] = candidates[0]
        else:
            ambiguous.extend(names)
    return mapping, n_exact, len(mapping) - n_exact, ambiguous


def match_genes(query: Sequence[str], symbols: Sequence[str], ids: Sequence[str] | None = None,
                source: str = "bulk") -> GeneMatch:
    """Map ``query`` (a bulk's gene names) onto the reference's ``symbols``.

    ``ids``: the reference's gene ids, aligned with ``symbols`` (None when it has none); the
    bulk is then matched on whichever of the two overlaps more, and id matches map to the
    symbol of that id. Logs the relaxed (case / version) matches and the ambiguous names.
    """
    query = [str(q) for q in query]
    symbols = [str(s) for s in symbols]
    mapping, n_exact, n_relaxed, ambiguous = _match_names(query, symbols)
    best = GeneMatch(mapping, n_exact, n_relaxed, "symbols", ambiguous)
    if ids is not None:
        ids = [str(i) for i in ids]
        id_to_symbol = dict(zip(ids, symbols))
        by_id, n_exact_id, n_relaxed_id, ambiguous_id = _match_names(query, ids)
        via_ids = GeneMatch({q: id_to_symbol[t] for q, t in by_id.items()}, n_exact_id, n_relaxed_id, "ids",
                            ambiguous_id)
        if len(via_ids) > len(best):
            log.info("%s: matched %s genes on the reference's gene ids (%s on its symbols)", source,
                     f"{len(via_ids):,}", f"{len(best):,}")
            best = via_ids
    if best.n_relaxed:
        log.info("%s: matched %s genes ignoring case / version (e.g. %s), after %s exact matches", source,
                 f"{best.n_relaxed:,}", _examples(best.mapping, exact=False), f"{best.n_exact:,}")
    if best.ambiguous:
        log.warning("%s: %d gene names match several genes ignoring case / version and are left unmatched "
                    "(e.g. %s)", source, len(best.ambiguous), best.ambiguous[:3])
    return best


def _examples(mapping: dict[str, str], exact: bool, n: int = 3) -> str:
    pairs = [(q, t) for q, t in mapping.items() if (q == t) == exact][:n]
    return ", ".join(f"{q} -> {t}" for q, t in pairs)


def rename_columns(frame, symbols: Sequence[str], ids: Sequence[str] | None = None, source: str = "bulk"):
    """(``frame`` with its matched columns renamed to the reference's symbols, the :class:`GeneMatch`)."""
    match = match_genes(frame.columns, symbols, ids, source)
    if any(q != t for q, t in match.mapping.items()):
        frame = frame.rename(columns=match.mapping)
    return frame, match


def _kind_text(names: Sequence[str]) -> str:
    kind, n_kind, example = identifier_kind(names)
    return f"{kind} (e.g. {example}, {n_kind:,} of {len(names):,})"


def describe_mismatch(query: Sequence[str], symbols: Sequence[str], ids: Sequence[str] | None = None,
                      what: str = "the bulk's genes") -> str:
    """Which kind of identifier each side uses, and how to convert (for a too-few-shared-genes error)."""
    query_kind = identifier_kind(query)[0]
    text = f"{what} are {_kind_text(query)}, the reference's are {_kind_text(symbols)}"
    if ids is not None:
        text += f" and its ids {_kind_text(ids)}"
    reference_kinds = {identifier_kind(symbols)[0]} | ({identifier_kind(ids)[0]} if ids is not None else set())
    if query_kind in reference_kinds:
        return text + "; the naming agrees, so check the species, the orientation, or that it is the right bulk"
    if query_kind != SYMBOLS and SYMBOLS in reference_kinds:
        return (text + "; convert one side: give the reference its ids (raw/genes.tsv in 10x's two columns "
                "gene_id<TAB>symbol, e.g. a 10x features.tsv's first two columns, then rerun from "
                "_1_split_train_test.py), or map the bulk's ids to symbols first (e.g. an Ensembl BioMart "
                "table 'Gene stable ID' -> 'Gene name', or mygene's querymany(ids, scopes='ensembl.gene', "
                "fields='symbol'); ids that share a symbol are summed)")
    if query_kind == SYMBOLS:
        return (text + "; convert one side: map the bulk's symbols to the reference's ids (e.g. Ensembl BioMart "
                "'Gene name' -> 'Gene stable ID'), or give the reference its symbols (10x genes.tsv's second column)")
    return text + "; map both to gene symbols (e.g. with Ensembl BioMart or mygene)"
