"""The paper's label sets (Section 3, Appendix B): one home for every step, filter and card that uses them.

Example:
    >>> ORDINAL_SCALES["difficulty"].index("medium")
    2
    >>> len(TASK_CATEGORIES)
    12
"""

from __future__ import annotations

#: task categories of the paper's judge (Llama-3-8B-Instruct)
TASK_CATEGORIES: tuple[str, ...] = (
    "Information seeking",
    "Reasoning",
    "Planning",
    "Editing",
    "Coding & Debugging",
    "Math",
    "Role playing",
    "Data analysis",
    "Creative writing",
    "Advice seeking",
    "Brainstorming",
    "Others",
)
#: input quality, worst to best
INPUT_QUALITIES: tuple[str, ...] = ("very poor", "poor", "average", "good", "excellent")
#: input difficulty, easiest to hardest
DIFFICULTIES: tuple[str, ...] = ("very easy", "easy", "medium", "hard", "very hard")
#: label columns whose values have an order (filters compare them by rank; cards plot them in order)
ORDINAL_SCALES: dict[str, tuple[str, ...]] = {"input_quality": INPUT_QUALITIES, "difficulty": DIFFICULTIES}
