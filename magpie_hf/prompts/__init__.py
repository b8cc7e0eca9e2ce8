"""Prompt data and the pure functions over it: task-control system prompts (:mod:`~magpie_hf.prompts.tasks`),
language steering (:mod:`~magpie_hf.prompts.languages`) and the paper's label sets (:mod:`~magpie_hf.prompts.labels`).
No model, no step: the steps that use them live in :mod:`magpie_hf.steps`."""
