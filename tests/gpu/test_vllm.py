"""vLLM engine smoke test on a CUDA GPU with a small model (skipped without CUDA or vllm).

Run on a GPU box:  python -m pytest tests/gpu/test_vllm.py -q
The model defaults to HuggingFaceTB/SmolLM2-135M-Instruct (downloaded by vLLM); override it with
MAGPIE_VLLM_TEST_MODEL=/path/or/hub-id.
"""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("vllm")

from magpie_hf.engines import EngineConfig, SamplingConfig, load_engine, resolve_backend  # noqa: E402

pytestmark = pytest.mark.gpu

MODEL = os.environ.get("MAGPIE_VLLM_TEST_MODEL", "HuggingFaceTB/SmolLM2-135M-Instruct")
PRE_QUERY = "<|im_start|>user\n"


@pytest.fixture(scope="module")
def engine():
    config = EngineConfig(MODEL, backend="vllm", gpu_memory_utilization=0.3, max_model_len=2048)
    engine = load_engine(config)
    yield engine
    engine.close()


def test_auto_picks_vllm_on_gpu():
    assert resolve_backend(EngineConfig(MODEL)) == "vllm"


def test_n_seed_stop_and_length(engine):
    sampling = SamplingConfig(temperature=1.0, max_tokens=32, n=3, seed=0, stop=("<|im_end|>",))
    out = engine.generate([PRE_QUERY, PRE_QUERY], sampling)
    assert [len(c) for c in out] == [3, 3]
    assert out == engine.generate([PRE_QUERY, PRE_QUERY], sampling)
    assert out[0] != out[1]  # identical prompts get distinct seeds
    for c in (c for cs in out for c in cs):
        assert "<|im_end|>" not in c.text
        assert c.finish_reason in ("stop", "length")
        if c.finish_reason == "length":
            assert c.num_tokens == 32


def test_json_schema_is_enforced(engine):
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    prompt = "<|im_start|>user\nWhat is 2+2? Reply in JSON.<|im_end|>\n<|im_start|>assistant\n"
    out = engine.generate([prompt], SamplingConfig(temperature=0, max_tokens=32, json_schema=schema))[0][0]
    assert isinstance(json.loads(out.text)["answer"], int)
