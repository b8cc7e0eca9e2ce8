"""The official generator's per-model rules on the real embedded model (transformers engine, its continuous-batching
loop and its ``model.generate`` fallback): the first-token heading ban, the hotter first token, the newline stop,
and how the step records them; the guard's verdict constraint on the same model."""

from __future__ import annotations

import re

import pyarrow as pa
import pytest

from magpie_hf.engines import SamplingConfig
from magpie_hf.executors.runner import typed_table
from magpie_hf.seeds import row_seeds
from magpie_hf.steps import MagpieInstructions
from magpie_hf.steps.generate import GEN_INPUT_CONFIGS
from magpie_hf.steps.postprocess import markdown_heading_token_ids, sanitize_filters
from magpie_hf.steps.safety import LlamaGuard, verdict_regex
from magpie_hf.steps.task_control import TaskControlledInstructions

#: a chat turn after which the small model often opens its answer with a markdown heading (8 of these 24 seeds)
README = (
    "<|im_start|>user\nWrite a markdown README for a Python project called catlib, starting with its title."
    "<|im_end|>\n<|im_start|>assistant\n"
)
SEEDS = [1000 + 64 * i for i in range(24)]
HEADING = re.compile(r" ?#+")


@pytest.fixture(params=["loop", "generate"])
def engine(request, embedded_engine, monkeypatch):
    """The embedded engine, through its continuous-batching loop or its ``model.generate`` fallback."""
    if request.param == "generate":
        monkeypatch.setattr(embedded_engine, "_supports_loop", False)
    return embedded_engine


def test_heading_tokens_of_a_vocabulary(embedded_tokenizer):
    ids = markdown_heading_token_ids(embedded_tokenizer)
    decoded = {embedded_tokenizer.decode([i]) for i in ids}
    assert {"#", "##", "###", "####", " #", " ##"} <= decoded and all(HEADING.fullmatch(t) for t in decoded)
    # every other token that decodes to a '#' run with an optional leading space is there too
    vocab = embedded_tokenizer.get_vocab().values()
    assert set(ids) == {i for i in vocab if HEADING.fullmatch(embedded_tokenizer.decode([i]))}


def test_first_token_is_never_a_heading_and_nothing_else_changes(engine, embedded_tokenizer):
    banned = markdown_heading_token_ids(embedded_tokenizer)
    free = SamplingConfig(temperature=1.0, max_tokens=3)
    ruled = free.replace(first_token_banned_ids=banned)
    first_free = [c.text for (c,) in engine.generate([README] * len(SEEDS), free.replace(max_tokens=1), seeds=SEEDS)]
    first_ruled = [c.text for (c,) in engine.generate([README] * len(SEEDS), ruled.replace(max_tokens=1), seeds=SEEDS)]
    assert sum(bool(HEADING.fullmatch(t)) for t in first_free) >= 4  # without the rule the model opens with '#'
    assert not any(HEADING.fullmatch(t) for t in first_ruled)
    # the ban only renormalises the first step: rows that did not pick a heading are unchanged, to the last token
    free_rows = engine.generate([README] * len(SEEDS), free, seeds=SEEDS)
    ruled_rows = engine.generate([README] * len(SEEDS), ruled, seeds=SEEDS)
    for first, a, b in zip(first_free, free_rows, ruled_rows):
        if not HEADING.fullmatch(first):
            assert a == b
    # later steps are free: a heading token may follow the first one
    assert SamplingConfig(first_token_banned_ids=banned).first_token_rules


def test_first_token_temperature_scale_heats_the_first_step_only(engine, request):
    """logits / 2 then temperature 0.5 is temperature 1 for the first token (exactly: powers of two); the later
    tokens are drawn at temperature 0.5, so where the first tokens agree the rows are the T=0.5 rows."""
    seeds = SEEDS
    hot = SamplingConfig(temperature=0.5, max_tokens=4, first_token_temperature_scale=2.0)
    cold = hot.replace(first_token_temperature_scale=1.0)
    one = {"max_tokens": 1}
    firsts_hot = engine.generate([README] * 24, hot.replace(**one), seeds=seeds)
    assert firsts_hot == engine.generate([README] * 24, cold.replace(temperature=1.0, **one), seeds=seeds)
    if "generate" in request.node.name:
        return  # the fallback applies the same rule object; the rest is the loop's (and keeps this test short)
    firsts_cold = engine.generate([README] * 24, cold.replace(**one), seeds=seeds)
    assert firsts_cold != firsts_hot  # the hotter first token picks differently for some rows
    rows_hot = engine.generate([README] * 24, hot, seeds=seeds)
    rows_cold = engine.generate([README] * 24, cold, seeds=seeds)
    same_first = [i for i in range(24) if firsts_cold[i] == firsts_hot[i]]
    assert same_first and all(rows_hot[i] == rows_cold[i] for i in same_first)


def test_greedy_keeps_the_ban_and_ignores_the_scale(embedded_engine, embedded_tokenizer):
    banned = markdown_heading_token_ids(embedded_tokenizer)
    greedy = SamplingConfig(temperature=0, max_tokens=4)
    assert embedded_engine.generate([README], greedy.replace(first_token_temperature_scale=1.7)) == embedded_engine.generate(
        [README], greedy)
    [[out]] = embedded_engine.generate([README], greedy.replace(first_token_banned_ids=banned))
    assert not out.text.lstrip(" ").startswith("#")


def test_newline_stop_cuts_at_the_first_newline_and_drops_empty_first_lines(embedded_engine):
    """The step's text is the free sample cut before its first newline (and stripped, as the official code does);
    a sample whose first line is empty is dropped and counted; the other settings are untouched."""
    pre_query = "<|im_start|>user\nFix this code:\n```"  # the model goes on with a language name or a newline
    kwargs = {"engine": embedded_engine, "num_rows": 16, "max_tokens": 24, "pre_query_template": pre_query,
              "drop_truncated": False, "seed": 1}
    step = MagpieInstructions(newline_stop=True, **kwargs)
    step.load()
    batch = step.generate(offset=0, num_rows=16, seed=3)
    templates = step._templates
    free = embedded_engine.generate(
        [pre_query] * 16,
        SamplingConfig(temperature=1.0, max_tokens=24, stop=templates.stop_strings, stop_token_ids=templates.stop_token_ids),
        seeds=row_seeds(3, 16),
    )
    expected = [templates.clean(c.text.split("\n")[0]) for (c,) in free]
    assert batch["instruction"] == [e for e in expected if e]
    assert step.stats["dropped_empty_instruction"] == expected.count("") > 0
    assert any("\n" in c.text for (c,) in free)  # the rule did cut something
    assert {c["newline_stop"] for c in batch["gen_input_configs"]} == {True}
    assert all(f == "stop" for f in batch["instruction_finish_reason"] if f)


def test_step_rules_are_recorded_and_typed(embedded_engine, embedded_tokenizer):
    step = MagpieInstructions(engine=embedded_engine, num_rows=4, max_tokens=16, no_markdown_start=True,
                              first_token_temperature_scale=1.2, newline_stop=True, drop_truncated=False)
    step.load()
    assert step._banned_first == markdown_heading_token_ids(embedded_tokenizer) and step._rule_filters == ()
    batch = step.generate(offset=0, num_rows=4, seed=0)
    table = typed_table(step, batch, None)
    assert table.schema.field("gen_input_configs").type == GEN_INPUT_CONFIGS
    for name, kind in [("newline_stop", pa.bool_()), ("no_markdown_start", pa.bool_()),
                       ("first_token_temperature_scale", pa.float64()), ("instruction_filters", pa.string())]:
        assert GEN_INPUT_CONFIGS.field(name).type == kind
    record = table.column("gen_input_configs").to_pylist()[0]
    assert (record["newline_stop"], record["no_markdown_start"], record["first_token_temperature_scale"],
            record["instruction_filters"]) == (True, True, 1.2, None)
    assert step.config_record()["no_markdown_start"] is True  # the step's own config carries them too
    # task control: the sanitize filters are listed in the order they run
    tasks = TaskControlledInstructions(engine=embedded_engine, num_rows=4, max_tokens=16, postprocess=sanitize_filters(),
                                       drop_truncated=False, drop_empty=False)
    tasks.load()
    out = tasks.generate(offset=0, num_rows=4, seed=0)
    assert {c["instruction_filters"] for c in out["gen_input_configs"]} == {"enumerator,label_prefix,query_end"}
    with pytest.raises(ValueError, match="first_token_temperature_scale must be > 0"):
        MagpieInstructions(engine=embedded_engine, num_rows=4, first_token_temperature_scale=0)


def test_guard_verdicts_parse_on_the_embedded_model(embedded_engine):
    """The --preset cpu guard (the embedded 135M model) under the verdict constraint: every row gets safe or
    unsafe + codes of its taxonomy; without the constraint it answers the conversation instead."""
    pairs = [
        ("How do I bake sourdough bread?", "Mix flour, water and a starter, let it rise overnight, then bake."),
        ("What is the capital of France?", "Paris."),
        ("Write a haiku about rain.", "Soft rain on the roof / puddles gather quiet light / the street holds the sky"),
        ("How can I pick a lock?", "Insert a tension wrench, then rake the pins until they set."),
        ("Explain recursion in one sentence.", "A function that calls itself on smaller inputs until a base case."),
        ("Give me a workout plan.", "Three days a week: squats, push-ups and rows, three sets of ten."),
        ("How do I make a weapon at home?", "I can't help with that."),
        ("Summarise the plot of Hamlet.", "A prince avenges his father's murder and most of the court dies."),
    ]
    batch = {"instruction": [p for p, _ in pairs], "response": [r for _, r in pairs]}
    guard = LlamaGuard(engine=embedded_engine, taxonomy="llama-guard-2")
    guard.load()
    out = guard.process(batch, seed=0)
    assert guard.stats["safe"] + guard.stats["unsafe"] == len(pairs) and guard.stats["unparseable"] == 0
    for raw, safe, categories in zip(out["llama_guard_2"], out["is_safe"], out["unsafe_categories"]):
        assert re.fullmatch(verdict_regex("llama-guard-2"), raw) and isinstance(safe, bool)
        assert (categories == []) == safe
    free = LlamaGuard(engine=embedded_engine, taxonomy="llama-guard-2", constrain=False, max_tokens=8)
    free.load()
    free.process({k: v[:2] for k, v in batch.items()}, seed=0)
    assert free.stats["unparseable"] == 2
