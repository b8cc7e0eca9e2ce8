"""Language tag of each instruction with lingua (ships its models: nothing is downloaded).

``language`` holds the ISO 639-1 code in lower case (``"en"``, ``"zh"``); null for an empty text or
when lingua cannot decide (counted in ``step.stats["undetected"]``). The published Magpie datasets
use upper case (``"EN"``); pass ``uppercase=True`` for their filter code.

With ``target="de"`` (language-targeted generation, ``--language de``) the step also counts the rows
tagged as the target in ``stats["target_language_rows"]``; the stage report's ``rows_in`` is the
denominator of the target-language share that the dataset card shows.

Example:
    >>> from magpie_hf.steps.language import Language
    >>> step = Language()
    >>> step.load()
    >>> step.process({"instruction": ["How do I bake bread?", "Wie backe ich Brot?", ""]}, seed=0)["language"]
    ['en', 'de', None]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from magpie_hf.steps.base import STRING, Batch, Features, Step


@dataclasses.dataclass(kw_only=True)
class Language(Step):
    """Detect the language of ``input_column`` into ``output_column`` (ISO 639-1, lower case).

    ``languages`` restricts the candidates (ISO 639-1 codes, e.g. ``("en", "zh", "fr")``): faster and
    more accurate when you know them. ``low_accuracy`` uses lingua's fast mode (trigrams only), good
    for instructions of a sentence or more; turn it off for very short texts.
    """

    input_column: str = "instruction"
    output_column: str = "language"
    languages: Sequence[str] | None = None
    low_accuracy: bool = True
    uppercase: bool = False
    #: ISO 639-1 code whose rows are counted in ``stats["target_language_rows"]``
    target: str | None = None
    batch_size: int = 1000

    def __post_init__(self) -> None:
        super().__post_init__()
        self._detector: Any = None
        if self.target is not None:
            from magpie_hf.prompts.languages import check_language

            self.target = check_language(self.target)

    @property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.input_column,)

    def output_features(self) -> Features:
        return {self.output_column: STRING}

    def load(self) -> None:
        from lingua import IsoCode639_1, LanguageDetectorBuilder

        if self.languages:
            try:
                codes = [getattr(IsoCode639_1, code.upper()) for code in self.languages]
            except AttributeError as err:
                raise ValueError(f"Unknown ISO 639-1 code in languages={list(self.languages)}: {err}") from err
            builder = LanguageDetectorBuilder.from_iso_codes_639_1(*codes)
        else:
            builder = LanguageDetectorBuilder.from_all_languages()
        if self.low_accuracy:
            builder = builder.with_low_accuracy_mode()
        # load every model now (once), not lazily inside the parallel detection
        self._detector = builder.with_preloaded_language_models().build()

    def unload(self) -> None:
        self._detector = None

    def process(self, batch: Batch, *, seed: int) -> Batch:
        if self._detector is None:
            self.load()
        texts = batch[self.input_column]
        todo = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
        codes: list[str | None] = [None] * len(texts)
        detected = self._detector.detect_languages_in_parallel_of([texts[i] for i in todo])
        for i, language in zip(todo, detected):
            if language is None:
                self.stats["undetected"] += 1
                continue
            code = language.iso_code_639_1.name
            codes[i] = code if self.uppercase else code.lower()
        self.stats["empty_input"] += len(texts) - len(todo)
        if self.target is not None:
            self.stats["target_language_rows"] += sum(1 for c in codes if c is not None and c.lower() == self.target)
        return {**batch, self.output_column: codes}
