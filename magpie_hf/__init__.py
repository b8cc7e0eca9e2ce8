"""magpie_hf: the Magpie alignment-data method (arXiv 2406.08464) as Hugging Face pipeline steps."""

from magpie_hf.utils import deprecation as _deprecation

__version__ = "0.1.0"

_deprecation.install()  # the module paths of the old layout keep working for one release, with a warning
