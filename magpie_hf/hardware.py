"""What a step needs to run (GPUs, CPUs) and what the machines that run it have.

A step that runs a model declares its needs with :meth:`magpie_hf.steps.Step.resources`: a vLLM
engine with tensor parallelism ``N`` needs ``N`` GPUs, a transformers model, reward model or guard
placed on CUDA needs one, an OpenAI-compatible server needs none. The answer depends on where the
step runs (``auto`` picks vLLM only where CUDA and vllm exist), so steps are asked with the
:class:`Hardware` of the workers: :meth:`Hardware.local` for this machine, or what a Ray cluster
offers. Executors reserve exactly :class:`Resources` per worker.

Example:
    >>> Hardware(cuda=True, vllm=True).gpu_backend_available
    True
    >>> Resources(gpus=2).merge(Resources(gpus=1))
    Resources(gpus=2, cpus=1.0)
"""

from __future__ import annotations

import dataclasses
import importlib.util


@dataclasses.dataclass(frozen=True)
class Hardware:
    """What the workers of a run have: CUDA GPUs, and the vllm package."""

    cuda: bool = False
    vllm: bool = False

    @property
    def gpu_backend_available(self) -> bool:
        """Whether ``auto`` engines pick vLLM here."""
        return self.cuda and self.vllm

    @classmethod
    def local(cls) -> "Hardware":
        """This process's machine."""
        return cls(cuda=_cuda_available(), vllm=vllm_installed())


def vllm_installed() -> bool:
    """Whether the vllm package can be imported here (a plain folder named ``vllm`` on ``sys.path``, which
    Python would import as an empty namespace package, does not count)."""
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin not in (None, "namespace")


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one worker running a step reserves: GPUs (may be fractional) and CPUs."""

    gpus: float = 0
    cpus: float = 1.0

    def __post_init__(self) -> None:
        if self.gpus < 0 or self.cpus < 0:
            raise ValueError(f"Resources must be >= 0, got gpus={self.gpus} cpus={self.cpus}")

    def merge(self, other: "Resources") -> "Resources":
        """What a worker that runs both needs (the larger of each)."""
        return Resources(gpus=max(self.gpus, other.gpus), cpus=max(self.cpus, other.cpus))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())
