"""``python -m magpie_hf.cli``: the ``magpie-hf`` command."""

import sys

from magpie_hf.cli.app import main

if __name__ == "__main__":  # importing the module (a tool that walks the package) runs nothing
    sys.exit(main())
