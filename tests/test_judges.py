"""LLM-judge taggers: JSON parsing, label validation, constrained decoding on the embedded model."""

from __future__ import annotations

import pytest
import torch

from magpie_hf.engines.base import Completion, Engine, SamplingConfig
from magpie_hf.engines.config import EngineConfig
from magpie_hf.steps.judges import (
    DIFFICULTIES,
    INPUT_QUALITIES,
    TASK_CATEGORIES,
    Difficulty,
    InputQuality,
    JudgeError,
    TaskCategory,
    extract_json_object,
    match_label,
)
from magpie_hf.templates import render_chat


class ScriptedEngine(Engine):
    """Returns fixed answers in order (a test double for the parsing path); records prompts and sampling."""

    name = "scripted"

    def __init__(self, answers: list[str], tokenizer) -> None:
        super().__init__(EngineConfig(model="scripted-judge"))
        self.answers = list(answers)
        self._tok = tokenizer
        self.prompts: list[str] = []
        self.sampling: SamplingConfig | None = None

    @property
    def tokenizer(self):
        return self._tok

    def _generate(self, prompts, sampling, seeds, progress):
        self.prompts.extend(prompts)
        self.sampling = sampling
        return [[Completion(self.answers.pop(0), 10, "stop")] for _ in prompts]


def test_extract_json_object_from_prose_and_fences():
    assert extract_json_object('Sure! ```json\n{"a": 1}\n``` done') == {"a": 1}
    assert extract_json_object('{bad} then {"b": [1, 2]}') == {"b": [1, 2]}
    assert extract_json_object("no json here") is None
    assert extract_json_object('["a list", {"c": 1}]') == {"c": 1}


def test_match_label_is_case_insensitive_and_never_leaves_the_set():
    assert match_label("coding & debugging", TASK_CATEGORIES) == "Coding & Debugging"
    assert match_label(" [Very Hard] ", DIFFICULTIES) == "very hard"
    assert match_label("Cooking", TASK_CATEGORIES) is None
    assert match_label(3, INPUT_QUALITIES) is None


def test_schemas_enumerate_exactly_the_paper_labels():
    assert TaskCategory().schema()["properties"]["task_category"]["enum"] == list(TASK_CATEGORIES)
    assert InputQuality().schema()["properties"]["input_quality"]["enum"] == list(INPUT_QUALITIES)
    assert Difficulty().schema()["properties"]["difficulty"]["enum"] == list(DIFFICULTIES)
    assert len(TASK_CATEGORIES) == 12
    # the paper's judge is the default
    assert TaskCategory().engine.model == "meta-llama/Meta-Llama-3-8B-Instruct"


def test_judges_can_answer_with_the_label_alone():
    quality, difficulty = InputQuality(explanations=False), Difficulty(explanations=False)
    assert quality.schema()["required"] == ["input_quality"] and difficulty.schema()["required"] == ["difficulty"]
    assert '"explanation"' not in quality.prompt("Hi") and '"intent"' not in difficulty.prompt("Hi")
    assert quality.parse({"input_quality": "good"}) == {"input_quality": "good", "quality_explanation": None}
    assert difficulty.parse({"difficulty": "easy"}) == {"intent": None, "knowledge": None, "difficulty": "easy"}
    assert InputQuality().schema()["required"] == ["explanation", "input_quality"]  # the paper's default keeps them


def test_task_category_step_validates_every_answer(embedded_tokenizer):
    answers = [
        '{"task_category": "coding & debugging", "other_task_category": ["Math", "Cooking", "Coding & Debugging"]}',
        '```json\n{"task_category": "Cooking", "other_task_category": []}\n```',
        "I think this is about math.",
        '{"task_category": "Math", "other_task_category": "Reasoning"}',
    ]
    engine = ScriptedEngine(answers, embedded_tokenizer)
    step = TaskCategory(engine=engine)
    batch = {"instruction": ["Fix my code", "Bake a cake", "", "2+2?", "Prove it"], "x": [1, 2, 3, 4, 5]}
    out = step.process(batch, seed=0)
    assert out["x"] == [1, 2, 3, 4, 5]
    assert out["task_category"] == ["Coding & Debugging", None, None, None, "Math"]
    assert out["other_task_category"] == [["Math"], None, None, None, ["Reasoning"]]
    errors = out["task_category_error"]
    assert errors[0] is None and errors[4] is None
    assert "Cooking" in errors[1] and errors[2] == "empty or missing input" and "no JSON" in errors[3]
    assert step.stats == {"parsed": 2, "unparseable": 2, "out_of_set": 1, "other_out_of_set": 1, "empty_input": 1}
    assert set(out["task_category_generator"]) == {"scripted-judge"}
    # greedy, short, constrained to the schema; prompts written in the judge's own chat template
    assert engine.sampling.greedy and engine.sampling.json_schema == step.schema()
    assert len(engine.prompts) == 4 and all(p.startswith("<|im_start|>") for p in engine.prompts)
    assert engine.prompts[0].endswith("<|im_start|>assistant\n") and "Fix my code" in engine.prompts[0]


def test_quality_and_difficulty_parse_their_fields(embedded_tokenizer):
    q = InputQuality(engine=ScriptedEngine(['{"explanation": " Clear. ", "input_quality": "Good"}'], embedded_tokenizer))
    out = q.process({"instruction": ["What is 2+2?"]}, seed=0)
    assert (out["input_quality"], out["quality_explanation"], out["input_quality_error"]) == (["good"], ["Clear."], [None])
    assert out["quality_generator"] == ["scripted-judge"]
    d = Difficulty(
        engine=ScriptedEngine(['{"intent": "add", "knowledge": "arithmetic", "difficulty": "trivial"}'], embedded_tokenizer)
    )
    out = d.process({"instruction": ["What is 2+2?"]}, seed=0)
    assert out["difficulty"] == [None] and out["intent"] == [None] and "trivial" in out["difficulty_error"][0]
    assert d.stats["out_of_set"] == 1
    with pytest.raises(JudgeError):
        d.parse({"intent": "x"})


def test_unconstrained_option_drops_the_schema(embedded_tokenizer):
    engine = ScriptedEngine(['{"explanation": "ok", "input_quality": "poor"}'], embedded_tokenizer)
    InputQuality(engine=engine, constrained=False).process({"instruction": ["hi"]}, seed=0)
    assert engine.sampling.json_schema is None


def test_json_schema_processor_masks_per_row(embedded_tokenizer):
    """Replay a valid answer token by token: its tokens stay allowed, labels outside the enum do not.

    The answer writes intent, knowledge, difficulty in the schema's order (reasoning before the rating),
    so this also checks that the schema's key order is kept.
    """
    import json

    pytest.importorskip("llguidance")
    from magpie_hf.engines.constrained import json_schema_logits_processor

    tok = embedded_tokenizer
    step = Difficulty(max_field_chars=60)
    answer = {"intent": "The user wants to add numbers.", "knowledge": "Arithmetic.", "difficulty": "very easy"}
    compact = json.dumps(answer, separators=(",", ":"))  # JSON_GRAMMAR: no free whitespace, as on vLLM
    ids = tok(compact, add_special_tokens=False)["input_ids"]
    vocab = len(tok)
    processor = json_schema_logits_processor(tok, step.schema(), vocab_size=vocab, stop_token_ids=[tok.eos_token_id])
    seq = torch.zeros(2, 1, dtype=torch.long)
    for k, token in enumerate([*ids, tok.eos_token_id]):
        scores = processor(seq, torch.zeros(2, vocab + 3))  # wider than the tokenizer, as padded vocabularies are
        assert torch.isfinite(scores[:, token]).all(), tok.decode(ids[: k + 1])
        assert torch.isinf(scores[:, vocab:]).all()
        if token != tok.eos_token_id:
            assert torch.isinf(scores[:, tok.eos_token_id]).all()  # no stop before the JSON is complete
        seq = torch.cat([seq, torch.full((2, 1), token)], dim=1)
    # an out-of-set label is masked at the point where the enum value starts
    prefix = compact[: compact.index("very easy")]
    fresh = json_schema_logits_processor(tok, step.schema(), vocab_size=vocab, stop_token_ids=[tok.eos_token_id])
    seq = torch.zeros(1, 1, dtype=torch.long)
    for token in tok(prefix, add_special_tokens=False)["input_ids"]:
        fresh(seq, torch.zeros(1, vocab))
        seq = torch.cat([seq, torch.full((1, 1), token)], dim=1)
    scores = fresh(seq, torch.zeros(1, vocab))
    trivial = tok("trivial", add_special_tokens=False)["input_ids"][0]
    assert torch.isinf(scores[0, trivial]) and torch.isfinite(scores[0, tok("very", add_special_tokens=False)["input_ids"][0]])


@pytest.mark.slow
def test_constrained_decoding_makes_embedded_answers_parse(embedded_engine):
    """Plain model.generate with the JSON-schema processor: every answer parses and is in the set."""
    pytest.importorskip("llguidance")
    from magpie_hf.engines.constrained import json_schema_logits_processor

    tok, model = embedded_engine.tokenizer, embedded_engine.model
    step = TaskCategory(engine=embedded_engine)
    queries = ["Write a Python function that reverses a string.", "Write a haiku about rain."]
    prompts = [render_chat(tok, [{"role": "user", "content": step.prompt(q)}]) for q in queries]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    processor = json_schema_logits_processor(
        tok, step.schema(), vocab_size=model.config.vocab_size, stop_token_ids=[tok.eos_token_id]
    )
    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=64, do_sample=False, logits_processor=[processor],
            eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
        )
    for row in out[:, enc["input_ids"].shape[1] :]:
        answer = extract_json_object(tok.decode(row, skip_special_tokens=True))
        parsed = step.parse(answer)
        assert parsed["task_category"] in TASK_CATEGORIES
        assert set(parsed["other_task_category"]) <= set(TASK_CATEGORIES)


@pytest.mark.slow
def test_engine_constrains_to_the_schema_in_its_own_loop(embedded_engine):
    """engine.generate with SamplingConfig.json_schema (the continuous-batching path, sampled): every
    finished answer is JSON whose labels are in their sets."""
    pytest.importorskip("llguidance")
    import json

    step = TaskCategory(engine=embedded_engine)
    queries = ["Write a Python function that reverses a string.", "Write a haiku about rain.", "What is 17 * 23?"]
    prompts = [render_chat(embedded_engine.tokenizer, [{"role": "user", "content": step.prompt(q)}]) for q in queries]
    sampling = SamplingConfig(temperature=1.0, max_tokens=96, n=2, seed=3, json_schema=step.schema())
    finished = 0
    for completions in embedded_engine.generate(prompts, sampling):
        for completion in completions:
            if completion.finish_reason == "stop":
                finished += 1
                parsed = step.parse(json.loads(completion.text))
                assert parsed["task_category"] in TASK_CATEGORIES
                assert set(parsed["other_task_category"]) <= set(TASK_CATEGORIES)
    assert finished >= 4


@pytest.mark.slow
def test_difficulty_step_end_to_end_on_embedded_model(embedded_engine):
    """Whatever the small model writes, labels stay in the set or become null with a reason."""
    step = Difficulty(engine=embedded_engine, max_tokens=32, max_field_chars=80)
    batch = {"instruction": ["What is the capital of France?", "", "Write a sorting algorithm in C."]}
    out = step.process(batch, seed=0)
    for label, error in zip(out["difficulty"], out["difficulty_error"]):
        assert (label in DIFFICULTIES and error is None) or (label is None and error)
    assert out["difficulty_error"][1] == "empty or missing input"
    assert step.stats["parsed"] + step.stats["unparseable"] + step.stats["empty_input"] == 3
    assert out["difficulty_generator"][0].startswith("HuggingFaceTB/SmolLM2-135M-Instruct")
