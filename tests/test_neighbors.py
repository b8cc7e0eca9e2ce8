"""Minimum-neighbour distance, repeat counts and near-duplicate clusters."""

from __future__ import annotations

import math

import numpy as np
import pytest

from magpie_hf.steps.neighbors import Neighbors, find_neighbors


def unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def random_unit(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).normal(size=(n, d)))


def planted(n_singletons: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random far-apart rows plus clusters: 3 exact copies, a near pair, a 3-chain, 12 copies."""
    x = random_unit(n_singletons, d=32, seed=seed)
    base = random_unit(4, d=32, seed=seed + 1)
    angle = 0.2  # squared distance 2 - 2 cos(0.2) = 0.0399 < 0.05; two steps apart: 0.158 > 0.05
    helper = random_unit(1, d=32, seed=seed + 3)[0]
    helper = helper - (helper @ base[2]) * base[2]
    helper /= np.linalg.norm(helper)
    chain = [np.cos(i * angle) * base[2] + np.sin(i * angle) * helper for i in range(3)]
    near = unit(base[1:2] + 0.05 * random_unit(1, d=32, seed=seed + 2))[0]
    extra = np.vstack([base[0]] * 3 + [base[1], near] + chain + [base[3]] * 12)
    labels = np.array([0] * 3 + [1] * 2 + [2] * 3 + [3] * 12)
    return np.vstack([x, unit(extra)]), np.concatenate([np.full(n_singletons, -1), labels])


def test_exact_duplicates_tie_at_zero_and_self_is_excluded_by_index():
    x = unit(np.eye(4)[[2, 0, 2, 1, 2]])
    r = find_neighbors(x, progress=False)
    assert r.min_distance.tolist() == [0.0, 2.0, 0.0, 2.0, 0.0]
    assert r.repeat_count.tolist() == [2, 0, 2, 0, 2]
    assert r.cluster.tolist() == [0, 1, 0, 3, 0]
    assert r.nearest[0] in (2, 4) and r.nearest[2] in (0, 4)


def test_single_row_has_no_neighbour():
    r = find_neighbors(random_unit(1), progress=False)
    assert math.isnan(r.min_distance[0]) and r.repeat_count[0] == 0 and r.cluster[0] == 0


def test_clusters_chains_and_counts_against_brute_force():
    x, labels = planted()
    r = find_neighbors(x, k=4, progress=False)
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    np.testing.assert_allclose(r.min_distance, np.where(d2.min(1) < 1e-6, 0, d2.min(1)), atol=1e-5)
    np.testing.assert_array_equal(r.repeat_count, (d2 < 0.05).sum(1))
    for label, size in [(0, 3), (1, 2), (2, 3), (3, 12)]:
        members = np.flatnonzero(labels == label)
        assert (r.cluster[members] == members.min()).all(), label
        assert len(members) == size
    chain = np.flatnonzero(labels == 2)
    assert r.repeat_count[chain].tolist() == [1, 2, 1]  # the ends are not repeats of each other...
    assert len(set(r.cluster[chain])) == 1  # ...but one cluster
    heavy = np.flatnonzero(labels == 3)
    assert (r.repeat_count[heavy] == 11).all() and r.info["range_searched_rows"] >= 12  # k=4 < 11: range search
    singletons = np.flatnonzero(labels == -1)
    assert (r.cluster[singletons] == singletons).all()


def test_clusters_do_not_depend_on_row_order():
    x, labels = planted(seed=3)
    perm = np.random.default_rng(7).permutation(len(x))
    a = find_neighbors(x, k=2, progress=False)
    b = find_neighbors(x[perm], k=2, progress=False)
    # the cluster representative is the first member in the *current* order
    for label in range(4):
        members = np.flatnonzero(labels[perm] == label)
        assert (b.cluster[members] == members.min()).all()
    np.testing.assert_array_equal(a.repeat_count[perm], b.repeat_count)
    np.testing.assert_allclose(a.min_distance[perm], b.min_distance, atol=1e-6)


def test_ivf_path_matches_exact_on_clusters():
    x, labels = planted(n_singletons=3000, seed=5)
    exact = find_neighbors(x, k=4, progress=False)
    approx = find_neighbors(x, k=4, exact_max_rows=1000, progress=False)
    assert approx.info["index"].startswith("IVF") and approx.info["calibration_recall@1"] >= 0.99
    np.testing.assert_array_equal(approx.repeat_count, exact.repeat_count)
    np.testing.assert_array_equal(approx.cluster, exact.cluster)
    assert np.mean(approx.min_distance <= exact.min_distance + 1e-5) >= 0.99


def test_rejects_bad_embeddings():
    with pytest.raises(ValueError, match="unit-norm"):
        find_neighbors(np.ones((3, 4), dtype=np.float32), progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        find_neighbors(np.zeros((0, 4), dtype=np.float32), progress=False)


@pytest.fixture(scope="module")
def minilm():
    import torch

    torch.set_num_threads(1)
    step = Neighbors.embedded(keep_embeddings=True)
    step.load()
    return step


def test_minilm_paraphrases_are_nearest_neighbours_and_duplicates_dedupe(minilm):
    import datasets

    texts = [
        "How do I bake sourdough bread at home?",
        "Write a poem about the ocean at night.",
        "What is the capital of Australia?",
        "What's the best way to make sourdough bread in my own kitchen?",
        "Compose a short poem describing the sea after dark.",
        "Which city is Australia's capital?",
        "What is the capital of Australia?",
        None,
    ]
    ds = datasets.Dataset.from_dict({"conversation_id": [f"c{i}" for i in range(len(texts))], "instruction": texts})
    out = minilm.process_dataset(ds.select(range(len(texts))), seed=0)
    assert set(minilm.outputs) <= set(out.column_names) and len(out) == len(ds)
    emb = np.asarray(out["embedding"][:7], dtype=np.float32)
    d2 = ((emb[:, None] - emb[None]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    nearest = d2.argmin(1)
    for a, b in [(0, 3), (1, 4)]:
        assert nearest[a] == b and nearest[b] == a
    assert nearest[5] in (2, 6)
    dist = out["min_neighbor_distance"]
    assert dist[2] == 0.0 and dist[6] == 0.0 and dist[0] > 0.0
    np.testing.assert_allclose(dist[0], d2[0].min(), atol=1e-5)
    assert out["repeat_count"][2] == 1 and out["repeat_count"][6] == 1
    assert out["min_similar_conversation_id"][6] == "c2" and out["min_similar_conversation_id"][0] == "c0"
    assert dist[7] is None and out["min_similar_conversation_id"][7] is None  # null text: null outputs
    assert minilm.stats["null_text"] == 1


def test_missing_column_is_a_clear_error(minilm):
    import datasets

    with pytest.raises(ValueError, match="needs columns \\['conversation_id'\\]"):
        minilm.check_inputs(datasets.Dataset.from_dict({"instruction": ["hi"]}).column_names)
