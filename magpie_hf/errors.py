"""The errors magpie_hf raises, as one family: every one derives from :class:`MagpieError`, and each keeps the
built-in parent that callers already catch (a bad value is a ``ValueError``, a failed run a ``RuntimeError``).

Library code raises these; only the command line (:mod:`magpie_hf.cli`) and the recipes' ``main`` turn one into a
message and an exit status. Each class stays importable from the module that raises it.

Example:
    >>> issubclass(ChatTemplateError, MagpieError) and issubclass(ChatTemplateError, ValueError)
    True
    >>> sorted(cls.__name__ for cls in MagpieError.__subclasses__())[:3]
    ['CardTemplateNotFound', 'ChatTemplateError', 'ColumnTypeError']
"""

from __future__ import annotations


class MagpieError(Exception):
    """Base of every error magpie_hf raises on purpose; its message says what to change."""


# -- settings and input --------------------------------------------------------------------------------
class ConfigError(MagpieError, ValueError):
    """A configuration file or flag that cannot be used; the message says what to change."""


class ChatTemplateError(MagpieError, ValueError):
    """The tokenizer's chat template cannot give what Magpie needs; the message says the way out."""


class MissingColumnsError(MagpieError, ValueError):
    """A step needs columns the previous stage did not produce."""


class ColumnTypeError(MagpieError, TypeError):
    """A step wrote a column it does not declare, or not one it declares."""


class EmbeddedModelMissing(MagpieError, RuntimeError):
    """An embedded model package is not installed."""


# -- answers a model gave (recorded per row: null + reason + counted) ----------------------------------
class JudgeError(MagpieError, ValueError):
    """A judge answer that cannot be used; the message is recorded in the error column."""


class VerdictError(MagpieError, ValueError):
    """A guard answer that is not ``safe`` / ``unsafe\\n<codes>``."""


class OpenAIServerError(MagpieError, RuntimeError):
    """The server kept failing after every retry, or refused the engine's settings (key, model, URL)."""


# -- runs and their output folder ----------------------------------------------------------------------
class PipelineMismatchError(MagpieError, RuntimeError):
    """The output directory holds a run made with other settings."""


class RunLockedError(MagpieError, RuntimeError):
    """Another live run holds the output directory."""


class StageFailedError(MagpieError, RuntimeError):
    """A stage stopped because a worker failed; the message holds the worker's own error."""


class ShardsNotVisibleError(StageFailedError):
    """Shards a stage's workers reported written are missing or damaged where the driver reads them."""


# -- publishing ----------------------------------------------------------------------------------------
class CardTemplateNotFound(MagpieError, FileNotFoundError):
    """The ``hub_cards`` templates are neither in the source tree nor in the installed package."""


class PublishError(MagpieError, RuntimeError):
    """Publishing failed; the local dataset folder is untouched."""


class HubAuthError(PublishError):
    """The Hub refused the token (HTTP 401/403)."""


class TagExistsError(PublishError):
    """The version tag already exists on the repository (and ``force`` was not given)."""


class CommitConflictError(PublishError):
    """Someone else committed to the branch while this publish ran."""
