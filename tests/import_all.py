"""Import every module of magpie_hf (``make test-floor`` runs it on the floor Python version): a module that uses
a newer Python's API at import time fails here. Modules that need an extra that is not installed (ray,
distilabel, trl, vllm, ...) are reported and skipped."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import magpie_hf

#: the optional extras' top-level modules (pyproject.toml optional-dependencies)
OPTIONAL = {"ray", "distilabel", "trl", "peft", "deepspeed", "vllm", "faiss_gpu", "flash_attn", "bitsandbytes"}


def main() -> int:
    imported, skipped = 0, []
    for info in pkgutil.walk_packages(magpie_hf.__path__, "magpie_hf."):
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as err:
            if (err.name or "").split(".")[0] not in OPTIONAL:
                raise
            skipped.append(f"{info.name} (needs {err.name})")
            continue
        imported += 1
    print(f"Python {sys.version.split()[0]}: {imported} modules of magpie_hf imported"
          + (f"; skipped: {', '.join(skipped)}" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
