"""``python -m magpie_hf.cli``: the ``magpie-hf`` command."""

import sys

from magpie_hf.cli.app import main

sys.exit(main())
