"""Figures of stage 5: proportions, a UMAP overlay, gene-gene correlation heatmaps.

Matplotlib runs on the Agg backend (no display needed) and every figure is closed after
saving, so a long run never accumulates open figures. Each function writes one PNG
atomically and returns its path.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from models import evaluation  # noqa: E402
from models.io import atomic_path  # noqa: E402

log = logging.getLogger(__name__)

DPI = 110  # small PNGs (README figures are committed)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return path


def _palette(names: Sequence[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    return {str(name): cmap(i % cmap.N) for i, name in enumerate(names)}


def plot_proportions(generated: pd.DataFrame, path: Path, real: pd.Series | None = None,
                     title: str = "Cell-type proportions") -> Path:
    """Grouped bars per cell type: real test proportions (if given) beside each generated sample.

    generated: samples x cell types (shares of generated cells); real: cell type -> share.
    """
    series = {} if real is None else {"real (test)": real.reindex(generated.columns).fillna(0.0)}
    for sample in generated.index:
        series[f"generated: {sample}" if len(generated) > 1 else "generated"] = generated.loc[sample]
    n_types, n_series = generated.shape[1], len(series)
    width = 0.8 / n_series
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * n_types + 2), 3.6))
    x = np.arange(n_types)
    for i, (label, values) in enumerate(series.items()):
        ax.bar(x + (i - (n_series - 1) / 2) * width, values.to_numpy(), width, label=label)
    ax.set_xticks(x, [str(c) for c in generated.columns], rotation=45, ha="right")
    ax.set_ylabel("fraction of cells")
    if real is not None and len(generated) == 1:
        mae = float(np.abs(generated.iloc[0].to_numpy() - series["real (test)"].to_numpy()).mean())
        title = f"{title} (MAE {mae:.4f})"
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def umap_embedding(counts_by_set: Mapping[str, object], n_top_genes: int = 2000, n_comps: int = 30,
                   seed: int = 0, method: str = "umap") -> dict[str, np.ndarray]:
    """2-D UMAP of several cells x genes count sets in one shared space.

    Genes (top variable) and the PCA come from the first set (the real cells), so the layout
    is the real data's and the others are placed in it. ``method="pca"`` returns the first two
    principal components instead (no umap-learn JIT compile; for quick runs and tests).
    """
    if method not in ("umap", "pca"):
        raise ValueError(f"method must be 'umap' or 'pca', got {method!r}")
    names = list(counts_by_set)
    normed = {name: evaluation.log_normalize(counts) for name, counts in counts_by_set.items()}
    hvg = evaluation.top_variable_genes(normed[names[0]], n_top_genes)
    pcs = evaluation.pca_fit_transform(*[evaluation.dense(normed[name][:, hvg]) for name in names],
                                       n_comps=n_comps, seed=seed)
    stacked = np.vstack(pcs)
    if method == "pca":
        layout = stacked[:, :2]
        bounds = np.cumsum([0] + [len(p) for p in pcs])
        return {name: layout[bounds[i]:bounds[i + 1]] for i, name in enumerate(names)}
    import umap

    n_neighbors = max(2, min(15, len(stacked) - 1))
    reducer = umap.UMAP(n_neighbors=n_neighbors, random_state=seed, n_jobs=1)
    layout = reducer.fit_transform(stacked)
    bounds = np.cumsum([0] + [len(p) for p in pcs])
    return {name: layout[bounds[i]:bounds[i + 1]] for i, name in enumerate(names)}


def plot_umap(embedding: Mapping[str, np.ndarray], cell_types: Mapping[str, np.ndarray], path: Path,
              type_order: Sequence[str] | None = None, axis_name: str = "UMAP") -> Path:
    """Two panels: cells coloured by dataset (real / generated / ...) and by cell type."""
    names = list(embedding)
    all_types = type_order or sorted({str(t) for types in cell_types.values() for t in types})
    type_colours = _palette(all_types)
    set_colours = dict(zip(names, ["#444444", "#e4572e", "#2e86ab", "#76b041"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    rng = np.random.default_rng(0)
    points = np.vstack([embedding[n] for n in names])
    sets = np.concatenate([[n] * len(embedding[n]) for n in names])
    types = np.concatenate([np.asarray(cell_types[n], dtype=str) for n in names])
    order = rng.permutation(len(points))  # interleave so no set is hidden under another
    size = max(1.0, min(8.0, 4000.0 / max(len(points), 1)))
    axes[0].scatter(points[order, 0], points[order, 1], s=size, c=[set_colours[s] for s in sets[order]],
                    linewidths=0, alpha=0.7)
    for name in names:
        axes[0].scatter([], [], s=20, c=[set_colours[name]], label=f"{name} ({len(embedding[name])})")
    axes[0].set_title("by dataset")
    axes[0].legend(frameon=False, fontsize=8, markerscale=1.5)
    axes[1].scatter(points[order, 0], points[order, 1], s=size, c=[type_colours[t] for t in types[order]],
                    linewidths=0, alpha=0.7)
    for name in all_types:
        axes[1].scatter([], [], s=20, c=[type_colours[str(name)]], label=str(name))
    axes[1].set_title("by cell type")
    axes[1].legend(frameon=False, fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{axis_name} 1")
        ax.set_ylabel(f"{axis_name} 2")
    return _save(fig, path)


def cluster_order(corr: np.ndarray) -> np.ndarray:
    """Gene order that puts correlated genes together (average-linkage on 1 - r)."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    if len(corr) < 3:
        return np.arange(len(corr))
    distance = np.clip(1.0 - corr, 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    return leaves_list(linkage(squareform((distance + distance.T) / 2, checks=False), method="average"))


def plot_correlation_heatmaps(correlations: Mapping[str, np.ndarray], path: Path,
                              genes: Sequence[str] | None = None) -> Path:
    """Side-by-side gene-gene correlation heatmaps (the original's Figure 4), same gene order.

    correlations: panel title -> [G, G] matrix; the first (the real cells) sets the order.
    """
    titles = list(correlations)
    order = cluster_order(correlations[titles[0]])
    fig, axes = plt.subplots(1, len(titles), figsize=(4.2 * len(titles) + 0.8, 4.2))
    axes = np.atleast_1d(axes)
    image = None
    for ax, title in zip(axes, titles):
        matrix = correlations[title][np.ix_(order, order)]
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if genes is not None and len(genes) <= 40:
        names = np.asarray(genes)[order]
        axes[0].set_yticks(range(len(names)), names, fontsize=6)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="Pearson r")
    return _save(fig, path)


def plot_condition_shifts(top_genes: Mapping[str, pd.Series], path: Path, title: str = "") -> Path:
    """One panel per cell type: its most-shifted genes by the bulk conditioning (log fold change, bars).

    top_genes: type -> Series (gene -> signed natural-log fold change of the type's mean count),
    e.g. ``models.condition.top_shifted_genes``.
    """
    names = list(top_genes)
    n_cols = min(4, max(1, len(names)))
    n_rows = -(-len(names) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 0.25 * max(len(s) for s in top_genes.values())
                                                       * n_rows + 1.2 * n_rows), squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        values = top_genes[name].iloc[::-1]
        ax.barh(np.arange(len(values)), values.to_numpy(), color=np.where(values.to_numpy() > 0, "#c0392b", "#2e86c1"))
        ax.set_yticks(np.arange(len(values)), [str(g) for g in values.index], fontsize=7)
        ax.axvline(0.0, color="grey", lw=0.8)
        ax.set_title(str(name), fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.supxlabel("log fold change of the type's mean count (conditioned / unconditioned)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
