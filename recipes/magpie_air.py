"""Magpie-Air: the Magpie-Pro recipe with Llama-3-8B-Instruct and the Air decoding mixture
(arXiv 2406.08464, Table 6: 3M rows over 12 temperature/top_p settings).

    python recipes/magpie_air.py --preset cpu
    python recipes/magpie_air.py --num-rows 3000000 --tensor-parallel-size 1
"""

from __future__ import annotations

import sys

from magpie_pro import main

from magpie_hf.recipe import RecipeDefaults
from magpie_hf.steps import AIR_MIXTURE

AIR = RecipeDefaults(
    name="magpie_air",
    model="meta-llama/Meta-Llama-3-8B-Instruct",
    num_rows=3_000_000,
    mixture=AIR_MIXTURE,
    tensor_parallel_size=1,
)

if __name__ == "__main__":
    sys.exit(main(defaults=AIR))
