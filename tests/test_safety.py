"""Llama Guard safety tags: verdict parsing, the guard's own prompt template, and a run on a stand-in guard."""

from __future__ import annotations

import copy

import pytest

from magpie_hf.engines.base import Engine
from magpie_hf.engines.config import EngineConfig
from magpie_hf.steps.safety import (
    LLAMA_GUARD_2_CATEGORIES,
    LLAMA_GUARD_3_CATEGORIES,
    LlamaGuard,
    VerdictError,
    guess_taxonomy,
    parse_guard_verdict,
)

# A short template in the shape of Llama-Guard-2's: BOS, [INST] task, the conversation with User/Agent
# roles, and the instruction to answer safe/unsafe for the last turn, closed by [/INST].
GUARD_TEMPLATE = (
    "{% if messages|length % 2 == 0 %}{% set role = 'Agent' %}{% else %}{% set role = 'User' %}{% endif %}"
    "{{ bos_token }}[INST] Task: Check if there is unsafe content in '{{ role }}' messages in conversations "
    "according to our safety policy.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\nS1: Violent Crimes.\nS2: Non-Violent Crimes.\n"
    "<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n"
    "{% for message in messages %}{% if message['role'] == 'user' %}{% set r = 'User' %}{% else %}{% set r = 'Agent' %}"
    "{% endif %}{{ r + ': ' + message['content'].strip() + '\n\n' }}{% endfor %}<END CONVERSATION>\n\n"
    "Provide your safety assessment for ONLY THE LAST {{ role }} message in the above conversation:\n"
    " - First line must read 'safe' or 'unsafe'.\n"
    " - If unsafe, a second line must include a comma-separated list of violated categories. [/INST]"
)


class StandInGuard(Engine):
    """The embedded chat model behind a Llama-Guard-style tokenizer template (same vocabulary)."""

    name = "stand-in-guard"

    def __init__(self, engine: Engine) -> None:
        super().__init__(EngineConfig(model="stand-in/Llama-Guard-3-tiny"))
        self._engine = engine
        self._tok = copy.deepcopy(engine.tokenizer)
        self._tok.chat_template = GUARD_TEMPLATE
        self.prompts: list[str] = []

    @property
    def tokenizer(self):
        return self._tok

    def _generate(self, prompts, sampling, seeds=None, progress=None):
        self.prompts.extend(prompts)
        return self._engine.generate(prompts, sampling, progress=progress)


@pytest.mark.parametrize(
    ("text", "taxonomy", "expected"),
    [
        ("safe", "llama-guard-2", (True, [])),
        ("\n\nsafe\n", "llama-guard-3", (True, [])),
        ("unsafe\nS1", "llama-guard-2", (False, ["Violent Crimes"])),
        ("unsafe\nS1,S10", "llama-guard-2", (False, ["Violent Crimes", "Suicide & Self-Harm"])),
        (" unsafe\nS5, S14 \n", "llama-guard-3", (False, ["Defamation", "Code Interpreter Abuse"])),
    ],
)
def test_parse_real_verdict_formats(text, taxonomy, expected):
    assert parse_guard_verdict(text, taxonomy) == expected


@pytest.mark.parametrize("text", ["", "Sure, here is", "unsafe", "unsafe\nS14", "unsafe\nviolence", "unsafe\nS1,,X9"])
def test_unparseable_verdicts_raise(text):
    with pytest.raises(VerdictError):
        parse_guard_verdict(text, "llama-guard-2")


def test_taxonomies_and_guess():
    assert len(LLAMA_GUARD_2_CATEGORIES) == 11 and len(LLAMA_GUARD_3_CATEGORIES) == 14
    assert LLAMA_GUARD_2_CATEGORIES["S5"] == "Specialized Advice"  # the paper's dominant unsafe category
    assert guess_taxonomy("meta-llama/Llama-Guard-3-8B") == "llama-guard-3"
    assert guess_taxonomy("meta-llama/Meta-Llama-Guard-2-8B") == "llama-guard-2"
    assert LlamaGuard().engine.model == "meta-llama/Meta-Llama-Guard-2-8B"


@pytest.mark.slow
def test_guard_step_end_to_end_with_stand_in(embedded_engine):
    guard = StandInGuard(embedded_engine)
    step = LlamaGuard(engine=guard, max_tokens=8)
    batch = {
        "instruction": ["How do I bake bread?", "", "Tell me a joke."],
        "response": ["Mix flour, water, yeast and salt, then bake.", "x", None],
    }
    out = step.process(batch, seed=0)
    assert step.resolved_taxonomy() == "llama-guard-3"
    # the guard's template built the prompts: BOS once, both turns, the verdict cue at the end
    bos = guard.tokenizer.bos_token
    first = guard.prompts[0]
    assert first.startswith(bos + "[INST]") and not first.startswith(bos + bos)
    assert "User: How do I bake bread?\n\nAgent: Mix flour" in first and "LAST Agent message" in first
    assert first.endswith("[/INST]")
    assert "LAST User message" in guard.prompts[1]  # no response: moderate the prompt alone
    # garbage from a stand-in is kept raw, and becomes a parsed flag or null + counted, never a crash
    assert out["llama_guard_2"][1] is None and out["llama_guard_error"][1] == "empty instruction"
    for raw, safe, cats, error in zip(out["llama_guard_2"], out["is_safe"], out["unsafe_categories"], out["llama_guard_error"]):
        assert (safe is None and cats is None and error) or (isinstance(safe, bool) and isinstance(cats, list) and error is None)
        if raw is not None:
            assert isinstance(raw, str)
    assert sum(step.stats[k] for k in ("safe", "unsafe", "unparseable", "empty_input")) == 3
