"""Logging of the command-line tools and recipes: our own messages at INFO, every other library's at WARNING,
and each line passed through :func:`magpie_hf.utils.redaction.redact`, so no log line carries a secret (an HTTP
client logging request URLs, a library echoing its settings).

Example:
    >>> import logging
    >>> setup_logging()
    >>> logging.getLogger("magpie_hf").isEnabledFor(logging.INFO)
    True
    >>> logging.getLogger("httpx").isEnabledFor(logging.INFO)  # at WARNING, or quieter where a library chose so
    False
"""

from __future__ import annotations

import logging

from magpie_hf.utils.redaction import redact

FORMAT = "%(levelname)s %(name)s: %(message)s"
#: the loggers that speak at the chosen level; every other one (httpx, openai, transformers, datasets, ...) at WARNING
OWN_LOGGERS = ("magpie_hf", "__main__")


class RedactingFilter(logging.Filter):
    """Masks secrets in a record's message (its arguments merged in first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def setup_logging(level: int = logging.INFO) -> None:
    """Log our messages at ``level`` and other libraries' at WARNING, every line redacted."""
    logging.basicConfig(level=logging.WARNING, format=FORMAT)
    # basicConfig does nothing where the root logger already has a handler (an earlier setup, a notebook,
    # pytest): set the root level here too, so other libraries stay at WARNING whoever configured first
    logging.getLogger().setLevel(logging.WARNING)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
