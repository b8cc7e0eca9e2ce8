"""Multi-turn Magpie: prompts from the chat template's own rendering, early endings that keep roles
alternating, and a 3-turn run on the embedded model."""

from __future__ import annotations

import copy

import pytest

from magpie_hf.engines import Completion, Engine, EngineConfig
from magpie_hf.errors import ConfigError
from magpie_hf.pipeline import Pipeline
from magpie_hf.steps import MagpieInstructions, Responses
from magpie_hf.steps.multi_turn import MULTI_TURN_SYSTEM_PROMPT, MultiTurn, alternates, turn_columns
from magpie_hf.steps.postprocess import DropSystemPromptEcho
from magpie_hf.templates import PRE_QUERY_OVERRIDES, ChatTemplateError
from tests.conftest import chat_template_fixtures, load_recipe

SENTINEL = "ZqMultiTurnSentinel31"
HISTORY = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


class _Scripted(Engine):
    """A tokenizer plus scripted completions, to drive every early-ending path deterministically.

    The first user message of a prompt names the behaviour; a prompt holding the multi-turn system
    prompt asks for a query, any other prompt for a reply.
    """

    name = "scripted"

    def __init__(self, tokenizer):
        super().__init__(EngineConfig(model="scripted", backend="transformers"))
        self._tok = tokenizer
        self.calls: list[tuple[str, int]] = []

    @property
    def tokenizer(self):
        return self._tok

    def _generate(self, prompts, sampling, seeds, progress):
        outs = []
        kind = "query" if MULTI_TURN_SYSTEM_PROMPT in prompts[0] else "response"
        self.calls.append((kind, len(prompts)))
        for prompt in prompts:
            assert (MULTI_TURN_SYSTEM_PROMPT in prompt) == (kind == "query")  # never mixed within a call
            tag = prompt.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
            turn = prompt.count("<|im_start|>user\n")  # the user turn being written or answered
            text, reason = f"{kind} {turn} of {tag}<|im_end|>", "stop"
            if kind == "query" and turn == 2 and tag == "emptyq":
                text = "   <|im_end|>"
            elif kind == "query" and turn == 2 and tag == "truncq":
                text, reason = "a query that never ends and", "length"
            elif kind == "query" and turn == 2 and tag == "echo":
                text = MULTI_TURN_SYSTEM_PROMPT + "<|im_end|>"
            elif kind == "response" and turn == 2 and tag == "emptyr":
                text = "<|im_end|>"
            elif kind == "response" and turn == 3 and tag == "truncr":
                text, reason = "an answer cut", "length"
            outs.append([Completion(text=text, num_tokens=5, finish_reason=reason)])
        return outs


def _first_turns(tags, finish=None):
    return {
        "instruction": list(tags),
        "response": ["" if t == "empty1" else f"answer 1 of {t}" for t in tags],
        "response_finish_reason": finish or ["stop"] * len(tags),
    }


TAGS = ["ok", "emptyq", "truncq", "echo", "emptyr", "truncr", "cut1", "empty1"]


def test_early_endings_keep_roles_alternating(embedded_tokenizer):
    engine = _Scripted(embedded_tokenizer)
    step = MultiTurn(engine=engine, n_turns=3, postprocess=[DropSystemPromptEcho()])
    step.load()
    batch = _first_turns(TAGS, finish=["length" if t == "cut1" else "stop" for t in TAGS])
    out = step.process(batch, seed=0)
    # one engine call per turn for queries and one for replies
    assert engine.calls == [("query", 6), ("response", 3), ("query", 2), ("response", 2)]
    rows = {tag: {k: v[i] for k, v in out.items()} for i, tag in enumerate(out["instruction"])}
    assert "empty1" not in rows and step.stats["dropped_empty_first_turn"] == 1
    expected = {
        "ok": (3, None), "emptyq": (1, "empty_query@2"), "truncq": (1, "truncated_query@2"),
        "echo": (1, "filtered_system_prompt_echo_query@2"), "emptyr": (1, "empty_response@2"),
        "truncr": (2, "truncated_response@3"), "cut1": (1, "truncated_response@1"),
    }
    for tag, (turns, reason) in expected.items():
        row = rows[tag]
        assert (row["num_turns"], row["multi_turn_end_reason"]) == (turns, reason), tag
        assert len(row["conversations"]) == 2 * turns and alternates(row["conversations"]), tag
    ok = rows["ok"]
    assert [m["content"] for m in ok["conversations"]] == [
        "ok", "answer 1 of ok", "query 2 of ok", "response 2 of ok", "query 3 of ok", "response 3 of ok"
    ]
    assert (ok["instruction_2"], ok["response_2"], ok["instruction_3"]) == ("query 2 of ok", "response 2 of ok", "query 3 of ok")
    assert rows["truncr"]["instruction_3"] is None and rows["emptyr"]["instruction_2"] is None
    assert set(turn_columns(3)) <= set(out) and step.stats["ended_early_empty_query"] == 1


def test_end_with_user_and_min_turns(embedded_tokenizer):
    step = MultiTurn(engine=_Scripted(embedded_tokenizer), n_turns=3, end_with_user=True, min_turns=2)
    step.load()
    out = step.process(_first_turns(["ok", "truncr", "emptyr", "emptyq"]), seed=0)
    assert out["instruction"] == ["ok", "truncr"]  # the others ended with a single user turn
    assert step.stats["dropped_below_min_turns"] == 2
    for conversation, turns, response_3 in zip(out["conversations"], out["num_turns"], out["response_3"]):
        assert turns == 3 and len(conversation) == 5 and conversation[-1]["role"] == "user"
        assert alternates(conversation) and response_3 is None


def _dress(base, fixture):
    """The embedded tokenizer wearing a fixture's chat template and special tokens."""
    tok = copy.deepcopy(base)
    named = {k: fixture[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if fixture.get(k)}
    tokens = fixture.get("format_tokens") or fixture.get("additional_special_tokens") or []
    tok.add_special_tokens({**named, "additional_special_tokens": list(tokens)})
    if not fixture.get("bos_token"):
        tok.bos_token = None
    tok.chat_template = fixture["chat_template"]
    return tok


def _expected_query_prompt(tok, templates, messages):
    """The template's own rendering of ``messages`` + a sentinel user turn, cut at the sentinel (plus the BOS
    text when the tokenizer, not the template, adds it, and the documented pre-query overrides)."""
    rendered = tok.apply_chat_template(messages + [{"role": "user", "content": SENTINEL}], tokenize=False)
    expected = rendered.split(SENTINEL)[0]
    if templates.add_bos_text and tok.bos_token and not expected.startswith(tok.bos_token):
        expected = tok.bos_token + expected
    for override in PRE_QUERY_OVERRIDES:
        expected = override.apply(expected) or expected
    return expected


@pytest.mark.parametrize("name", sorted(chat_template_fixtures()))
def test_turn_2_query_prompt_is_the_templates_own_rendering(embedded_tokenizer, name):
    fixture = chat_template_fixtures()[name]
    tok = _dress(embedded_tokenizer, fixture)
    engine = _Scripted(tok)
    step = MultiTurn(engine=engine, n_turns=2)
    try:
        step.load()
    except ChatTemplateError as err:  # no system role (Gemma): clear error, and the plain rendering works
        assert "mt_system_prompt=None" in str(err)
        step = MultiTurn(engine=engine, n_turns=2, mt_system_prompt=None)
        step.load()
    system = [] if step.mt_system_prompt is None else [{"role": "system", "content": step.mt_system_prompt}]
    prompt = step.query_prompt(HISTORY)
    assert prompt == _expected_query_prompt(tok, step._templates, system + HISTORY)
    assert prompt.count("Paris.") == 1 and not prompt.rstrip().endswith("Paris.")
    # replies use the normal template, without the multi-turn system prompt
    reply_prompt = step.response_prompt(HISTORY + [{"role": "user", "content": "And of Spain?"}])
    assert MULTI_TURN_SYSTEM_PROMPT not in reply_prompt and "And of Spain?" in reply_prompt
    # and without one, the prompt is the plain rendering of the history
    plain = MultiTurn(engine=engine, n_turns=2, mt_system_prompt=None)
    plain.load()
    assert plain.query_prompt(HISTORY) == _expected_query_prompt(tok, plain._templates, list(HISTORY))


@pytest.mark.slow
def test_three_turns_on_the_embedded_model(embedded_engine, tmp_path):
    """>= 50 conversations of up to 3 turns: roles always alternate, no empty message."""
    engine = embedded_engine
    rows = 52
    chain = (
        MagpieInstructions(engine=engine, num_rows=rows, max_tokens=24, drop_truncated=False, seed=5)
        >> Responses(engine=engine, max_tokens=24)
        >> MultiTurn(engine=engine, n_turns=3, query_max_tokens=24, max_tokens=24, end_on_truncated=False, batch_size=rows)
    )
    dataset = Pipeline(chain, tmp_path, shard_size=rows, seed=5, progress=False).run()
    assert len(dataset) >= 50
    turns = dataset["num_turns"]
    for row in dataset:
        conversation = row["conversations"]
        assert alternates(conversation), conversation
        assert len(conversation) == 2 * row["num_turns"]
        assert conversation[0]["content"] == row["instruction"] and conversation[1]["content"] == row["response"]
        if row["num_turns"] >= 2:
            assert (conversation[2]["content"], conversation[3]["content"]) == (row["instruction_2"], row["response_2"])
    assert sum(t == 3 for t in turns) >= 25, turns


def test_language_steers_the_follow_up_queries(tmp_path):
    from magpie_hf.prompts.languages import language_system_prompt
    from magpie_hf.recipe import multi_turn_step, parse_recipe

    mt = load_recipe("magpie_mt")

    def step(*flags):
        return multi_turn_step(parse_recipe(mt.PRO_MT, ["--preset", "cpu", "--output-dir", str(tmp_path), *flags]))

    assert step().mt_system_prompt == MULTI_TURN_SYSTEM_PROMPT
    german = step("--language", "de").mt_system_prompt
    assert german == f"{MULTI_TURN_SYSTEM_PROMPT}\n\n{language_system_prompt('de')}"
    assert step("--language", "de", "--mt_system_prompt", "none").mt_system_prompt is None  # the user's choice stands
    own = "Der Nutzer schreibt immer auf Koreanisch."  # a language without a built-in prompt brings its own
    assert step("--language", "ko", "--system_prompt", own).mt_system_prompt.endswith(own)
    with pytest.raises(ConfigError, match="--min_turns"):
        step("--n_turns", "2", "--min_turns", "3")
    with pytest.raises(ConfigError, match="one model writes every turn"):
        step("--response_model", "someone/else")
    sampled = step("--response_temperature", "0.7", "--response_top_p", "0.9")
    assert (sampled.temperature, sampled.top_p) == (0.7, 0.9)  # later replies are sampled as turn 1's
