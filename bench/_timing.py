"""Tokens/s bookkeeping shared by the generation benchmarks (``bench/generation.py``, ``bench/vllm_engine.py``)."""

from __future__ import annotations

import time
from typing import Callable


class TokenTimer:
    """Times named runs that return a token count, prints each, and sums them per name."""

    def __init__(self, *names: str) -> None:
        self.totals = {name: [0, 0.0] for name in names}

    def run(self, name: str, fn: Callable[[], int]) -> None:
        start = time.perf_counter()
        tokens = fn()
        seconds = time.perf_counter() - start
        self.totals[name][0] += tokens
        self.totals[name][1] += seconds
        print(f"{name:>12}: {tokens:6d} tokens in {seconds:7.1f}s = {tokens / seconds:7.1f} tokens/s", flush=True)

    def rates(self) -> dict[str, float]:
        """Tokens/s of each name over all its runs (printed on one line too)."""
        rate = {k: (t / s if s else float("nan")) for k, (t, s) in self.totals.items()}
        print(" ".join(f"{k}={v:.1f}tok/s" for k, v in rate.items()))
        return rate
