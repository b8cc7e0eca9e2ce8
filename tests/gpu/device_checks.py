"""GPU checks of the transformers engine and the reward scorer (torch + transformers only: no vllm,
datasets or trl). Run by ``tests/gpu/run_device_checks.sh``; writes ``device_checks.json`` to ``--out``.

1. Throughput on CUDA bf16, Magpie step 1 on the embedded SmolLM2-135M-Instruct dequantized to a folder:
   our engine (one request per row with its own seed) vs a plain batched ``model.generate``, same rows,
   batch size and sampling; tokens are counted up to the end-of-turn token.
2. Seeded rows on CUDA: a row drawn alone equals the same row drawn in a batch (fp32, where batched and
   single matmuls agree; bf16 is reported, not asserted).
3. Reward scorer on CUDA: a batch of 8 conversations of very different lengths scores like one at a time
   (fp32, to 1e-3), with a config pad id that differs from the tokenizer's.

Exit status 1 when a check fails; the JSON says which.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: "cuda" on the device machine; ``--device cpu`` dry-runs the script here (small sizes)
DEVICE = "cuda"


def _sync() -> None:
    import torch

    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def dequantized_model(target: Path) -> Path:
    """The embedded GGUF model (or $MAGPIE_DEVICE_MODEL, a folder) as a plain transformers folder."""
    if os.environ.get("MAGPIE_DEVICE_MODEL"):
        return Path(os.environ["MAGPIE_DEVICE_MODEL"])
    from magpie_hf.utils.embedded import dequantize_gguf, embedded_chat_model

    return dequantize_gguf(*embedded_chat_model(), target)


def throughput(model_path: Path, rows: int, max_tokens: int, batch_size: int) -> dict:
    import torch

    from magpie_hf.engines import EngineConfig, SamplingConfig
    from magpie_hf.engines.transformers import TransformersEngine
    from magpie_hf.seeds import row_seeds
    from magpie_hf.templates import derive_templates

    engine = TransformersEngine(EngineConfig(str(model_path), backend="transformers", device=DEVICE, dtype="bfloat16",
                                             batch_size=batch_size))
    tok, model = engine.tokenizer, engine.model
    templates = derive_templates(tok)
    stop_ids = sorted({*templates.stop_token_ids, tok.eos_token_id})
    sampling = SamplingConfig(temperature=1.0, max_tokens=max_tokens, stop=templates.stop_strings,
                              stop_token_ids=templates.stop_token_ids)
    engine.generate([templates.pre_query] * 4, sampling.replace(max_tokens=8), seeds=[0, 64, 128, 192])  # warm-up

    _sync()
    start = time.perf_counter()
    outs = engine.generate([templates.pre_query] * rows, sampling, seeds=row_seeds(1, rows))
    _sync()
    ours_s = time.perf_counter() - start
    ours_tokens = sum(c.num_tokens for (c,) in outs)

    torch.manual_seed(0)
    start = time.perf_counter()
    plain_tokens = 0
    for first in range(0, rows, batch_size):
        count = min(batch_size, rows - first)
        enc = tok([templates.pre_query] * count, return_tensors="pt", padding=True, add_special_tokens=False).to(DEVICE)
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_tokens,
                                 eos_token_id=stop_ids, pad_token_id=tok.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            plain_tokens += next((i for i, t in enumerate(row) if t in stop_ids), len(row))
    _sync()
    plain_s = time.perf_counter() - start
    engine.close()
    return {
        "rows": rows, "max_tokens": max_tokens, "batch_size": batch_size,
        "engine_tokens_per_s": round(ours_tokens / ours_s, 1), "generate_tokens_per_s": round(plain_tokens / plain_s, 1),
        "engine_over_generate": round((ours_tokens / ours_s) / (plain_tokens / plain_s), 3),
        "ok": True,
    }


def seeded_rows(model_path: Path) -> dict:
    from magpie_hf.engines import EngineConfig, SamplingConfig
    from magpie_hf.engines.transformers import TransformersEngine

    prompts = ["<|im_start|>user\n", "Once upon a time", "<|im_start|>user\n", "def f(x):"]
    seeds = [100, 164, 228, 292]
    sampling = SamplingConfig(temperature=1.0, top_p=0.95, max_tokens=24, n=2)
    result = {}
    for dtype in ("float32", "bfloat16"):
        engine = TransformersEngine(EngineConfig(str(model_path), backend="transformers", device=DEVICE, dtype=dtype,
                                                 batch_size=3))
        batched = engine.generate(prompts, sampling, seeds=seeds)
        alone = [engine.generate([p], sampling, seeds=[s])[0] for p, s in zip(prompts, seeds)]
        result[dtype] = sum(a == b for a, b in zip(batched, alone))
        engine.close()
    return {"rows_equal_alone_and_batched": result, "ok": result["float32"] == len(prompts)}


def reward_batch_vs_single(model_path: Path, work: Path) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from magpie_hf.steps.reward import RewardModelScorer

    tok = AutoTokenizer.from_pretrained(model_path)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, num_labels=1,
                         pad_token_id=0 if tok.pad_token_id != 0 else 1)
    torch.manual_seed(0)
    path = work / "tiny_rm"
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    convs = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "answer " * (1 + 40 * i)}]
             for i in range(8)]
    batched = RewardModelScorer(str(path), device=DEVICE, dtype="float32", batch_size=8).score(convs)
    single = RewardModelScorer(str(path), device=DEVICE, dtype="float32", batch_size=1)
    alone = [single.score([c])[0] for c in convs]
    diff = max(abs(a - b) for a, b in zip(batched, alone))
    return {"max_abs_difference": diff, "ok": diff < 1e-3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    import torch

    global DEVICE
    DEVICE = args.device
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="magpie_device_"))
    model_path = dequantized_model(work / "model")
    report: dict = {"device": torch.cuda.get_device_name(0) if DEVICE.startswith("cuda") else DEVICE,
                    "torch": torch.__version__}
    import transformers

    report["transformers"] = transformers.__version__
    for name, check in (
        ("throughput", lambda: throughput(model_path, args.rows, args.max_tokens, args.batch_size)),
        ("seeded_rows", lambda: seeded_rows(model_path)),
        ("reward_batch_vs_single", lambda: reward_batch_vs_single(model_path, work)),
    ):
        try:
            report[name] = check()
        except Exception as err:  # report every check, then fail
            report[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        print(name, json.dumps(report[name]), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "device_checks.json").write_text(json.dumps(report, indent=2))
    return 0 if all(v.get("ok") for v in report.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
