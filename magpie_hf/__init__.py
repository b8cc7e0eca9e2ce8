"""magpie_hf: the Magpie alignment-data method (arXiv 2406.08464) as Hugging Face pipeline steps."""

__version__ = "0.1.0"
