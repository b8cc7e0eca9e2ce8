"""One progress bar per stage: rows done, rows/s and generated tokens/s.

Every step reports through one callback, ``progress(num_finished, num_new_tokens)``, that the
runner installs as ``step.progress_callback`` and steps hand to their engines: engines call it as
completions finish, steps without an engine (embeddings, reward models) call it as rows finish.
The runner brackets each batch (:meth:`StageProgress.batch_started`, :meth:`StageProgress.batch_done`):
the bar never moves past a batch's rows while it runs (an engine reports completions, and a row
may have several), and is topped up to them when it ends, so the bar counts rows whatever the
step reports. On Ray the driver moves
the bar as shards finish, from the shards' reports.

Example:
    >>> bar = StageProgress(total=10, desc="00 responses", disable=True)
    >>> bar.batch_started(4)
    >>> bar.callback(3, 120)      # an engine finished 3 completions, 120 new tokens
    >>> bar.callback(5, 200)      # 5 more completions, but the batch has only 4 rows
    >>> bar.rows
    4
    >>> bar.batch_done(4, 320)    # the batch is done; its tokens were already counted
    >>> bar.rows, bar.tokens
    (4, 320)
    >>> bar.close()
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm


class StageProgress:
    """A tqdm bar over a stage's rows that also shows generated tokens/s.

    Args:
        total: rows the stage will see (None when unknown).
        desc: the bar's label (``"01 responses"``).
        disable: no bar at all (counts are still kept).
    """

    def __init__(self, total: int | None, desc: str, disable: bool = False) -> None:
        self._bar = tqdm(total=total, desc=desc, unit="row", disable=disable, dynamic_ncols=True)
        self._started = time.perf_counter()
        self.rows = 0
        self.tokens = 0
        self._batch_size = 0  # rows of the batch that runs now
        self._batch_rows = 0  # rows the callback moved the bar by inside it
        self._batch_tokens = 0

    def batch_started(self, rows: int) -> None:
        """A batch of ``rows`` rows starts."""
        self._batch_size, self._batch_rows, self._batch_tokens = rows, 0, 0

    def callback(self, finished: int, new_tokens: int) -> None:
        """What steps and engines call as work finishes (``ProgressCallback``)."""
        self._batch_tokens += new_tokens
        self.tokens += new_tokens
        rows = min(finished, max(self._batch_size - self._batch_rows, 0))
        self._batch_rows += rows
        self._advance(rows)
        self._refresh()

    def batch_done(self, rows: int, tokens: int) -> None:
        """A batch of ``rows`` rows that generated ``tokens`` tokens finished: count what the
        callback did not already count, and never more rows than the batch had."""
        rows_left = max(rows - self._batch_rows, 0)
        self._advance(rows_left)
        if not self._batch_tokens:
            self.tokens += tokens
        self._batch_size = self._batch_rows = self._batch_tokens = 0
        self._refresh()

    def skip(self, rows: int) -> None:
        """Rows of shards finished by an earlier run."""
        self._advance(rows)

    def _advance(self, rows: int) -> None:
        if rows:
            self.rows += rows
            self._bar.update(rows)

    def _refresh(self) -> None:
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        self._bar.set_postfix_str(f"{self.tokens / elapsed:.1f} tok/s", refresh=False)

    def close(self) -> None:
        self._bar.close()
