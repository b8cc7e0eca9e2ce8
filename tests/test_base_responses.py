"""BaseResponses (URIAL-style base-model answers) and RewardDifference."""

from __future__ import annotations

import math

import pytest

from magpie_hf.steps.base_responses import BasePromptTemplate, BaseResponses, RewardDifference, bos_prefix


def test_render_is_the_exact_prompt():
    template = BasePromptTemplate(preamble="A chat.", examples=(("Q1?", "A1."), ("Q2?", "Line 1\nLine 2")))
    assert template.render("  What is 2 + 2? ", bos="<s>") == (
        "<s>A chat.\n\n"
        "# User:\nQ1?\n\n# Assistant:\nA1.\n\n"
        "# User:\nQ2?\n\n# Assistant:\nLine 1\nLine 2\n\n"
        "# User:\nWhat is 2 + 2?\n\n# Assistant:\n"
    )


def test_default_template_has_preamble_and_three_examples():
    prompt = BasePromptTemplate().render("Name a colour.")
    assert prompt.startswith("# Instructions\n\nThe following are conversations between a user and")
    assert prompt.count("# User:\n") == 4 and prompt.count("# Assistant:\n") == 4
    assert prompt.endswith("# User:\nName a colour.\n\n# Assistant:\n")


def test_example_containing_the_marker_is_refused():
    with pytest.raises(ValueError, match="stop marker"):
        BasePromptTemplate(examples=(("q", "a\n# User: more"),))


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Paris.\n\n# User:\nAnd Spain?", "Paris."),  # the next exchange
        ("Paris.\n\n# Us", "Paris."),  # a partial marker at max_tokens
        ("Paris.\n#", "Paris."),
        ("Use C#", "Use C#"),  # a '#' that starts no marker stays
        ("  # Heading\nText  ", "# Heading\nText"),
    ],
)
def test_clean_cuts_at_next_exchange_marker(raw, clean):
    assert BasePromptTemplate().clean(raw) == clean


def _tokenizer_that_adds_bos():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<s>": 0, "a": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="[UNK]")


def test_bos_prefix_only_when_the_tokenizer_adds_one(embedded_tokenizer):
    assert bos_prefix(_tokenizer_that_adds_bos()) == "<s>"
    assert bos_prefix(embedded_tokenizer) == ""  # SmolLM2 adds no BOS


def test_base_responses_on_embedded_model_stop_before_next_exchange(embedded_engine):
    step = BaseResponses(engine=embedded_engine, max_tokens=32)
    step.load()
    assert not step.prompt("Hi").startswith(embedded_engine.tokenizer.bos_token)
    instructions = ["What is the capital of France?", "Write a haiku about rain."]
    out = step.process({"conversation_id": ["a", "b"], "instruction": instructions}, seed=0)
    assert out["conversation_id"] == ["a", "b"]
    assert len(out["base_output"]) == 2
    for text, reason in zip(out["base_output"], out["base_output_finish_reason"]):
        assert "# User:" not in text and not text.endswith("\n#")
        assert reason in ("stop", "length")
    # short factual answers end at the marker, not at the token limit
    assert out["base_output_finish_reason"][0] == "stop" and "Paris" in out["base_output"][0]
    assert set(out["base_output_generator"]) == {embedded_engine.config.describe()}
    assert step.stats["generated_tokens"] == sum(out["base_output_num_tokens"])


def test_reward_difference_is_null_when_a_reward_is_null():
    step = RewardDifference()
    out = step.process({"instruct_reward": [2.0, None, 1.0, math.nan], "base_reward": [0.5, 1.0, None, 0.0]}, seed=0)
    assert out["reward_difference"] == [1.5, None, None, None]
    assert step.stats["null_reward_difference"] == 3
