"""Collection rules for the package's doctests (``--doctest-modules`` over ``magpie_hf/``).

:mod:`magpie_hf.engines.vllm_logits` subclasses vLLM's logits-processor interface at import time, so it
can only be imported where vLLM is installed; elsewhere its doctests are not collected (its behaviour is
tested against the stand-in in ``tests/test_vllm_adapter.py``).
"""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("vllm") else ["magpie_hf/engines/vllm_logits.py"]
