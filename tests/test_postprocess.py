"""Instruction post-processing filters (pure text; no model)."""

from __future__ import annotations

import pytest

from magpie_hf.postprocess import (
    DropSystemPromptEcho,
    InstructionFilter,
    NoMarkdownHeading,
    StripLabelPrefix,
    StripTrailingRoleWord,
    apply_filters,
    filters_from_names,
)
from magpie_hf.task_prompts import TASK_PROMPTS


@pytest.mark.parametrize(
    "text, expected",
    [
        ("## Step 1: Understand the problem", None),
        ("# Title", None),
        ("  ### heading after spaces", None),
        ("What is C# used for?", "What is C# used for?"),
        ("How do I write a #include guard?", "How do I write a #include guard?"),
    ],
)
def test_no_markdown_heading(text, expected):
    assert NoMarkdownHeading()(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("What is 2+2?\nassistant", "What is 2+2?"),
        ("What is 2+2?assistant", "What is 2+2?"),
        ("Explain recursion.\n\nAssistant:", "Explain recursion."),
        ("Summarise this.\nuser\nassistant", "Summarise this."),
        ("How do I add a new Linux user", "How do I add a new Linux user"),  # legit last word kept
        ("Tell me about the assistant", "Tell me about the assistant"),
        ("assistant", None),
    ],
)
def test_strip_trailing_role_word(text, expected):
    assert StripTrailingRoleWord()(text) == expected


def test_drop_system_prompt_echo():
    f = DropSystemPromptEcho()
    math = TASK_PROMPTS["math"]
    assert f(math, system_prompt=math) is None
    assert f("You are an AI assistant that helps people with mathematics.", system_prompt=math) is None
    question = "A train leaves at 3 pm going 60 km/h; when does it reach a town 150 km away?"
    assert f(question, system_prompt=math) == question
    assert f("Solve x^2 = 9.", system_prompt=math) == "Solve x^2 = 9."  # too short to call an echo
    assert f(math, system_prompt=None) == math
    with pytest.raises(ValueError):
        DropSystemPromptEcho(threshold=0)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Question: What is a prime?", "What is a prime?"),
        ("**Task**: Write a haiku.", "Write a haiku."),
        ("## Problem 2: Solve for x.", "Solve for x."),
        ("Q1. Name a mammal.", "Name a mammal."),
        ("Questions about the moon landing?", "Questions about the moon landing?"),
        ("Question:", None),
    ],
)
def test_strip_label_prefix(text, expected):
    assert StripLabelPrefix()(text) == expected


def test_apply_filters_composes_in_order_and_names_the_dropper():
    filters = filters_from_names("label_prefix,trailing_role_word,markdown_heading,system_prompt_echo")
    assert all(isinstance(f, InstructionFilter) for f in filters)
    assert apply_filters("Question: Why is the sky blue?\nassistant", filters) == ("Why is the sky blue?", None)
    assert apply_filters("## Step 1", filters) == (None, "markdown_heading")
    system = "You are a travel planner who organises trips for families."
    assert apply_filters("You are a travel planner who organises trips.", filters, system_prompt=system) == (
        None,
        "system_prompt_echo",
    )


def test_filters_from_names_validates():
    assert filters_from_names(None) == () and filters_from_names("none") == () and filters_from_names("") == ()
    with pytest.raises(ValueError, match="markdown_heading"):
        filters_from_names("markdown")
