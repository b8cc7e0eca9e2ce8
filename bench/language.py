"""Does a system prompt in the target language steer Magpie step 1 toward it? The share of instructions
lingua tags as the target language, without and with steering, side by side, in one run.

    python bench/language.py --rows 64 --max-tokens 48 --languages de,fr,zh     # embedded SmolLM2-135M-Instruct, CPU

Without steering the model gets the plain pre-query template (the paper's setting); with steering, the
language's system prompt (:data:`magpie_hf.prompts.languages.LANGUAGE_SYSTEM_PROMPTS`, written in that language) goes
into its chat template, as ``--language CODE`` does. The unsteered rows are one sample that every language is
measured on (its prompt does not depend on the target). Sampling: the ``--preset cpu`` step-1 setting
(T=0.9, top_p=0.95), one seed for all conditions. Every non-empty sampled instruction counts, length-cut ones
too (lingua reads what is there). Detection: lingua over all languages in low-accuracy mode, as the
``Language`` step does; it judges the language, not whether the text makes sense (read the examples the
``--json`` file keeps). The last line is ``CODE=SHARE_WITHOUT/SHARE_WITH ...``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def sample(engine, system_prompt: str | None, rows: int, max_tokens: int, seed: int) -> tuple[list[str], int, float]:
    """Instructions of one condition: (texts, generated tokens, seconds)."""
    from magpie_hf.steps.generate import EMBEDDED_MIXTURE, MagpieInstructions

    step = MagpieInstructions(engine=engine, num_rows=rows, max_tokens=max_tokens, mixture=EMBEDDED_MIXTURE,
                              system_prompt=system_prompt, drop_truncated=False, seed=seed)
    step.load()
    started = time.perf_counter()
    batch = step.generate(offset=0, num_rows=rows, seed=seed)
    return batch["instruction"], step.stats["generated_tokens"], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64, help="instructions per condition")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--languages", default="de,fr,zh", help="comma-separated ISO 639-1 codes with a built-in prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the result (and sample instructions) here")
    args = parser.parse_args()

    from magpie_hf.engines import EngineConfig, load_engine
    from magpie_hf.prompts.languages import language_system_prompt
    from magpie_hf.steps.language import Language

    languages = [code.strip() for code in args.languages.split(",") if code.strip()]
    prompts = {code: language_system_prompt(code) for code in languages}
    engine = load_engine(EngineConfig.embedded(batch_size=args.rows))
    detector = Language()
    detector.load()

    def tags(texts: list[str]) -> list[str | None]:
        return detector.process({"instruction": texts}, seed=0)["language"]

    started = time.perf_counter()
    plain, tokens, seconds = sample(engine, None, args.rows, args.max_tokens, args.seed)
    plain_tags = tags(plain)
    print(f"{'no steering':>12}: {len(plain)} instructions, {tokens} tokens in {seconds:.0f} s; languages "
          f"{dict(collections.Counter(plain_tags).most_common(4))}", flush=True)
    result: dict = {"rows": args.rows, "max_tokens": args.max_tokens, "seed": args.seed,
                    "without": {"languages": dict(collections.Counter(plain_tags)), "examples": plain[:5]}, "by_language": {}}
    for code in languages:
        texts, tokens, seconds = sample(engine, prompts[code], args.rows, args.max_tokens, args.seed)
        steered = tags(texts)
        without = sum(t == code for t in plain_tags) / max(1, len(plain_tags))
        with_ = sum(t == code for t in steered) / max(1, len(steered))
        result["by_language"][code] = {"without": round(without, 3), "with": round(with_, 3), "rows_with": len(texts),
                                       "languages_with": dict(collections.Counter(steered)), "examples": texts[:5],
                                       "examples_in_language": [t for t, c in zip(texts, steered) if c == code][:5]}
        print(f"{code:>12}: {without:6.1%} without -> {with_:6.1%} with steering ({len(texts)} instructions, "
              f"{tokens} tokens in {seconds:.0f} s); languages {dict(collections.Counter(steered).most_common(4))}",
              flush=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    try:
        result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    print(f"total {result['seconds']} s, load average {result.get('load_average')}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, ensure_ascii=False)
    print(" ".join(f"{code}={r['without']:.3f}/{r['with']:.3f}" for code, r in result["by_language"].items()))


if __name__ == "__main__":
    main()
