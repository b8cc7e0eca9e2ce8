"""Seeds: one per row, derived from (run seed, stage, row index), never shared by two samples.

Every sample a run draws has its own seed. A stage gets a 31-bit base from the run seed and its
index; row ``r`` of the stage owns the block of :data:`SEEDS_PER_ROW` seeds that starts at
``stage_seed + r * SEEDS_PER_ROW`` (modulo 2**31). A request for ``n`` samples of row ``r`` uses
``row_seed, row_seed + 1, ..., row_seed + n - 1`` (vLLM seeds the ``j``-th child of a request with
``seed + j``), so the seeds of two rows never meet as long as a row asks for at most
``SEEDS_PER_ROW`` samples and a stage has fewer than 2**25 (33.5M) rows.

Steps receive the seed of their batch's first row (``process(batch, seed=s)``,
``generate(offset=o, num_rows=k, seed=s)``); row ``i`` of the batch then owns :func:`row_seed`
``(s, i)``. Because seeds depend only on (run seed, stage, row), a resumed, re-sharded or
distributed run draws the same samples, and one row can be re-drawn alone from the seed recorded
in its provenance.

Example:
    >>> first = row_seed(stage_seed(0, 1), 100)   # the seed of row 100 of stage 1
    >>> row_seeds(first, 3) == [row_seed(first, 0), row_seed(first, 1), row_seed(first, 2)]
    True
    >>> row_seed(first, 1) - row_seed(first, 0) == SEEDS_PER_ROW or row_seed(first, 1) < first
    True
"""

from __future__ import annotations

import hashlib

#: seeds owned by one row: a row may ask for at most this many samples (best-of-n responses,
#: sampled judge ratings, multi-turn follow-ups: turn ``t``'s query uses ``row_seed + 2(t - 2)``, its reply the next)
SEEDS_PER_ROW = 64
#: seeds are kept in 31 bits, which every backend accepts (llama.cpp's server takes a uint32)
SEED_MODULUS = 2**31


def stage_seed(run_seed: int, stage: int) -> int:
    """The 31-bit base seed of stage ``stage`` of a run seeded with ``run_seed``."""
    digest = hashlib.sha256(f"magpie_hf:{run_seed}:{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % SEED_MODULUS


def row_seed(first: int, index: int) -> int:
    """The seed of the row ``index`` rows after the row whose seed is ``first``."""
    return (first + index * SEEDS_PER_ROW) % SEED_MODULUS


def row_seeds(first: int, count: int) -> list[int]:
    """:func:`row_seed` of ``count`` consecutive rows, the first of which has seed ``first``."""
    return [row_seed(first, i) for i in range(count)]


def check_samples_per_row(n: int) -> None:
    """Refuse more samples per row than a row owns seeds."""
    if n > SEEDS_PER_ROW:
        raise ValueError(
            f"A row can draw at most {SEEDS_PER_ROW} samples (it owns that many seeds), asked for {n}. "
            "Lower n / num_samples / num_responses."
        )
