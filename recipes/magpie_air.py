"""Magpie-Air: the Magpie-Pro recipe with Llama-3-8B-Instruct and the Air decoding mixture
(arXiv 2406.08464, Table 6: 3M rows over 12 temperature/top_p settings).

    python recipes/magpie_air.py --preset cpu
    python recipes/magpie_air.py --num_rows 3000000
"""

from __future__ import annotations

import dataclasses
import sys

from magpie_pro import PRO, main

AIR = dataclasses.replace(
    PRO,
    name="magpie_air",
    description=__doc__,
    paper={"model": "meta-llama/Meta-Llama-3-8B-Instruct", "num_rows": 3_000_000, "mixture": "air",
           "tensor_parallel_size": 1, "newline_stop": True},
)

if __name__ == "__main__":
    sys.exit(main(recipe=AIR))
