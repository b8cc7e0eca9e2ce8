"""Instruction post-processing filters (pure text; no model)."""

from __future__ import annotations

import pytest

from magpie_hf.prompts.tasks import TASK_PROMPTS
from magpie_hf.steps.postprocess import (
    DropSystemPromptEcho,
    InstructionFilter,
    NoMarkdownHeading,
    QueryEnd,
    StripEnumerator,
    StripLabelPrefix,
    StripTrailingRoleWord,
    apply_filters,
    filters_from_names,
    sanitize_family,
    sanitize_filters,
)


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


# The official post-processing (magpie-align/magpie exp/str_utils.py instruction_post_process), case by case:
# what the official function returns for each sample (one rule of QueryEnd's docstring each), for both families.
OFFICIAL = [
    ("1. Write a poem about the sea.", "Write a poem about the sea."),
    ("a) Name three fruits.", "Name three fruits."),
    ("Question: What is a prime number? Also list some.", "What is a prime number?"),
    ("Task: Write a haiku.\nHere is one:\nLeaves fall", "Write a haiku."),
    ("Solve for x:\n2x + 3 = 7\n## Step 1: Subtract 3", "Solve for x:\n2x + 3 = 7"),
    ("Solve the following:\nx+1=2. What is x? Then y?", "Solve the following:\nx+1=2. What is x?"),
    ("I need help:\n# Heading\nmore", "I need help:"),
    ('"How do I sort a list?" asked the user. Another?', "How do I sort a list?"),
    ('"Write a story\nabout cats"', "Write a story"),
    ("<b>Bold</b> request *here*\nsecond line", "<b>Bold</b> request here\nsecond line"),
    ("*What* is this? And that?", "What is this?"),
    ("Which is correct? (A) 1 (B) 2\nCorrect answer: B", "Which is correct? (A) 1 (B) 2"),
    ("Pick one: A, B or C.\nThe correct answer: C", "Pick one: A, B or C."),
    ("Describe a cat\nand a dog", "Describe a cat"),
    ("Question 3. What is pi?", "What is pi?"),
    ("Part 2: Summarise it.", "Summarise it."),
    ("Q2. Name a bird?", "Name a bird?"),
    ("What's up?assistant", "What's up?"),
    ("Write code:\n```python\nprint(1)\n```", "Write code:"),
]


@pytest.mark.parametrize("family", ["llama-3", "gemma-2"])
@pytest.mark.parametrize(("text", "expected"), OFFICIAL)
def test_sanitize_does_what_the_official_post_processing_does(family, text, expected):
    assert apply_filters(text, sanitize_filters(family)) == (expected, None)


def test_sanitize_families_and_counted_drops():
    # Llama-3 only: a "# Step 1" heading starts an answer (here nothing comes before it: dropped, counted)
    assert apply_filters("## Step 1: Find the area", sanitize_filters("llama-3")) == (None, "query_end")
    assert apply_filters("## Step 1: Find the area", sanitize_filters("gemma-2")) == ("## Step 1: Find the area", None)
    assert apply_filters("Question:", sanitize_filters()) == (None, "label_prefix")
    assert apply_filters("1.", sanitize_filters()) == (None, "enumerator")
    assert [f.name for f in sanitize_filters()] == ["enumerator", "label_prefix", "query_end"]
    assert sanitize_family("google/gemma-2-27b-it") == "gemma-2" and sanitize_family("meta-llama/Llama-3.3-70B-Instruct") == "llama-3"
    with pytest.raises(ValueError, match="family"):
        QueryEnd("mistral")
    # a marker counts only with a colon after it, as in the official pattern `(...)s?:`
    assert QueryEnd()("Here are some numbers: 3, 1, 2. Sort them.") == "Here are some numbers: 3, 1, 2. Sort them."
    assert QueryEnd()("Is 7 prime?\nThe answer is: yes") == "Is 7 prime?"


@pytest.mark.parametrize(
    ("text", "official", "ours"),
    [
        # the official enumerator pattern eats the "3." of a decimal number
        ("3.14 is pi. Prove it.", "14 is pi. Prove it.", "3.14 is pi. Prove it."),
        # its "**X**" label variant leaves the colon that follows it
        ("**Question**: What is a prime? Explain.", ": What is a prime?", "What is a prime?"),
    ],
)
def test_sanitize_departs_from_the_official_code_only_where_it_mangles_text(text, official, ours):
    assert official != ours and apply_filters(text, sanitize_filters()) == (ours, None)


def test_strip_enumerator():
    assert StripEnumerator()("12. List three rivers.") == "List three rivers."
    assert StripEnumerator()("iv) Explain tides.") == "Explain tides."
    assert StripEnumerator()("3.5 kg of flour: how many cups?") == "3.5 kg of flour: how many cups?"
