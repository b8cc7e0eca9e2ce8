"""Language tags with lingua (models ship with the package; nothing is downloaded)."""

from __future__ import annotations

import time

import pytest

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
