"""Task-controlled Magpie instructions (paper, Appendix A.2): :class:`TaskControlledInstructions` writes each
row's instruction under the task system prompt that :class:`~magpie_hf.prompts.tasks.TaskMix` picks for it
(prompts in :mod:`magpie_hf.prompts.tasks`), with optional instruction post-processing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Sequence

from magpie_hf.prompts.tasks import TaskMix
from magpie_hf.seeds import row_seeds
from magpie_hf.steps.base import STRING, Batch, Features, select_rows
from magpie_hf.steps.generate import MagpieInstructions, conversation_id
from magpie_hf.steps.postprocess import InstructionFilter, apply_filters

if TYPE_CHECKING:
    from magpie_hf.templates import ChatTemplates

__all__ = ["TaskControlledInstructions"]


@dataclasses.dataclass(kw_only=True)
class TaskControlledInstructions(MagpieInstructions):
    """:class:`~magpie_hf.steps.MagpieInstructions` with a task system prompt per row and post-processing.

    ``task`` (a :class:`TaskMix`, a key such as ``"math"``, a ``"math=0.5,coding=0.5"`` string or a weight
    mapping) picks each row's system prompt; the rows of one key share one derived chat template and
    one engine call per decoding setting, and every row samples from its own seed (the same seed it
    would have without task control). The chosen key is written to ``system_prompt_key`` and the
    prompt itself to ``gen_input_configs.system_prompt``. Bad weights or keys fail at construction,
    before any model loads. Templates that reject a system message (Gemma) fail at ``load()`` with a
    clear error. ``task=None`` gives plain Magpie instructions.

    ``postprocess`` is a sequence of :mod:`magpie_hf.steps.postprocess` filters applied to every instruction;
    dropped rows are counted as ``dropped_<filter name>``.

    Example:
        >>> from magpie_hf.engines import EngineConfig
        >>> from magpie_hf.steps.postprocess import StripTrailingRoleWord
        >>> step = TaskControlledInstructions(engine=EngineConfig.embedded(), num_rows=100,
        ...                                   task="math=0.5,coding=0.5", postprocess=[StripTrailingRoleWord()])
    """

    task: TaskMix | str | Mapping[str, float] | None = None
    postprocess: Sequence[InstructionFilter] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task is not None:
            self.task = TaskMix.from_spec(self.task)
            if self.system_prompt is not None:
                raise ValueError("Give either task= (a system prompt per row) or system_prompt=, not both.")
            if self.pre_query_template is not None:
                raise ValueError(
                    "task= needs the chat template to insert each task's system prompt; it cannot be combined "
                    "with an explicit pre_query_template."
                )
        self.postprocess = tuple(self.postprocess)
        for f in self.postprocess:
            if not callable(f) or not getattr(f, "name", None):
                raise TypeError(f"postprocess entries must be InstructionFilter callables with a name, got {f!r}.")
        self._key_templates: dict[str, "ChatTemplates"] = {}

    def output_features(self) -> Features:
        return {**super().output_features(), "system_prompt_key": STRING}

    def instruction_filters(self) -> tuple[Any, ...]:
        """The step's own rule filters, then ``postprocess`` (recorded in ``gen_input_configs``)."""
        return (*super().instruction_filters(), *self.postprocess)

    def load(self) -> None:
        from magpie_hf.templates import ChatTemplateError, derive_templates

        super().load()
        if isinstance(self.task, TaskMix):
            assert self._engine is not None
            for key in self.task.keys:
                try:
                    self._key_templates[key] = derive_templates(
                        self._engine.tokenizer,
                        system_prompt=self.task.prompts[key],
                        keep_default_system_prompt=self.keep_default_system_prompt,
                        chat_template_kwargs=self.chat_template_kwargs,
                    )
                except ChatTemplateError as err:
                    raise ChatTemplateError(
                        f"Task control puts the {key!r} prompt in a system message, and the chat template of "
                        f"{self._model_name()} cannot take one: {err}"
                    ) from err

    def unload(self) -> None:
        super().unload()
        self._key_templates = {}

    def generate(self, *, offset: int, num_rows: int, seed: int) -> Batch:
        if not isinstance(self.task, TaskMix):
            batch = super().generate(offset=offset, num_rows=num_rows, seed=seed)
            batch["system_prompt_key"] = [None] * len(batch["conversation_id"])
            context = self.system_prompt if self.system_prompt is not None else self._default_block()
            return self._postprocess(batch, [context] * len(batch["conversation_id"]))
        assert self._engine is not None and self._assignment is not None, "call load() first"
        rows = list(range(offset, min(offset + num_rows, self.num_rows)))
        seeds = dict(zip(rows, row_seeds(seed, len(rows))))  # a row's seed does not depend on its task key
        groups: dict[str, list[int]] = {}
        for row in rows:
            groups.setdefault(self.task.key_for_row(row, self.seed), []).append(row)
        by_row: dict[str, dict[str, Any]] = {}
        for key, members in sorted(groups.items()):
            part = self._sample_rows(members, seeds, self._key_templates[key], self.task.prompts[key])
            for values in zip(*part.values()):
                record = dict(zip(part, values))
                record["system_prompt_key"] = key
                by_row[record["conversation_id"]] = record
        order = [conversation_id(self.seed, row) for row in rows]
        batch: Batch = {name: [by_row[i][name] for i in order if i in by_row] for name in self.outputs}
        return self._postprocess(batch, [self.task.prompts[k] for k in batch["system_prompt_key"]])

    # -- internals -----------------------------------------------------------------------------
    def _default_block(self) -> str | None:
        return self._templates.default_system_block or None if self._templates is not None else None

    def _postprocess(self, batch: Batch, system_prompts: list[str | None]) -> Batch:
        if not self.postprocess:
            return batch
        keep = []
        for i, (text, system) in enumerate(zip(batch["instruction"], system_prompts)):
            cleaned, dropped_by = apply_filters(text, self.postprocess, system_prompt=system)
            if dropped_by is not None:
                self.stats[f"dropped_{dropped_by}"] += 1
            else:
                batch["instruction"][i] = cleaned
            keep.append(dropped_by is None)
        return select_rows(batch, keep)
