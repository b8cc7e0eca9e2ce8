"""Chat-template arithmetic on the real chat templates in tests/fixtures/chat_templates (tokenizer only)."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from magpie_hf.templates import (
    PRE_QUERY_OVERRIDES,
    ChatTemplateError,
    ChatTemplates,
    ReasoningMarkers,
    derive_templates,
    encode,
    render_chat,
    tokenizer_adds_bos,
)
from tests.conftest import chat_template_fixtures

FIXTURES = chat_template_fixtures()

# Per fixture: the tokens that are single special tokens in the real tokenizer (the fixtures'
# additional_special_tokens lists are only reliable for Gemma-2 and Llama-3), whether the real tokenizer
# adds BOS when tokenizing, and what must be derived.
EXPECTED: dict[str, dict] = {
    "gemma-2-2b-it": dict(
        specials=["<start_of_turn>", "<end_of_turn>"],
        adds_bos=True,
        pre_query="<bos><start_of_turn>user\n",
        stops=["<end_of_turn>"],
        bos_count=1,
    ),
    "llama-2-7b-chat": dict(
        specials=[],  # '[INST]' is plain text for the Llama-2 tokenizer
        adds_bos=True,
        pre_query="<s>[INST]",  # derived '<s>[INST] ' minus the trailing space (override inst-trailing-space)
        stops=["[/INST]", "</s>"],
        bos_count=1,
        overrides=["inst-trailing-space"],
    ),
    "llama-3-8b-instruct": dict(
        specials=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        adds_bos=True,
        pre_query="<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
        stops=["<|eot_id|>"],
        bos_count=1,
    ),
    "llama-3.1-8b-instruct": dict(
        specials=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"],
        adds_bos=True,
        pre_query=(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n"
        ),
        pre_query_no_default="<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
        stops=["<|eot_id|>"],
        bos_count=1,
    ),
    "mistral-7b-instruct-v0.3": dict(
        specials=["[INST]", "[/INST]"],  # control tokens in the v0.3 tokenizer
        adds_bos=True,
        pre_query="<s>[INST]",
        stops=["[/INST]", "</s>"],
        bos_count=1,
        overrides=["inst-trailing-space"],
    ),
    "phi-3-mini-4k-instruct": dict(
        specials=["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
        adds_bos=True,  # the template writes no BOS; the tokenizer adds it
        pre_query="<s><|user|>\n",
        stops=["<|end|>"],
        bos_count=1,
    ),
    "qwen2-7b-instruct": dict(
        specials=["<|im_start|>", "<|im_end|>"],
        adds_bos=False,
        pre_query="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
        pre_query_no_default="<|im_start|>user\n",
        stops=["<|im_end|>"],
        bos_count=0,
    ),
    "qwen2.5-7b-instruct": dict(
        specials=["<|im_start|>", "<|im_end|>"],
        adds_bos=False,
        pre_query=(
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\n"
        ),
        pre_query_no_default="<|im_start|>user\n",
        stops=["<|im_end|>"],
        bos_count=0,
    ),
    "qwen3-0.6b": dict(
        specials=["<|im_start|>", "<|im_end|>"],
        adds_bos=False,
        pre_query="<|im_start|>user\n",
        stops=["<|im_end|>"],
        bos_count=0,
        reasoning=ReasoningMarkers("<think>", "</think>", opened_by_generation_prompt=False),
    ),
    "yi-1.5-chat": dict(
        specials=["<|im_start|>", "<|im_end|>"],
        adds_bos=True,  # the template writes no BOS; the tokenizer adds it
        pre_query="<|startoftext|><|im_start|>user\n",
        stops=["<|im_end|>"],
        bos_count=1,
    ),
    # today's models; ``specials`` are the fixtures' format_tokens (added tokens of the real tokenizers).
    # A DeepSeek or GLM user turn has no closing marker: it ends where the assistant's role token begins.
    "deepseek-r1-distill-llama-8b": dict(
        specials=FIXTURES["deepseek-r1-distill-llama-8b"]["format_tokens"],
        adds_bos=True,  # the template writes BOS and the tokenizer would add another: once is right
        pre_query="<｜begin▁of▁sentence｜><｜User｜>",
        stops=["<｜Assistant｜>", "<｜end▁of▁sentence｜>"],  # not '<｜Assistant｜><think>': that is the generation prompt
        bos_count=1,
        reasoning=ReasoningMarkers("<think>", "</think>", opened_by_generation_prompt=True),
    ),
    "deepseek-v3.1-terminus": dict(
        specials=FIXTURES["deepseek-v3.1-terminus"]["format_tokens"],
        adds_bos=True,
        pre_query="<｜begin▁of▁sentence｜><｜User｜>",
        stops=["<｜Assistant｜>", "<｜end▁of▁sentence｜>"],  # not '<｜Assistant｜></think>'
        bos_count=1,
        reasoning=ReasoningMarkers("<think>", "</think>", opened_by_generation_prompt=False),  # thinking off by default
    ),
    "gemma-3-1b-it": dict(
        specials=FIXTURES["gemma-3-1b-it"]["format_tokens"],
        adds_bos=True,
        pre_query="<bos><start_of_turn>user\n",
        stops=["<end_of_turn>"],
        bos_count=1,
    ),
    "glm-4-9b-chat": dict(
        specials=FIXTURES["glm-4-9b-chat"]["format_tokens"],
        adds_bos=False,
        pre_query="[gMASK]<sop><|user|>\n",  # [gMASK]<sop> is the format's fixed prefix, not a system block
        stops=["<|assistant|>", "<|user|>"],  # no closing markers: each turn ends where the next role begins
        bos_count=0,
    ),
    "glm-4.6": dict(
        specials=FIXTURES["glm-4.6"]["format_tokens"],
        adds_bos=False,
        pre_query="[gMASK]<sop><|user|>\n",
        stops=["<|assistant|>", "<|user|>"],
        bos_count=0,
        reasoning=ReasoningMarkers("<think>", "</think>", opened_by_generation_prompt=False),
    ),
}

HISTORY = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6."},
]
TEST_SENTINEL = "ZqTestSentinel42"  # independent of the module's own sentinel


def test_every_fixture_has_expectations():
    assert sorted(FIXTURES) == sorted(EXPECTED)


def make_tokenizer(base, name: str, adds_bos: bool | None = None):
    """The embedded SmolLM2 tokenizer dressed as the fixture's model (template, special tokens, add_bos)."""
    fixture, expected = FIXTURES[name], EXPECTED[name]
    tok = copy.deepcopy(base)
    named = {k: fixture[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if fixture.get(k)}
    tok.add_special_tokens({**named, "additional_special_tokens": expected["specials"]})
    if not fixture.get("bos_token"):
        tok.bos_token = None
    tok.chat_template = fixture["chat_template"]
    tok.add_bos_token = expected["adds_bos"] if adds_bos is None else adds_bos
    return tok


def bos_count(tok, text: str) -> int:
    return encode(tok, text).count(tok.bos_token_id) if tok.bos_token_id is not None else 0


def template_cut(tok, messages, bos_text: str) -> str:
    """Independent reference: the template's own rendering of messages + [user: sentinel], cut."""
    rendered = tok.apply_chat_template(
        [*messages, {"role": "user", "content": TEST_SENTINEL}], tokenize=False, add_generation_prompt=False
    )
    cut = rendered[: rendered.index(TEST_SENTINEL)]
    return cut if cut.startswith(bos_text) else bos_text + cut


@pytest.fixture(scope="module")
def base_tokenizer(embedded_tokenizer):
    return embedded_tokenizer


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_pre_query_stops_and_bos(base_tokenizer, name):
    expected = EXPECTED[name]
    tok = make_tokenizer(base_tokenizer, name)
    assert tokenizer_adds_bos(tok) == (expected["adds_bos"] and bool(FIXTURES[name]["bos_token"]))
    t = derive_templates(tok)
    assert t.pre_query == expected["pre_query"]
    assert t.stop_strings == expected["stops"]
    assert t.overrides == expected.get("overrides", [])
    # BOS exactly once at token level (engines tokenize with add_special_tokens=False)
    assert bos_count(tok, t.pre_query) == expected["bos_count"]
    # stop ids: single special-token stops plus eos
    special_stop_ids = [encode(tok, s)[0] for s in expected["stops"] if s in expected["specials"] or s == tok.eos_token]
    assert t.stop_token_ids == list(dict.fromkeys([*special_stop_ids, tok.eos_token_id]))
    assert t.query_prompt([]) == t.pre_query
    assert t.reasoning == expected.get("reasoning")
    record = json.loads(json.dumps(t.to_record()))
    assert record["chat_template_kwargs"] == {} and record["reasoning"] == (
        dataclasses.asdict(t.reasoning) if t.reasoning else None
    )
    # a thinking tag never leaks into a stop or the pre-query
    assert not any(tag in stop for stop in t.stop_strings for tag in ("<think>", "</think>"))
    assert "<think>" not in t.pre_query and "</think>" not in t.pre_query


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_response_prompt_matches_template(base_tokenizer, name):
    expected = EXPECTED[name]
    tok = make_tokenizer(base_tokenizer, name)
    t = derive_templates(tok)
    bos_text = tok.bos_token if expected["adds_bos"] and tok.bos_token else ""
    for messages in (HISTORY[:1], HISTORY[:3]):
        reference = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = t.response_prompt(messages)
        assert prompt in (reference, bos_text + reference)
        assert prompt.startswith(bos_text)
    single = t.response_prompt(HISTORY[:1])
    assert bos_count(tok, single) == expected["bos_count"]
    # the response prompt of the first turn continues the Magpie pre-query (modulo the [INST] space)
    assert single.startswith(t.pre_query)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_multi_turn_query_prompt_is_template_rendering(base_tokenizer, name):
    expected = EXPECTED[name]
    tok = make_tokenizer(base_tokenizer, name)
    t = derive_templates(tok)
    bos_text = tok.bos_token if expected["adds_bos"] and tok.bos_token else ""
    for history in (HISTORY[:2], HISTORY):
        reference = template_cut(tok, history, bos_text)
        if expected.get("overrides"):
            assert reference.endswith("[INST] ")
            reference = reference[:-1]
        assert t.query_prompt(history) == reference
    if name == "llama-2-7b-chat":  # BOS per turn is the template's own format
        assert bos_count(tok, t.query_prompt(HISTORY)) == 3


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_no_default_system_prompt(base_tokenizer, name):
    expected = EXPECTED[name]
    tok = make_tokenizer(base_tokenizer, name)
    keep = derive_templates(tok)
    drop = derive_templates(tok, keep_default_system_prompt=False)
    assert drop.pre_query == expected.get("pre_query_no_default", expected["pre_query"])
    assert bos_count(tok, drop.pre_query) == expected["bos_count"]
    assert drop.stop_strings == keep.stop_strings
    if "pre_query_no_default" not in expected:  # no injected block: a no-op everywhere
        assert drop.default_system_block == ""
        assert drop.query_prompt(HISTORY[:2]) == keep.query_prompt(HISTORY[:2])
        assert drop.response_prompt(HISTORY[:1]) == keep.response_prompt(HISTORY[:1])
        return
    block = drop.default_system_block
    assert block and block in keep.pre_query
    # multi-turn and response prompts lose the same block and nothing else
    for text_keep, text_drop in (
        (keep.query_prompt(HISTORY[:2]), drop.query_prompt(HISTORY[:2])),
        (keep.response_prompt(HISTORY[:3]), drop.response_prompt(HISTORY[:3])),
    ):
        assert block in text_keep and block not in text_drop
        assert text_keep.replace(block, "", 1) == text_drop
    # an explicit system prompt replaces the default block either way
    assert drop.query_prompt([], system_prompt="Be brief.") == keep.query_prompt([], system_prompt="Be brief.")


def test_phi3_without_tokenizer_bos(base_tokenizer):
    tok = make_tokenizer(base_tokenizer, "phi-3-mini-4k-instruct", adds_bos=False)
    t = derive_templates(tok)
    assert t.pre_query == "<|user|>\n" and bos_count(tok, t.pre_query) == 0
    assert t.response_prompt(HISTORY[:1]) == tok.apply_chat_template(HISTORY[:1], tokenize=False, add_generation_prompt=True)


def test_unknown_template_is_derived_not_tabulated(base_tokenizer):
    """A made-up Alpaca-style format: stops come from the template, the assistant header ends the query."""
    tok = copy.deepcopy(base_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m.role == 'user' %}{{ '### Instruction:\\n' + m.content + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + m.content + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    )
    t = derive_templates(tok)
    assert t.pre_query == "### Instruction:\n"
    assert t.stop_strings == ["### Response:", "<|im_end|>"]
    assert t.stop_token_ids == [tok.eos_token_id]
    assert t.clean("Sort a list.\n\n### Response:\nUse sorted()") == "Sort a list."
    assert t.query_prompt(HISTORY[:2]) == "### Instruction:\nWhat is 2+2?\n\n### Response:\nIt is 4.<|im_end|>\n\n### Instruction:\n"


def test_embedded_smollm2_default_system_block(base_tokenizer):
    keep = derive_templates(base_tokenizer)
    drop = derive_templates(base_tokenizer, keep_default_system_prompt=False)
    assert keep.pre_query == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\n"
    )
    assert drop.pre_query == "<|im_start|>user\n"  # SmolLM2's bos '<|im_start|>' is the turn start, not a lead
    assert keep.stop_strings == ["<|im_end|>"] and keep.stop_token_ids == [base_tokenizer.eos_token_id]
    assert drop.response_prompt(HISTORY[:1]) == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_system_prompt(base_tokenizer):
    tok = make_tokenizer(base_tokenizer, "llama-3-8b-instruct")
    t = derive_templates(tok, system_prompt="You are a poet.")
    assert t.pre_query == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a poet.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
    )
    assert t.to_record()["system_prompt"] == "You are a poet."
    # the object's system prompt goes into every prompt unless overridden
    assert "You are a poet." in t.response_prompt(HISTORY[:1])
    assert "You are a poet." not in t.response_prompt(HISTORY[:1], system_prompt=None)
    assert t.query_prompt([], system_prompt=None) == derive_templates(tok).pre_query
    # a history that brings its own system message keeps it
    own = [{"role": "system", "content": "Be terse."}, *HISTORY[:2]]
    assert "Be terse." in t.query_prompt(own) and "You are a poet." not in t.query_prompt(own)


def test_system_prompt_rejected_by_template(base_tokenizer):
    tok = make_tokenizer(base_tokenizer, "gemma-2-2b-it")
    with pytest.raises(ChatTemplateError, match="System role not supported") as info:
        derive_templates(tok, system_prompt="You are a poet.")
    assert "pre_query_template=" in str(info.value)
    # without a system prompt, dropping the (absent) default block is a no-op
    assert derive_templates(tok, keep_default_system_prompt=False).pre_query == "<bos><start_of_turn>user\n"


def test_no_chat_template(base_tokenizer):
    tok = copy.deepcopy(base_tokenizer)
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template") as info:
        derive_templates(tok)
    assert "pre_query_template=" in str(info.value)
    t = derive_templates(tok, pre_query_template="<|im_start|>user\n", stop_strings=["\n\n"])
    assert t.source == "explicit"
    assert t.pre_query == t.query_prompt([]) == "<|im_start|>user\n"
    assert t.stop_strings == [tok.eos_token, "\n\n"]
    assert t.stop_token_ids == [tok.eos_token_id]
    with pytest.raises(ChatTemplateError, match="no chat template"):
        t.response_prompt(HISTORY[:1])


def test_explicit_pre_query_template_overrides(base_tokenizer):
    t = derive_templates(base_tokenizer, pre_query_template="<|im_start|>user\nWrite a math question: ")
    assert t.pre_query == "<|im_start|>user\nWrite a math question: "
    assert t.overrides == [] and t.to_record()["source"] == "explicit"
    # the chat template still renders responses
    assert t.response_prompt(HISTORY[:1]).endswith("<|im_start|>assistant\n")


def test_clean(base_tokenizer):
    t = derive_templates(base_tokenizer)
    assert t.clean("  How do I sort a list?<|im_end|>\n<|im_start|>assistant\nUse sorted().") == "How do I sort a list?"
    assert t.clean("Tell me a joke.\n<|endoftext|>") == "Tell me a joke."
    assert t.clean("\nNo stop at all  ") == "No stop at all"
    tok = make_tokenizer(base_tokenizer, "mistral-7b-instruct-v0.3")
    m = derive_templates(tok)
    assert m.clean(" What is a monad? [/INST] A monad is") == "What is a monad?"
    assert m.clean("It is 4.</s>") == "It is 4."


def test_overrides_are_documented():
    for override in PRE_QUERY_OVERRIDES:
        assert override.name and len(override.reason) > 40
        assert override.apply("<s>[INST] ") == "<s>[INST]"
        assert override.apply("<|im_start|>user\n") is None


def test_templates_are_picklable_records(base_tokenizer):
    t = derive_templates(base_tokenizer, system_prompt="Hi", keep_default_system_prompt=False)
    assert isinstance(t, ChatTemplates)
    record = json.loads(json.dumps(t.to_record()))
    assert record["pre_query"] == t.pre_query and record["stop_token_ids"] == t.stop_token_ids
    assert record["chat_template_sha256"] and len(record["chat_template_sha256"]) == 64


def test_cli_on_embedded_model(capsys, monkeypatch):
    import transformers

    from magpie_hf.cli import main
    from magpie_hf.utils.embedded import embedded_chat_model

    model_dir, gguf_file = embedded_chat_model()
    args = ["template", str(model_dir), "--gguf-file", gguf_file]
    # the first call really loads the tokenizer from the GGUF file; later calls reuse it (a load is ~10 s)
    real_load, loaded = transformers.AutoTokenizer.from_pretrained, []

    def load_once(*a, **k):
        loaded or loaded.append(real_load(*a, **k))
        return loaded[0]

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", load_once)
    assert main([*args, "--no-default-system-prompt"]) == 0
    out = capsys.readouterr().out
    assert "pre_query:         '<|im_start|>user\\n'" in out
    assert "stop_strings:      ['<|im_end|>']" in out
    assert "pre_query ids:     [1, " in out and "x1)" in out  # SmolLM2's bos is '<|im_start|>'
    assert "'<|im_start|>user\\nHello!<|im_end|>\\n<|im_start|>assistant\\n'" in out

    assert main([*args, "--system-prompt", "Be brief.", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["pre_query"] == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    assert main([*args, "--chat-template-kwargs", '{"enable_thinking": false}', "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["chat_template_kwargs"] == {"enable_thinking": False}
    assert main([*args, "--chat-template-kwargs", '{"enable_thinking": false}']) == 0
    assert 'template kwargs:   {"enable_thinking": false}' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "--chat-template-kwargs", '["enable_thinking"]'])
    assert "--chat-template-kwargs must be a JSON object" in capsys.readouterr().err
    assert main([*args, "--chat-template-kwargs", '{"tokenize": true}']) == 2
    assert "may not set ['tokenize']" in capsys.readouterr().err
    assert main([*args, "--pre-query-template", "<|im_start|>user\\nQ: ", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["pre_query"] == "<|im_start|>user\nQ: " and record["source"] == "explicit"
    loaded[0].chat_template = None
    assert main(args) == 2
    assert "pre_query_template=" in capsys.readouterr().err


# ---------------------------------------------------------------- today's models: no closing markers, thinking
def bare_tokenizer(base, name: str):
    """The fixture's template on the embedded tokenizer that knows only its BOS/EOS, not its format tokens
    (how the role tokens look to code that cannot rely on the tokenizer's added vocabulary)."""
    fixture = FIXTURES[name]
    tok = copy.deepcopy(base)
    tok.add_special_tokens({k: fixture[k] for k in ("bos_token", "eos_token") if fixture.get(k)})
    if not fixture.get("bos_token"):
        tok.bos_token = None
    tok.chat_template = fixture["chat_template"]
    return tok


@pytest.mark.parametrize("name", ["deepseek-r1-distill-llama-8b", "deepseek-v3.1-terminus", "glm-4-9b-chat", "glm-4.6"])
@pytest.mark.parametrize("kwargs", [None, {"thinking": True}, {"thinking": False}, {"enable_thinking": False}])
def test_user_turn_stop_is_the_assistant_role_token(base_tokenizer, name, kwargs):
    """The stop after a user turn is what always follows one, whatever the generation prompt opens."""
    expected = EXPECTED[name]
    for tok in (make_tokenizer(base_tokenizer, name), bare_tokenizer(base_tokenizer, name)):
        t = derive_templates(tok, chat_template_kwargs=kwargs)
        assert t.pre_query == expected["pre_query"]
        stops = t.stop_strings
        role = "<｜Assistant｜>" if name.startswith("deepseek") else "<|assistant|>"
        if name == "glm-4.6" and kwargs == {"enable_thinking": False}:
            # GLM appends '/nothink' to every user turn without thinking; with <|assistant|> known as a token
            # both are stops, else the whole '/nothink<|assistant|>' is one
            assert stops in (["/nothink", *expected["stops"]], ["/nothink<|assistant|>", expected["stops"][1]])
            assert t.clean("Name a prime./nothink<|assistant|>\n<think></think>\n2") == "Name a prime."
            role = "/nothink<|assistant|>"
        else:
            assert stops == expected["stops"]
        # a query the model ends with the role token is cut right there, thinking tags or not
        for follow in ("<think>\nhmm", "</think>Sure", "\n<think></think>\nSure", ""):
            assert t.clean(f"Name a prime.{role}{follow}") == "Name a prime."


def test_deepseek_r1_reply_starts_inside_the_reasoning(base_tokenizer):
    tok = make_tokenizer(base_tokenizer, "deepseek-r1-distill-llama-8b")
    t = derive_templates(tok)
    prompt = t.response_prompt(HISTORY[:1])
    assert prompt == "<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜><think>\n"
    assert bos_count(tok, prompt) == 1
    assert t.reasoning == ReasoningMarkers("<think>", "</think>", opened_by_generation_prompt=True)
    assert t.to_record()["reasoning"] == {"open": "<think>", "close": "</think>", "opened_by_generation_prompt": True}
    # the template drops the reasoning of earlier turns; the next query prompt holds only the answer
    history = [HISTORY[0], {"role": "assistant", "content": "Let me add.</think>\n\nIt is 4."}]
    assert t.query_prompt(history) == (
        "<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜>\n\nIt is 4.<｜end▁of▁sentence｜><｜User｜>"
    )
    # a system prompt goes right after BOS, with no markup of its own
    assert derive_templates(tok, system_prompt="Be brief.").pre_query == "<｜begin▁of▁sentence｜>Be brief.<｜User｜>"


def test_deepseek_v31_thinking_switch(base_tokenizer):
    tok = make_tokenizer(base_tokenizer, "deepseek-v3.1-terminus")
    plain, thinking = derive_templates(tok), derive_templates(tok, chat_template_kwargs={"thinking": True})
    assert plain.response_prompt(HISTORY[:1]).endswith("<｜User｜>What is 2+2?<｜Assistant｜></think>")
    assert thinking.response_prompt(HISTORY[:1]).endswith("<｜User｜>What is 2+2?<｜Assistant｜><think>")
    assert (plain.reasoning.opened_by_generation_prompt, thinking.reasoning.opened_by_generation_prompt) == (False, True)
    assert plain.pre_query == thinking.pre_query and plain.stop_strings == thinking.stop_strings
    assert thinking.to_record()["chat_template_kwargs"] == {"thinking": True}
    # follow-up queries carry the template's non-thinking history markup either way
    assert thinking.query_prompt(HISTORY[:2]).endswith("<｜Assistant｜></think>It is 4.<｜end▁of▁sentence｜><｜User｜>")


def test_glm_fixed_prefix_and_system_prompt(base_tokenizer):
    for name in ("glm-4-9b-chat", "glm-4.6"):
        tok = make_tokenizer(base_tokenizer, name)
        t = derive_templates(tok, keep_default_system_prompt=False)
        assert t.default_system_block == "" and t.pre_query == "[gMASK]<sop><|user|>\n"
        assert t.query_prompt([], system_prompt="Be brief.") == "[gMASK]<sop><|system|>\nBe brief.<|user|>\n"
        assert t.query_prompt(HISTORY[:2]).startswith("[gMASK]<sop><|user|>\nWhat is 2+2?<|assistant|>")
        assert t.query_prompt(HISTORY[:2]).endswith("It is 4.<|user|>\n")
        assert t.response_prompt(HISTORY[:1]) == "[gMASK]<sop><|user|>\nWhat is 2+2?<|assistant|>"
        assert t.clean("It is 4.<|user|>\nAnd 3+3?") == "It is 4."


def test_gemma3_folds_the_system_prompt_into_the_first_user_turn(base_tokenizer):
    tok = make_tokenizer(base_tokenizer, "gemma-3-1b-it")
    t = derive_templates(tok, system_prompt="You are a poet.")
    assert t.pre_query == "<bos><start_of_turn>user\nYou are a poet.\n\n"
    assert bos_count(tok, t.pre_query) == 1
    assert t.response_prompt(HISTORY[:1]) == "<bos><start_of_turn>user\nYou are a poet.\n\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"


# ---------------------------------------------------------------- chat_template_kwargs
def test_chat_template_kwargs_reach_every_rendering(base_tokenizer):
    """Qwen3 with enable_thinking=False: the generation prompt holds an empty think block everywhere."""
    tok = make_tokenizer(base_tokenizer, "qwen3-0.6b")
    off = {"enable_thinking": False}
    default, t = derive_templates(tok), derive_templates(tok, chat_template_kwargs=off)
    empty_block = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert t.response_prompt(HISTORY[:1]).endswith(empty_block)
    assert t.response_prompt(HISTORY[:3]).endswith(empty_block)
    assert default.response_prompt(HISTORY[:1]).endswith("<|im_start|>assistant\n")
    assert t.response_prompt(HISTORY[:1]) == tok.apply_chat_template(
        HISTORY[:1], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    # pre-query and multi-turn prompts are the template's own rendering under the same kwargs
    assert t.pre_query == "<|im_start|>user\n" and t.stop_strings == ["<|im_end|>"]
    rendered = tok.apply_chat_template([*HISTORY, {"role": "user", "content": TEST_SENTINEL}], tokenize=False, enable_thinking=False)
    assert t.query_prompt(HISTORY) == rendered[: rendered.index(TEST_SENTINEL)]
    assert t.reasoning == ReasoningMarkers("<think>", "</think>", opened_by_generation_prompt=False)
    # the shared renderer of judges, guard and reward model
    assert render_chat(tok, HISTORY[:1], chat_template_kwargs=off).endswith(empty_block)
    assert render_chat(tok, HISTORY[:1]) == default.response_prompt(HISTORY[:1])
    assert t.to_record()["chat_template_kwargs"] == off and default.to_record()["chat_template_kwargs"] == {}
    # GLM-4.6 marks every user turn of a non-thinking conversation: the kwargs reach the history too
    glm = derive_templates(make_tokenizer(base_tokenizer, "glm-4.6"), chat_template_kwargs=off)
    assert glm.query_prompt(HISTORY[:2]) == (
        "[gMASK]<sop><|user|>\nWhat is 2+2?/nothink<|assistant|>\n<think></think>\nIt is 4.<|user|>\n"
    )
    assert glm.response_prompt(HISTORY[:1]).endswith("What is 2+2?/nothink<|assistant|>\n<think></think>")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tokenize": True}, "may not set \\['tokenize'\\]"),
        ({"add_generation_prompt": True}, "may not set"),
        ({"messages": []}, "may not set"),
        ({"enable_thinking": object()}, "must be JSON"),
        ({"ratio": float("nan")}, "must be JSON"),
        (["enable_thinking"], "must be a mapping"),
    ],
)
def test_bad_chat_template_kwargs_fail_clearly(base_tokenizer, kwargs, message):
    with pytest.raises(ChatTemplateError, match=message):
        derive_templates(base_tokenizer, chat_template_kwargs=kwargs)
    with pytest.raises(ChatTemplateError, match=message):
        render_chat(base_tokenizer, HISTORY[:1], chat_template_kwargs=kwargs)


def test_render_chat_bos_once_and_clear_error(base_tokenizer):
    tok = make_tokenizer(base_tokenizer, "phi-3-mini-4k-instruct")  # template writes no BOS, tokenizer adds it
    text = render_chat(tok, HISTORY[:2], add_generation_prompt=False)
    assert text.startswith("<s><|user|>\n") and bos_count(tok, text) == 1
    deepseek = make_tokenizer(base_tokenizer, "deepseek-r1-distill-llama-8b")  # template writes BOS itself
    assert bos_count(deepseek, render_chat(deepseek, HISTORY[:1])) == 1
    none = copy.deepcopy(base_tokenizer)
    none.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template.*chat/instruct model"):
        render_chat(none, HISTORY[:1])
