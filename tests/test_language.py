"""Language tags with lingua (models ship with the package; nothing is downloaded)."""

from __future__ import annotations

import time

import pytest

from magpie_hf.errors import ConfigError
from magpie_hf.steps.language import Language

TEXTS = {
    "en": "How can I improve the performance of my Python code when processing large files?",
    "de": "Wie kann ich die Leistung meines Python-Codes bei der Verarbeitung großer Dateien verbessern?",
    "fr": "Comment puis-je améliorer les performances de mon code Python lors du traitement de gros fichiers ?",
    "es": "¿Cómo puedo mejorar el rendimiento de mi código Python al procesar archivos grandes?",
    "zh": "处理大文件时，我如何提高 Python 代码的性能？",
    "ja": "大きなファイルを処理するときに、Python コードのパフォーマンスを向上させるにはどうすればよいですか？",
}


@pytest.fixture(scope="module")
def step():
    s = Language()
    s.load()
    return s


def test_detects_iso_639_1_lowercase(step):
    batch = {"instruction": list(TEXTS.values()), "id": list(range(len(TEXTS)))}
    out = step.process(batch, seed=0)
    assert out["language"] == list(TEXTS)
    assert out["id"] == batch["id"]


def test_empty_and_missing_text_is_null_and_counted(step):
    step.stats.clear()
    out = step.process({"instruction": ["", "   ", None, TEXTS["en"]]}, seed=0)
    assert out["language"] == [None, None, None, "en"]
    assert step.stats["empty_input"] == 3


def test_uppercase_columns_and_restricted_languages():
    s = Language(input_column="response", output_column="response_language", uppercase=True, languages=("en", "de"))
    s.load()
    out = s.process({"response": [TEXTS["de"], TEXTS["en"]]}, seed=0)
    assert out["response_language"] == ["DE", "EN"]
    with pytest.raises(ValueError, match="ISO 639-1"):
        Language(languages=("xx",)).load()


def test_throughput_many_rows(step):
    rows = [TEXTS[k] for k in TEXTS] * 100
    start = time.perf_counter()
    out = step.process({"instruction": rows}, seed=0)
    rate = len(rows) / (time.perf_counter() - start)
    print(f"lingua low-accuracy, all languages: {rate:.0f} rows/s")
    assert out["language"][: len(TEXTS)] == list(TEXTS)
    assert rate > 50


# -- language-targeted generation (--language) ----------------------------------------------------
def test_target_language_rows_are_counted():
    s = Language(target="DE")
    s.load()
    out = s.process({"instruction": [TEXTS["de"], TEXTS["en"], TEXTS["de"], ""]}, seed=0)
    assert out["language"] == ["de", "en", "de", None]
    assert s.stats["target_language_rows"] == 2
    with pytest.raises(ValueError, match="ISO 639-1"):
        Language(target="german")


def test_every_built_in_prompt_is_written_in_its_language(step):
    from magpie_hf.prompts.languages import LANGUAGE_SYSTEM_PROMPTS, LANGUAGE_TASK_PROMPTS
    from magpie_hf.prompts.tasks import TASK_PROMPTS

    assert {"zh", "de", "fr", "es", "ja"} <= set(LANGUAGE_SYSTEM_PROMPTS) and set(LANGUAGE_TASK_PROMPTS) <= set(LANGUAGE_SYSTEM_PROMPTS)
    texts = dict(LANGUAGE_SYSTEM_PROMPTS)
    for code, prompts in LANGUAGE_TASK_PROMPTS.items():
        assert set(prompts) <= set(TASK_PROMPTS)
        texts.update({f"{code}/{key}": text for key, text in prompts.items()})
    detected = step.process({"instruction": list(texts.values())}, seed=0)["language"]
    assert detected == [key.split("/")[0] for key in texts]


def test_localized_task_prompts():
    from magpie_hf.prompts.languages import LANGUAGE_SYSTEM_PROMPTS, LANGUAGE_TASK_PROMPTS, localize_task_prompts
    from magpie_hf.prompts.tasks import TASK_PROMPTS

    mine = "Du hilfst bei Kochrezepten."
    out = localize_task_prompts({"math": TASK_PROMPTS["math"], "planning": TASK_PROMPTS["planning"], "cooking": mine}, "de")
    assert out["math"] == LANGUAGE_TASK_PROMPTS["de"]["math"]  # the language's own prompt
    assert out["planning"] == TASK_PROMPTS["planning"] + "\n\n" + LANGUAGE_SYSTEM_PROMPTS["de"]  # none: English + language
    assert out["cooking"] == mine  # the user's own prompt is kept
    with pytest.raises(ValueError, match="--system_prompt"):
        localize_task_prompts({"planning": TASK_PROMPTS["planning"]}, "ko")  # no built-in Korean prompt


def _pro():
    from tests.conftest import load_recipe

    return load_recipe("magpie_pro").PRO


def test_language_flag_steers_step_one_tags_and_filters():
    from magpie_hf.prompts.languages import LANGUAGE_SYSTEM_PROMPTS, LANGUAGE_TASK_PROMPTS
    from magpie_hf.recipe import generation_steps, parse_recipe, tagging_steps
    from magpie_hf.steps import Filter

    config = parse_recipe(_pro(), ["--preset", "cpu", "--language", "zh", "--keep_language_only"])
    steps = generation_steps(config)
    assert [type(s).__name__ for s in steps] == ["MagpieInstructions", "Language", "Filter", "Responses"]
    assert steps[0].system_prompt == LANGUAGE_SYSTEM_PROMPTS["zh"] and steps[1].target == "zh"
    assert isinstance(steps[2], Filter) and [str(c) for c in steps[2].conditions] == ["language == 'zh'"]
    assert "Language" not in [type(s).__name__ for s in tagging_steps(config)]  # tagged once, after step 1
    only = generation_steps(config, responses=False)
    assert [type(s).__name__ for s in only] == ["MagpieInstructions", "Language", "Filter"]

    task = parse_recipe(_pro(), ["--preset", "cpu", "--language", "ja", "--task", "math"])
    first = generation_steps(task)[0]
    assert type(first).__name__ == "TaskControlledInstructions" and first.system_prompt is None
    assert first.task.prompts == {"math": LANGUAGE_TASK_PROMPTS["ja"]["math"]}
    own = parse_recipe(_pro(), ["--preset", "cpu", "--language", "ko", "--system_prompt", "당신은 한국어 사용자를 돕습니다."])
    assert generation_steps(own)[0].system_prompt.startswith("당신은")
    assert [type(s).__name__ for s in generation_steps(own)][1] == "Language"  # tagged, no filter
    plain = parse_recipe(_pro(), ["--preset", "cpu"])
    assert [type(s).__name__ for s in generation_steps(plain)] == ["MagpieInstructions", "Responses"]
    assert "Language" in [type(s).__name__ for s in tagging_steps(plain)]


@pytest.mark.parametrize("argv, message", [
    (["--keep_language_only"], "needs --language"),
    (["--language", "xx"], "ISO 639-1"),
    (["--language", "ko"], "No built-in system prompt"),
    (["--language", "de", "--pre_query_template", "<|im_start|>user\n"], "bypasses"),
])
def test_bad_language_settings_stop_before_loading(argv, message):
    from magpie_hf.recipe import parse_recipe

    with pytest.raises(ConfigError, match=message):
        parse_recipe(_pro(), ["--preset", "cpu", *argv])


def test_target_language_share_in_run_info_and_card():
    from magpie_hf.hub.card import _environment, templates_dir
    from magpie_hf.recipe import parse_recipe, run_info

    config = parse_recipe(_pro(), ["--preset", "cpu", "--language", "de", "--keep_language_only"])
    manifest = {"stages": [
        {"stage": "00-magpie_instructions", "step": "MagpieInstructions", "rows_in": 40, "rows_out": 40, "stats": {}},
        {"stage": "01-language", "step": "Language", "rows_in": 40, "rows_out": 40, "stats": {"target_language_rows": 10}},
        {"stage": "02-keep_language", "step": "Filter", "rows_in": 40, "rows_out": 10, "stats": {}},
    ]}
    info = run_info(config, manifest)
    assert info["language_target"] == {
        "language": "de", "system_prompt": config.instruction_system_prompt(), "keep_language_only": True,
        "rows_tagged": 40, "rows_in_language": 10, "share": 0.25, "rows_removed": 30,
    }
    text = _environment(str(templates_dir())).get_template("_provenance.md.j2").render(run=info)
    assert "### Target language" in text and "**25.0%** of the 40 generated instructions are in `de`" in text
    assert "30 rows in other languages were removed" in text
