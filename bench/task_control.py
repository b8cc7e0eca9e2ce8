"""Does a task system prompt steer Magpie instructions? Share of math queries with and without the math prompt.

    python bench/task_control.py --rows 100 --max-tokens 32      # embedded SmolLM2-135M-Instruct, CPU

Classifier: :func:`magpie_hf.prompts.tasks.looks_like_math` (digits joined by an operator, a variable with
a power or equals sign, LaTeX, or a math word such as solve/equation/calculate/probability/how many).
Every sampled query counts (length-cut ones too: the classifier reads the opening words).
"""

from __future__ import annotations

import argparse
import json
import time

from magpie_hf.engines import EngineConfig, load_engine
from magpie_hf.prompts.tasks import looks_like_math
from magpie_hf.steps.task_control import TaskControlledInstructions


def math_share(engine, task, rows: int, max_tokens: int, seed: int) -> tuple[float, int, list[str]]:
    step = TaskControlledInstructions(engine=engine, num_rows=rows, max_tokens=max_tokens, task=task,
                                      drop_truncated=False, seed=seed)
    step.load()
    batch = step.generate(offset=0, num_rows=rows, seed=seed)
    texts = batch["instruction"]
    return sum(map(looks_like_math, texts)) / max(1, len(texts)), len(texts), texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the result (and sample queries) here")
    args = parser.parse_args()
    engine = load_engine(EngineConfig.embedded(batch_size=args.rows))
    result = {}
    for label, task in (("no task prompt", None), ("math prompt", "math")):
        started = time.perf_counter()
        share, n, texts = math_share(engine, task, args.rows, args.max_tokens, args.seed)
        result[label] = {"rows": n, "math_share": round(share, 3), "seconds": round(time.perf_counter() - started, 1),
                         "examples": texts[:5]}
        print(f"{label:>15}: {share:.1%} math of {n} queries ({result[label]['seconds']} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
