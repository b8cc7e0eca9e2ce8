"""xgrammar against llguidance for the transformers engine's constrained decoding, side by side, in one run:
the judges' JSON schemas and the guard's verdict regexes, on the embedded SmolLM2 tokenizer.

    python bench/grammar_backends.py --walks 20          # needs both xgrammar and llguidance installed

Both get the same grammar settings: compact JSON (no free whitespace, separators "," and ":", no property the
schema does not list: xgrammar's strict mode, llguidance's ``additionalProperties: false``), a regex as a full
match. Three measurements:

- **correctness**: hand-written answers (valid compact JSON, the same with spaces, an extra key, a label outside
  the enum, an over-long field, a missing key; guard verdicts in and out of the format) fed token by token to
  each library must be accepted (the stop token allowed after the last token) exactly when Python says so
  (``json.loads`` + compact layout + ``jsonschema``; ``re.fullmatch``). Then ``--walks`` random walks per
  constraint and library (uniform over the allowed tokens, to the stop token): every walk must be valid for
  Python and its text (as the tokenizer splits it) accepted by the *other* library, so both accept the same
  language on what either produces. Also printed: how many walks the other library takes in the walk's own
  token split (llguidance offers only the canonical split where the grammar forces the next bytes, e.g. after
  ``s`` of ``safe`` only ``afe``, so xgrammar's odd splits fail there; that is a narrower token language, not
  a different text language).
- **speed**: tokenizer setup, grammar compile (first matcher) and new-row time, and the per-token mask time
  (one row's bitmask over the vocabulary) over all walks.
- **footprint**: from the installed distributions (``importlib.metadata``): each library's files and those of
  what it requires, recursively, less what magpie-hf's other requirements already pull.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def constraints() -> dict[str, tuple[str, object]]:
    from magpie_hf.steps.judges import Difficulty, InputQuality, TaskCategory
    from magpie_hf.steps.reward import JudgeReward
    from magpie_hf.steps.safety import verdict_regex

    specs: dict[str, tuple[str, object]] = {}
    for cls in (TaskCategory, InputQuality, Difficulty, JudgeReward):
        specs[cls.__name__] = ("json", cls(engine=None).schema())
    for taxonomy in ("llama-guard-2", "llama-guard-3"):
        specs[f"guard {taxonomy}"] = ("regex", verdict_regex(taxonomy))
    return specs


def strict(schema: object) -> object:
    """``additionalProperties: false`` on every object that lists properties and says nothing else (xgrammar's
    strict mode, vLLM's ``disable_additional_properties``): what the library compiles."""
    from magpie_hf.engines.constrained import JSON_GRAMMAR

    return JSON_GRAMMAR.json_schema(schema)


def python_accepts(kind: str, spec: object, text: str) -> bool:
    if kind == "regex":
        return re.fullmatch(spec, text) is not None
    import jsonschema

    try:
        value = json.loads(text)
    except ValueError:
        return False
    if json.dumps(value, separators=(",", ":"), ensure_ascii=False) != text:
        return False  # not the compact layout
    try:
        jsonschema.validate(value, strict(spec))
    except jsonschema.ValidationError:
        return False
    return True


def probes(name: str, kind: str, spec: dict) -> list[str]:
    """Hand-written answers, in and out of the language."""
    if kind == "regex":
        return ["safe", " safe", "\n\nsafe", "unsafe\nS1", "unsafe\nS1,S10", "unsafe\nS14", "unsafe\nS1,S2,S3",
                "Safe", "unsafe", "unsafe\n", "unsafe\nS1,", "   safe", "safe\n", "unsafe\nS0"]
    props = spec["properties"]
    answer = {}
    for key, sub in props.items():
        if "enum" in sub:
            answer[key] = sub["enum"][-1]
        elif sub.get("type") == "array":
            answer[key] = sub["items"]["enum"][:2]
        elif sub.get("type") == "integer":
            answer[key] = sub.get("minimum", 1)
        else:
            answer[key] = "The user asks for a \"short\" answer."
    compact = json.dumps(answer, separators=(",", ":"))
    out = [compact, json.dumps(answer), json.dumps(answer, indent=2), compact[:-1] + ',"extra":"x"}',
           json.dumps({k: answer[k] for k in list(props)[1:]}, separators=(",", ":"))]
    for key, sub in props.items():
        wrong = dict(answer)
        if "enum" in sub:
            wrong[key] = "not a label"
        elif sub.get("type") == "string" and "maxLength" in sub:
            wrong[key] = "x" * (sub["maxLength"] + 1)
            out.append(json.dumps({**answer, key: "y" * sub["maxLength"]}, separators=(",", ":")))
        elif sub.get("type") == "array":
            wrong[key] = sub["items"]["enum"][: sub.get("maxItems", 3) + 1]
            out.append(json.dumps({**answer, key: []}, separators=(",", ":")))
        else:
            continue
        out.append(json.dumps(wrong, separators=(",", ":")))
    return out


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab: int, eos: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(self.info, cache_enabled=False)
        self.vocab = vocab

    def compile(self, kind: str, spec: object):
        if kind == "json":
            return self.compiler.compile_json_schema(json.dumps(spec), any_whitespace=False, separators=(",", ":"))
        return self.compiler.compile_regex(spec)

    def new_row(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def bitmask(self, rows: int):
        return self.xgr.allocate_token_bitmask(rows, self.vocab)

    def fill(self, matcher, bitmask, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, matcher, token: int) -> bool:
        return bool(matcher.accept_token(token))


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, vocab: int, eos: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.torch = llguidance.torch
        self.tokenizer = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=eos)
        self.vocab = vocab

    def compile(self, kind: str, spec: object):
        if kind == "json":
            grammar = self.llg.LLMatcher.grammar_from_json_schema(
                strict(spec), defaults={"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
            )
        else:
            grammar = self.llg.LLMatcher.grammar_from_regex(spec)
        matcher = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def new_row(self, compiled):
        return compiled.deep_copy()

    def bitmask(self, rows: int):
        return self.torch.allocate_token_bitmask(rows, self.vocab)

    def fill(self, matcher, bitmask, row: int) -> None:
        self.torch.fill_next_token_bitmask(matcher, bitmask, row)

    def accept(self, matcher, token: int) -> bool:
        return bool(matcher.consume_token(token))


def allowed_ids(bitmask, vocab: int) -> list[int]:
    import torch

    bits = (bitmask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return torch.nonzero(bits.reshape(-1)[:vocab]).flatten().tolist()


def accepts_tokens(lib, compiled, tokens: list[int], eos: int) -> bool:
    """Every token allowed by the mask and accepted, then the stop token allowed."""
    matcher = lib.new_row(compiled)
    mask = lib.bitmask(1)
    for token in [*tokens, eos]:
        lib.fill(matcher, mask, 0)
        if not (int(mask[0, token // 32]) >> (token % 32)) & 1:
            return False
        if token != eos and not lib.accept(matcher, token):
            return False
    return True


def walk(lib, compiled, eos: int, rng: random.Random, max_steps: int, times: list[float]) -> list[int]:
    matcher = lib.new_row(compiled)
    mask = lib.bitmask(1)
    tokens: list[int] = []
    for _ in range(max_steps):
        start = time.perf_counter()
        lib.fill(matcher, mask, 0)
        times.append(time.perf_counter() - start)
        allowed = allowed_ids(mask, lib.vocab)
        if not allowed:
            raise AssertionError(f"{lib.name}: empty mask after {tokens}")
        token = rng.choice(allowed)
        if token == eos:
            return tokens
        assert lib.accept(matcher, token), (lib.name, tokens, token)
        tokens.append(token)
    raise AssertionError(f"{lib.name}: no stop after {max_steps} tokens")


def closure(names: list[str], skip: set[str] = frozenset()) -> dict[str, int]:
    """Bytes of the installed files of ``names`` and of what they require, recursively (``skip`` not entered)."""
    from importlib import metadata

    seen: dict[str, int] = {}

    def visit(name: str) -> None:
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen or key in skip:
            return
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            return
        seen[key] = sum(os.path.getsize(f.locate()) for f in dist.files or [] if os.path.exists(f.locate()))
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            visit(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])

    for name in names:
        visit(name)
    return seen


def footprint(dist_name: str) -> tuple[int, list[str]]:
    """What installing ``dist_name`` adds to magpie-hf's other requirements: bytes and the distributions."""
    from importlib import metadata

    own = [re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0] for r in metadata.distribution("magpie-hf").requires or []
           if "extra ==" not in r]
    shared = closure([n for n in own if n.lower() not in ("xgrammar", "llguidance")], skip={"xgrammar", "llguidance"})
    added = {k: v for k, v in closure([dist_name]).items() if k not in shared}
    return sum(added.values()), [f"{k} {v / 2**20:.1f} MB" for k, v in sorted(added.items(), key=lambda kv: -kv[1])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--walks", type=int, default=20, help="random walks per constraint and library")
    parser.add_argument("--max-steps", type=int, default=600, help="longest walk, in tokens")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from magpie_hf.utils.embedded import embedded_chat_model

    tok = AutoTokenizer.from_pretrained(*embedded_chat_model()[:1], gguf_file=embedded_chat_model()[1])
    vocab, eos = len(tok), tok.eos_token_id
    libs = []
    for cls in (XGrammar, LLGuidance):
        start = time.perf_counter()
        libs.append(cls(tok, vocab, eos))
        print(f"{cls.name:>10}: tokenizer setup {time.perf_counter() - start:6.3f}s (vocab {vocab})")

    specs = constraints()
    failures = 0
    mask_times = {lib.name: [] for lib in libs}
    for name, (kind, spec) in specs.items():
        compiled = {}
        for lib in libs:
            start = time.perf_counter()
            compiled[lib.name] = lib.compile(kind, spec)
            t_compile = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(100):
                lib.new_row(compiled[lib.name])
            t_row = (time.perf_counter() - start) / 100
            print(f"{name:>20} {lib.name:>10}: compile {t_compile * 1e3:7.1f} ms, new row {t_row * 1e6:7.1f} us")
        # hand-written answers
        for text in probes(name, kind, spec):
            expected = python_accepts(kind, spec, text)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            got = {lib.name: accepts_tokens(lib, compiled[lib.name], ids, eos) for lib in libs}
            if any(v != expected for v in got.values()):
                failures += 1
                print(f"  MISMATCH {text!r}: python {expected} {got}")
        # random walks, cross-checked
        rng = random.Random(args.seed)
        walk_lengths, same_split = {}, {lib.name: 0 for lib in libs}
        for lib in libs:
            other = next(o for o in libs if o is not lib)
            lengths = []
            for _ in range(args.walks):
                tokens = walk(lib, compiled[lib.name], eos, rng, args.max_steps, mask_times[lib.name])
                lengths.append(len(tokens))
                text = tok.decode(tokens)
                ok_python = python_accepts(kind, spec, text)
                # the same text, as the tokenizer writes it (the walk's own token split may be one the other
                # library never offers: llguidance allows only the canonical split of bytes the grammar forces)
                canonical = tok(text, add_special_tokens=False)["input_ids"]
                ok_other = accepts_tokens(other, compiled[other.name], canonical, eos)
                same_split[lib.name] += accepts_tokens(other, compiled[other.name], tokens, eos)
                if not (ok_python and ok_other):
                    failures += 1
                    print(f"  WALK of {lib.name} {text!r}: python {ok_python}, {other.name} {ok_other}")
            walk_lengths[lib.name] = statistics.mean(lengths)
        print(f"{name:>20} walks: mean tokens " + ", ".join(f"{k} {v:.0f}" for k, v in walk_lengths.items())
              + "; the other library takes the walk's own token split: "
              + ", ".join(f"{k} {v}/{args.walks}" for k, v in same_split.items()))
    for lib in libs:
        t = sorted(mask_times[lib.name])
        print(f"{lib.name:>10}: per-token mask (one row, {len(t)} masks): mean {statistics.mean(t) * 1e6:7.1f} us, "
              f"median {t[len(t) // 2] * 1e6:7.1f} us, p99 {t[int(len(t) * 0.99)] * 1e6:7.1f} us")
    for dist in ("xgrammar", "llguidance"):
        total, parts = footprint(dist)
        print(f"{dist:>10}: installed with its requirements {total / 2**20:7.1f} MB: {', '.join(parts)}")
    print(f"correctness mismatches: {failures}")


if __name__ == "__main__":
    main()
