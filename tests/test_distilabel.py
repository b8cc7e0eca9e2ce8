"""magpie_hf.distilabel: magpie_hf steps inside a real distilabel Pipeline."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys

import pytest

pytest.importorskip("distilabel")
os.environ.setdefault("DISTILABEL_LOG_LEVEL", "WARNING")
# distilabel 1.5.3 reads ``model_fields`` from instances, which pydantic >= 2.11 deprecates
pytestmark = pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211")

from distilabel.pipeline import Pipeline as DistilabelPipeline  # noqa: E402

from magpie_hf.distilabel import (  # noqa: E402
    MagpieDistilabelGeneratorStep,
    MagpieDistilabelGlobalStep,
    MagpieDistilabelStep,
    to_distilabel,
)
from magpie_hf.engines import EngineConfig  # noqa: E402
from magpie_hf.pipeline import Pipeline  # noqa: E402
from magpie_hf.steps import GeneratorStep, MagpieInstructions  # noqa: E402
from magpie_hf.steps.base import STRING  # noqa: E402
from magpie_hf.steps.filters import Condition, Filter  # noqa: E402
from magpie_hf.steps.language import Language  # noqa: E402

TEXTS = ["How do I bake bread?", "Wie backe ich Brot?", "Comment faire du pain ?", "What is a monad?", "Was ist ein Monad?"]


@dataclasses.dataclass(kw_only=True)
class Questions(GeneratorStep):
    """A cheap generator: row i is TEXTS[i % len(TEXTS)]; rows at odd indices past 4 are dropped."""

    def output_features(self):
        return {"conversation_id": STRING, "instruction": STRING}

    def generate(self, *, offset, num_rows, seed):
        rows = [i for i in range(offset, offset + num_rows) if not (i > 4 and i % 2)]
        self.stats["dropped"] += num_rows - len(rows)
        return {"conversation_id": [f"q{i}" for i in rows], "instruction": [TEXTS[i % len(TEXTS)] for i in rows]}


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """distilabel points the root logger at a queue that it closes after the run; put ours back."""
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


def _build(cache_dir, seed=0):
    with DistilabelPipeline(name="magpie-hf-test", cache_dir=str(cache_dir)) as pipeline:
        questions = to_distilabel(Questions(num_rows=8), batch_size=3, seed=seed)
        language = to_distilabel(Language(languages=("en", "de", "fr")), input_batch_size=2)
        english = to_distilabel(Filter(conditions=[Condition("language", "==", "en")]))
        questions >> language >> english
    return pipeline, (questions, language, english)


def test_wrappers_declare_columns_and_serialize(tmp_path):
    _, (questions, language, english) = _build(tmp_path)
    assert isinstance(questions, MagpieDistilabelGeneratorStep) and questions.outputs == ["conversation_id", "instruction"]
    assert isinstance(language, MagpieDistilabelStep) and language.inputs == ["instruction"] and language.outputs == ["language"]
    # columns computed from the wrapped step's configuration
    assert to_distilabel(Language(output_column="lang", input_column="response"), name="l3").outputs == ["lang"]
    assert isinstance(english, MagpieDistilabelGlobalStep)
    assert (questions.name, language.name, english.name) == ("questions", "language", "filter")
    dump = language.dump()
    assert "step" not in dump and '"languages": ["en", "de", "fr"]' in dump["step_config"]
    # the wrapped step's settings are part of the signature distilabel caches on
    other = to_distilabel(Language(languages=("en",)), name="language2", input_batch_size=2)
    assert to_distilabel(Language(languages=("en", "de", "fr")), input_batch_size=2).signature == language.signature
    assert other.signature != language.signature
    with pytest.raises(TypeError, match="magpie_hf step"):
        to_distilabel("not a step")


@pytest.mark.slow
def test_runs_in_a_distilabel_pipeline_and_resumes_from_cache(tmp_path):
    pipeline, _ = _build(tmp_path)
    distiset = pipeline.run(use_cache=False)
    rows = distiset["default"]["train"].to_list()
    assert [(r["conversation_id"], r["language"]) for r in rows] == [("q0", "en"), ("q3", "en")]
    assert set(rows[0]) == {"conversation_id", "instruction", "language"}

    # a second run with the same steps is served from distilabel's cache (the wrapped steps are restored)
    pipeline, _ = _build(tmp_path)
    again = pipeline.run(use_cache=True)
    assert again["default"]["train"].to_list() == rows
    restored = pipeline.dag.get_step("language")["step"]
    assert isinstance(restored.step, Language) and restored.step.languages == ("en", "de", "fr")


# distilabel forks its step processes. libgomp (torch's CPU thread pool) is not fork-safe: a child
# forked after the parent ran a model hangs in its first matrix product. This pytest process has
# run the embedded model already, so the distilabel pipeline runs in a fresh interpreter.
_DISTILABEL_MAGPIE = """
import json, sys
from distilabel.pipeline import Pipeline
from magpie_hf.distilabel import to_distilabel
from magpie_hf.engines import EngineConfig
from magpie_hf.steps import MagpieInstructions

step = MagpieInstructions(engine=EngineConfig.embedded(), num_rows=4, max_tokens=12, drop_truncated=False)
with Pipeline(name="magpie-hf-generate", cache_dir=sys.argv[1]) as pipeline:
    # batch_size equal to the local shard_size gives each batch the local shard's seed
    to_distilabel(step, batch_size=2, seed=0)
rows = pipeline.run(use_cache=False)["default"]["train"].to_list()
print("ROWS=" + json.dumps(rows, default=str))
"""


def _instructions():
    return MagpieInstructions(engine=EngineConfig.embedded(), num_rows=4, max_tokens=12, drop_truncated=False)


@pytest.mark.slow
def test_magpie_instructions_in_distilabel_match_the_local_pipeline(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", _DISTILABEL_MAGPIE, str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "DISTILABEL_LOG_LEVEL": "WARNING"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("ROWS="))
    rows = json.loads(line[len("ROWS="):])
    local = Pipeline([_instructions()], tmp_path / "local", shard_size=2, progress=False).run().to_list()
    assert len(rows) == len(local) == 4
    assert [r["conversation_id"] for r in rows] == [r["conversation_id"] for r in local]
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in local]
    assert {"gen_input_configs", "instruction_num_tokens", "instruction_finish_reason"} <= set(rows[0])
