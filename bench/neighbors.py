"""Benchmark the neighbour step against exact search and the official Magpie method.

Data: ``--rows`` synthetic unit vectors of dimension 384 (all-MiniLM-L6-v2's size; embedding 200K
real texts on a 2-core CPU would take hours), built like sentence embeddings: rows scattered around
topic centroids, plus planted near-duplicate clusters of 2-5 rows (squared distance < 0.05, a third
of them exact copies) and one heavy cluster of 500 identical rows ("hi" asked 500 times).

Methods, each in its own subprocess so peak memory (``ru_maxrss`` minus the RSS after loading the
data) is its own:

- ``ours``: :func:`magpie_hf.steps.neighbors.find_neighbors` (IVF-Flat with calibrated nprobe).
- ``exact``: a flat index, nearest neighbour + range search for repeat counts, run on a sample of
  query rows and extrapolated linearly to all rows (it is the ground truth for the sample).
- ``official``: ``datasets.Dataset.add_faiss_index`` + ``search_batch(k=500)`` in batches of 1024,
  as ``exp/gen_dis.py`` does, run on a sample of query batches and extrapolated linearly.

Embedding time is the same for every method and is not included.

    timeout 900 python bench/neighbors.py --rows 200000

Last line: ``recall@1=R speedup_vs_official=S repeat_agreement=A``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 384
THRESHOLD = 0.05


def make_data(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around topic centroids with planted near-duplicate clusters; labels -1 = singleton."""
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((max(1, rows // 100), DIM)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    x = np.empty((rows, DIM), dtype=np.float32)
    for start in range(0, rows, 50_000):
        stop = min(rows, start + 50_000)
        t = rng.integers(0, len(topics), stop - start)
        spread = rng.uniform(0.8, 1.4, (stop - start, 1)).astype(np.float32)  # cosine to topic ~0.6-0.8
        x[start:stop] = topics[t] + spread * rng.standard_normal((stop - start, DIM)).astype(np.float32) / np.sqrt(DIM)
    labels = np.full(rows, -1, dtype=np.int64)
    heavy = min(500, rows // 20)
    x[:heavy] = x[heavy]
    labels[: heavy + 1] = 0
    # 5% of rows become members of clusters of 2-5 around another row
    position, cluster = heavy + 1, 1
    perm = rng.permutation(np.arange(position, rows))
    budget = int(0.05 * rows)
    i = 0
    while i + 5 < budget:
        size = int(rng.integers(2, 6))
        members = perm[i : i + size]
        seed_row = x[members[0]] / np.linalg.norm(x[members[0]])
        exact = rng.random() < 1 / 3
        for m in members[1:]:
            eta = 0.0 if exact else rng.uniform(0.02, 0.11)  # squared distance ~ eta^2 + eta'^2 < 0.05
            x[m] = seed_row + eta * rng.standard_normal(DIM).astype(np.float32) / np.sqrt(DIM)
        x[members[0]] = seed_row
        labels[members] = cluster
        cluster += 1
        i += size
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_method(method: str, data: Path, queries: Path, out: Path, threads: int) -> dict:
    import faiss

    faiss.omp_set_num_threads(threads)
    x = np.load(data)
    q_rows = np.load(queries)
    base = rss_bytes()
    t0 = time.perf_counter()
    result: dict = {"method": method}
    if method == "ours":
        from magpie_hf.steps.neighbors import find_neighbors

        r = find_neighbors(x, progress=False)
        result["seconds"] = time.perf_counter() - t0
        result["info"] = r.info
        np.savez(out, min_distance=r.min_distance[q_rows], repeat_count=r.repeat_count[q_rows])
    elif method == "exact":
        index = faiss.IndexFlatL2(DIM)
        index.add(x)
        build = time.perf_counter() - t0
        t1 = time.perf_counter()
        D, I = index.search(x[q_rows], 2)
        lims, _, RI = index.range_search(x[q_rows], THRESHOLD)
        sample = time.perf_counter() - t1
        valid = I != q_rows[:, None]
        first = np.argmax(valid, axis=1)
        dist = D[np.arange(len(q_rows)), first]
        owner = np.repeat(q_rows, np.diff(lims).astype(np.int64))
        counts = np.bincount(np.repeat(np.arange(len(q_rows)), np.diff(lims).astype(np.int64))[RI != owner],
                             minlength=len(q_rows))
        np.savez(out, min_distance=np.where(dist < 1e-6, 0, dist), repeat_count=counts)
        result.update(build=build, sample_seconds=sample, sample_rows=len(q_rows),
                      seconds=build + sample * len(x) / len(q_rows))
    elif method == "official":
        import datasets
        import pyarrow as pa

        ds = datasets.Dataset(datasets.table.InMemoryTable(
            pa.table({"embeddings": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), DIM)})))
        t0 = time.perf_counter()  # the official script also pays embeddings.tolist() + add_column: not counted
        ds.add_faiss_index(column="embeddings")
        build = time.perf_counter() - t0
        t1 = time.perf_counter()
        for start in range(0, len(q_rows), 1024):
            batch = x[q_rows[start : start + 1024]]
            res = ds.search_batch(index_name="embeddings", queries=batch, k=500)
            _ = [float(s[1]) for s in res.total_scores]  # min distance as the official script reads it
        sample = time.perf_counter() - t1
        result.update(build=build, sample_seconds=sample, sample_rows=len(q_rows),
                      seconds=build + sample * len(x) / len(q_rows))
    result["peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--sample", type=int, default=4000, help="random rows evaluated exactly")
    parser.add_argument("--official-queries", type=int, default=2048, help="query rows timed for the official method")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--queries", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:  # child process
        print(json.dumps(run_method(args.method, Path(args.data), Path(args.queries), Path(args.out), args.threads)))
        return

    rng = np.random.default_rng(args.seed + 1)
    t = time.perf_counter()
    x, labels = make_data(args.rows, args.seed)
    planted = np.flatnonzero(labels >= 0)
    print(f"data: {args.rows} x {DIM} synthetic unit vectors, {len(planted)} rows in planted near-duplicate "
          f"clusters ({time.perf_counter() - t:.1f}s to make)")
    random_rows = rng.choice(args.rows, size=min(args.sample, args.rows), replace=False)
    planted_rows = rng.choice(planted, size=min(args.sample // 2, len(planted)), replace=False)
    eval_rows = np.unique(np.concatenate([random_rows, planted_rows]))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.save(tmp / "x.npy", x)
        del x
        np.save(tmp / "eval.npy", eval_rows)
        np.save(tmp / "official.npy", np.sort(rng.choice(args.rows, size=min(args.official_queries, args.rows),
                                                          replace=False)))
        results = {}
        for method in ("ours", "exact", "official"):
            queries = tmp / ("official.npy" if method == "official" else "eval.npy")
            cmd = [sys.executable, __file__, "--method", method, "--data", str(tmp / "x.npy"), "--queries",
                   str(queries), "--out", str(tmp / f"{method}.npz"), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[method]
            extra = (f" (measured on {r['sample_rows']} query rows in {r['sample_seconds']:.1f}s + build "
                     f"{r['build']:.1f}s, EXTRAPOLATED linearly to {args.rows} rows)" if "sample_rows" in r else "")
            print(f"{method:>8}: {r['seconds']:8.1f}s  peak +{r['peak_mib']:7.0f} MiB{extra}")
            if method == "ours":
                print(f"          index {r['info'].get('index')}, nprobe {r['info'].get('nprobe')}, calibration "
                      f"recall@1 {r['info'].get('calibration_recall@1')}, range-searched rows "
                      f"{r['info'].get('range_searched_rows')}")
        ours, exact = np.load(tmp / "ours.npz"), np.load(tmp / "exact.npz")
    hit = ours["min_distance"] <= exact["min_distance"] + 1e-5
    same = ours["repeat_count"] == exact["repeat_count"]
    in_random, in_planted = np.isin(eval_rows, random_rows), np.isin(eval_rows, planted_rows)
    for name, mask in [("random rows", in_random), ("planted rows", in_planted)]:
        print(f"{name:>14}: n={mask.sum()}  recall@1={hit[mask].mean():.4f}  repeat_agreement={same[mask].mean():.4f}")
    speedup = results["official"]["seconds"] / results["ours"]["seconds"]
    print(f"exact vs ours speedup {results['exact']['seconds'] / results['ours']['seconds']:.1f}x "
          f"(evaluated on {len(eval_rows)} rows: random sample + planted-cluster sample)")
    print(f"recall@1={hit.mean():.4f} speedup_vs_official={speedup:.1f} repeat_agreement={same.mean():.4f}")


if __name__ == "__main__":
    main()
