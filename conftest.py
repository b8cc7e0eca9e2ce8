"""Collection rules.

Where vLLM is not installed (the main environment: CI runs vLLM in ``.venv-vllm``, ``make test-vllm``):

- :mod:`magpie_hf.engines.vllm_logits` subclasses vLLM's logits-processor interfaces at import time, so its
  doctests are not collected (its V2 path is tested against the stand-in in ``tests/test_vllm_adapter.py``,
  both paths on real vLLM in ``tests/real_vllm/``);
- ``tests/real_vllm/`` (real vLLM) is not collected.
"""

from magpie_hf.hardware import vllm_installed

collect_ignore = [] if vllm_installed() else ["magpie_hf/engines/vllm_logits.py", "tests/real_vllm"]
