"""Helpers every layer may use: secrets kept out of output (:mod:`~magpie_hf.utils.redaction`), the embedded
test models (:mod:`~magpie_hf.utils.embedded`), logging (:mod:`~magpie_hf.utils.logs`), settings as plain data
(:mod:`~magpie_hf.utils.serialization`) and the old module paths (:mod:`~magpie_hf.utils.deprecation`).
Nothing here imports another part of magpie_hf (but :mod:`magpie_hf.errors`)."""
