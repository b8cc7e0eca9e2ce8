"""Generated tokens/s of Magpie step 1, in one run, on the same model, prompts, sampling and rows:

(a) our pipeline end to end (``MagpieInstructions`` through ``Pipeline``, transformers engine),
(b) a plain batched ``model.generate`` loop over the same pre-query prompt and batch size,
(c) distilabel's ``MagpieGenerator`` with its ``TransformersLLM`` (skipped if distilabel is missing).

distilabel's TransformersLLM cannot load GGUF, so the embedded SmolLM2-135M-Instruct GGUF is
dequantized once and saved to a temporary folder that all three load. (a) and (b) alternate
``--rounds`` times so a busy machine slows both alike; tokens are counted with the model's tokenizer
up to the end-of-turn token. The last line is ``pipeline/generate=R1 pipeline/distilabel=R2``.

Run:  python bench/generation.py --rows 64 --max-tokens 128
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from _timing import TokenTimer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def save_dequantized(target: Path) -> Path:
    """The embedded GGUF model saved as a plain transformers folder (fp32 safetensors)."""
    from magpie_hf.utils.embedded import dequantize_gguf, embedded_chat_model

    return dequantize_gguf(*embedded_chat_model(), target)


def run_pipeline(config, rows: int, max_tokens: int, out_dir: Path, seed: int) -> int:
    from magpie_hf.pipeline import Pipeline
    from magpie_hf.steps import MagpieInstructions

    step = MagpieInstructions(engine=config, num_rows=rows, max_tokens=max_tokens, drop_empty=False, drop_truncated=False)
    dataset = Pipeline([step], out_dir, shard_size=rows, seed=seed, progress=False).run()
    return int(sum(dataset["instruction_num_tokens"]))


def run_generate(model, tokenizer, pre_query: str, stop_ids: list[int], rows: int, batch_size: int, max_tokens: int, seed: int) -> int:
    import torch

    torch.manual_seed(seed)
    total = 0
    for start in range(0, rows, batch_size):
        count = min(batch_size, rows - start)
        enc = tokenizer([pre_query] * count, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(
                **enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_tokens,
                eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
            )
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            total += next((i for i, t in enumerate(row) if t in stop_ids), len(row))
    return total


def run_distilabel(model_path: str, pre_query: str, tokenizer, rows: int, batch_size: int, max_tokens: int) -> int:
    from distilabel.models.llms import TransformersLLM
    from distilabel.steps.tasks import MagpieGenerator

    llm = TransformersLLM(
        model=model_path, device="cpu", use_magpie_template=True, magpie_pre_query_template=pre_query,
        generation_kwargs={"max_new_tokens": max_tokens, "temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.0},
    )
    generator = MagpieGenerator(llm=llm, num_rows=rows, batch_size=batch_size, only_instruction=True)
    generator.load()
    total = 0
    for batch, _last in generator.process():
        total += sum(len(tokenizer(r["instruction"] or "", add_special_tokens=False)["input_ids"]) for r in batch)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of (a) and (b)")
    parser.add_argument("--skip-distilabel", action="store_true")
    args = parser.parse_args()

    from magpie_hf.engines import EngineConfig, load_engine
    from magpie_hf.templates import derive_templates

    work = Path(tempfile.mkdtemp(prefix="magpie_bench_"))
    print(f"saving the dequantized embedded model to {work / 'model'}", flush=True)
    model_path = save_dequantized(work / "model")
    config = EngineConfig(model=str(model_path), backend="transformers", batch_size=args.batch_size)
    engine = load_engine(config)
    tokenizer, model = engine.tokenizer, engine.model
    templates = derive_templates(tokenizer)
    pre_query = templates.pre_query
    stop_ids = sorted({*templates.stop_token_ids, tokenizer.eos_token_id})
    print(f"pre-query template {pre_query!r}; stop ids {stop_ids}", flush=True)

    timer = TokenTimer("pipeline", "generate", "distilabel")
    timed = timer.run

    for r in range(args.rounds):
        a = ("pipeline", lambda r=r: run_pipeline(config, args.rows, args.max_tokens, work / f"run{r}", seed=r))
        b = ("generate", lambda r=r: run_generate(model, tokenizer, pre_query, stop_ids, args.rows, args.batch_size, args.max_tokens, seed=r))
        for name, fn in (a, b) if r % 2 == 0 else (b, a):
            timed(name, fn)
    if not args.skip_distilabel:
        timed("distilabel", lambda: run_distilabel(str(model_path), pre_query, tokenizer, args.rows, args.batch_size, args.max_tokens))

    rate = timer.rates()
    print(f"pipeline/generate={rate['pipeline'] / rate['generate']:.2f} pipeline/distilabel={rate['pipeline'] / rate['distilabel']:.2f}")


if __name__ == "__main__":
    main()
