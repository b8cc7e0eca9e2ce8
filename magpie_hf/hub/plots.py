"""PNG plots for the dataset card (matplotlib's Agg canvas: no display, no global backend switch).

Example:
    >>> from magpie_hf.hub.plots import write_plots
    >>> plots = write_plots(stats, "runs/pro/dataset/plots")   # doctest: +SKIP
    >>> [p.file for p in plots]                                 # doctest: +SKIP
    ['plots/distributions.png', 'plots/lengths.png', 'plots/instruction_map.png']
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .stats import MISSING, DatasetStats

logger = logging.getLogger(__name__)

#: fewer instructions than this and the embedding map is skipped (a map of a handful of points says nothing)
MIN_MAP_POINTS = 10
#: t-SNE (when scikit-learn is installed) from this many points on; PCA below, or without scikit-learn
MIN_TSNE_POINTS = 50


@dataclass
class Plot:
    """A plot written under the dataset folder, as the card links it."""

    file: str  # relative POSIX path, e.g. "plots/lengths.png"
    title: str
    caption: str = ""


def _figure(ncols: int, nrows: int = 1, width: float = 5.2, height: float = 3.8):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    return fig, axes


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def plot_distributions(stats: DatasetStats, path: Path, *, top: int = 12) -> bool:
    """Horizontal bar charts of every categorical tag present (task category, quality, difficulty, ...)."""
    if not stats.categorical:
        return False
    ncols = min(3, len(stats.categorical))
    nrows = -(-len(stats.categorical) // ncols)
    fig, axes = _figure(ncols, nrows)
    for ax, column in zip(axes, stats.categorical):
        counts = column.counts[:top]
        labels = [str(v) for v, _ in counts][::-1]
        values = [c for _, c in counts][::-1]
        colors = ["#bbbbbb" if v == MISSING else "#3b75af" for v in labels]
        ax.barh(labels, values, color=colors)
        total = column.total or 1
        for y, v in enumerate(values):
            ax.text(v, y, f" {100 * v / total:.0f}%", va="center", fontsize=8)
        ax.set_title(column.label, fontsize=11)
        ax.set_xlabel("rows")
        ax.margins(x=0.18)
        ax.tick_params(axis="y", labelsize=9)
    for ax in axes[len(stats.categorical):]:
        ax.set_visible(False)
    fig.suptitle(f"Tag distributions — config '{stats.config}', {stats.rows:,} rows", fontsize=12)
    _save(fig, path)
    return True


def plot_numeric(stats: DatasetStats, names: list[str], path: Path, title: str, *, log_x: bool = False) -> bool:
    """Histograms of numeric columns (lengths or scores), with the median marked."""
    columns = [stats.get(n) for n in names]
    columns = [c for c in columns if c is not None and len(c.values)]
    if not columns:
        return False
    fig, axes = _figure(len(columns))
    for ax, column in zip(axes, columns):
        values = column.values
        log = log_x and values.min() > 0 and values.max() / values.min() > 20
        bins = np.geomspace(values.min(), values.max(), 40) if log else 40
        ax.hist(values, bins=bins, color="#3b75af", edgecolor="white", linewidth=0.4)
        if log:
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("log scale")
        median = float(np.median(values))
        shown = f"{median:,.0f}" if np.all(values == np.round(values)) else f"{median:,.2f}"
        ax.axvline(median, color="#d1495b", linestyle="--", linewidth=1.2, label=f"median {shown}")
        ax.set_title(column.label, fontsize=11)
        ax.set_ylabel("rows")
        ax.legend(fontsize=8)
    fig.suptitle(f"{title} — config '{stats.config}'", fontsize=12)
    _save(fig, path)
    return True


def embed_instructions(texts: list[str], model: str | os.PathLike | None = None) -> np.ndarray:
    """Sentence embeddings (normalised) with the embedded all-MiniLM-L6-v2 unless ``model`` names another."""
    from sentence_transformers import SentenceTransformer

    from magpie_hf.utils.embedded import embedded_embedding_model

    encoder = SentenceTransformer(str(model or embedded_embedding_model()), device="cpu")
    return np.asarray(
        encoder.encode(texts, batch_size=64, show_progress_bar=len(texts) > 256, normalize_embeddings=True),
        dtype=np.float32,
    )


def project_2d(embeddings: np.ndarray, *, seed: int = 0) -> tuple[np.ndarray, str]:
    """Map embeddings to 2-D: t-SNE when scikit-learn is installed and there are enough points, else PCA."""
    if len(embeddings) >= MIN_TSNE_POINTS:
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            pass
        else:
            perplexity = min(30.0, (len(embeddings) - 1) / 3)
            tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, metric="cosine")
            return tsne.fit_transform(embeddings), "t-SNE"
    centred = embeddings - embeddings.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T, "PCA"


def plot_instruction_map(stats: DatasetStats, path: Path, *, model: str | os.PathLike | None = None, seed: int = 0) -> str | None:
    """Scatter the sampled instructions' embeddings in 2-D, coloured by task category.

    Returns the projection used ("t-SNE"/"PCA"), or None when skipped (too few instructions).
    """
    texts = stats.sample_instructions
    if len(texts) < MIN_MAP_POINTS:
        logger.info("Instruction map skipped: %d instructions (need %d).", len(texts), MIN_MAP_POINTS)
        return None
    points, method = project_2d(embed_instructions(texts, model), seed=seed)
    categories = [c if c else "untagged" for c in stats.sample_categories]
    order = [v for v, _ in sorted(((c, categories.count(c)) for c in set(categories)), key=lambda kv: -kv[1])]
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    fig, (ax,) = _figure(1, width=8.5, height=6.0)
    for i, category in enumerate(order):
        mask = np.array([c == category for c in categories])
        ax.scatter(points[mask, 0], points[mask, 1], s=9, alpha=0.75, color=cmap(i % 20), label=f"{category} ({mask.sum()})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(
        f"Instructions in embedding space ({method} of all-MiniLM-L6-v2), {len(texts):,} of {stats.rows:,} rows",
        fontsize=11,
    )
    if order != ["untagged"]:
        ax.legend(fontsize=8, markerscale=2, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    _save(fig, path)
    return method


def write_plots(stats: DatasetStats, folder: str | os.PathLike, *, embedding_map: bool = True, embedding_model=None, seed: int = 0) -> list[Plot]:
    """Write every plot the columns allow under ``folder/plots/`` and return them in card order.

    ``folder`` is the dataset folder (plots go to its ``plots/`` subfolder).
    """
    root = Path(folder)
    for stale in (root / "plots").glob("*.png"):  # a rewritten folder never keeps plots of an older run
        stale.unlink()
    plots: list[Plot] = []
    if plot_distributions(stats, root / "plots" / "distributions.png"):
        plots.append(Plot("plots/distributions.png", "Tag distributions", "Share of rows per value of each tag."))
    if plot_numeric(stats, ["instruction_length", "response_length"], root / "plots" / "lengths.png", "Lengths", log_x=True):
        plots.append(Plot("plots/lengths.png", "Instruction and response lengths", "Characters per instruction and per response."))
    if plot_numeric(stats, ["instruct_reward", "reward_difference", "min_neighbor_distance"], root / "plots" / "scores.png", "Scores"):
        plots.append(Plot("plots/scores.png", "Rewards and neighbour distances", "Reward-model scores and nearest-neighbour distances."))
    if embedding_map:
        try:
            method = plot_instruction_map(stats, root / "plots" / "instruction_map.png", model=embedding_model, seed=seed)
        except Exception as err:  # e.g. the embedded embedding model is not installed: the other plots stay
            logger.warning("Instruction map skipped: %s", err)
            method = None
        if method:
            plots.append(
                Plot(
                    "plots/instruction_map.png",
                    "Map of the instructions",
                    f"A {method} projection of instruction embeddings (all-MiniLM-L6-v2), coloured by task category; "
                    "nearby points are similar instructions.",
                )
            )
    return plots
