"""The output folder of a run: where every stage and shard lives, and how it is written.

Everything a run writes goes through :class:`RunLayout`, so the rules are in one place:

- paths are absolute (a Ray worker whose working directory differs writes to the same place);
- files appear atomically (a temporary file, then ``os.replace``), so a reader never sees half a file;
- a shard is done when its *completion record* (``shard-XXXXX.json``) exists beside it and the
  Parquet file matches the row count, size and SHA-256 the record holds; a shard that fails that
  check (truncated by a full disk, half-copied over NFS) is removed with a warning that names the
  file and is made again;
- ``pipeline.json`` holds the run's settings (a rerun with other settings is refused) and
  ``manifest.json`` what every stage did;
- ``.lock`` names the live run (pid, host) that holds the folder; a second run is refused.

Layout of ``output_dir``::

    pipeline.json                      settings of the run
    manifest.json                      settings + per-stage reports, written at the end
    .lock                              held while a run is live
    stages/input/                      a user-given input dataset, as shards (written once)
    stages/00-magpie_instructions/     shard-00000.parquet, shard-00000.json, ..., _stage.json
    stages/01-responses/               ...

Example:
    >>> import tempfile, pyarrow as pa
    >>> layout = RunLayout(tempfile.mkdtemp())
    >>> path = layout.shard_path(layout.stage_dir(0, "numbers"), 0)
    >>> record = layout.write_shard(path, pa.table({"x": [1, 2, 3]}), {"rows_in": 3})
    >>> record["rows"], layout.verified_record(path)["report"]
    (3, {'rows_in': 3})
    >>> _ = path.write_bytes(path.read_bytes()[:-10])   # a truncated copy
    >>> layout.verified_record(path) is None
    True
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from magpie_hf.errors import PipelineMismatchError, RunLockedError

logger = logging.getLogger(__name__)

SHARD_PATTERN = "shard-*.parquet"
STAGE_RECORD = "_stage.json"
#: step settings that do not change a row (how much is batched, where it runs, whether a bar shows): a
#: resume with other values of these is never refused
NON_ROW_SETTINGS = frozenset({"batch_size", "read_batch_size", "forward_batch_size", "device", "progress"})


class RunLayout:
    """Paths, atomic writes and completion records of one run's output folder.

    Args:
        output_dir: the run's folder; made absolute at once.
    """

    #: seconds the driver waits for a shard a worker reported written to be readable here (:meth:`wait_for_shard`)
    VISIBLE_WAIT_S: float = 30.0

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.root = Path(output_dir).expanduser().resolve()

    # -- paths ---------------------------------------------------------------------------------
    @property
    def stages_dir(self) -> Path:
        return self.root / "stages"

    @property
    def input_dir(self) -> Path:
        """Where a user-given input dataset is written as shards."""
        return self.stages_dir / "input"

    @property
    def cache_dir(self) -> Path:
        """The ``datasets`` cache of this run (memory-mapped Arrow)."""
        return self.root / "cache"

    def stage_dir(self, index: int, name: str) -> Path:
        return self.stages_dir / f"{index:02d}-{name}"

    @staticmethod
    def shard_path(stage_dir: Path, shard: int) -> Path:
        return stage_dir / f"shard-{shard:05d}.parquet"

    @staticmethod
    def record_path(shard_path: Path) -> Path:
        return shard_path.with_suffix(".json")

    @staticmethod
    def shard_files(stage_dir: Path) -> list[Path]:
        """The stage's Parquet shards in order (done or not)."""
        return sorted(stage_dir.glob(SHARD_PATTERN))

    # -- atomic writes -------------------------------------------------------------------------
    @staticmethod
    def write_json(path: Path, data: Any) -> None:
        """Write ``data`` as JSON to ``path`` atomically."""
        _atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False).encode())

    @staticmethod
    def read_json(path: Path) -> Any:
        return json.loads(path.read_text())

    def write_shard(self, path: Path, table: pa.Table, report: dict[str, Any]) -> dict[str, Any]:
        """Write ``table`` to ``path`` and then its completion record; return the record.

        The record is written last: a shard without one is not done, whatever else is there.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_name(path)
        try:
            pq.write_table(table, tmp)
            size, digest = _file_digest(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        record = {"rows": table.num_rows, "bytes": size, "sha256": digest, "report": report}
        self.write_json(self.record_path(path), record)
        return record

    # -- completion ----------------------------------------------------------------------------
    def check_shard(self, path: Path) -> tuple[dict[str, Any] | None, str | None]:
        """``(record, None)`` for a finished, intact shard, else ``(None, why not)``; changes nothing.

        Example:
            >>> import tempfile
            >>> RunLayout(tempfile.mkdtemp()).check_shard(Path("/nowhere/shard-00000.parquet"))
            (None, 'its completion record is missing')
        """
        record_path = self.record_path(path)
        if not record_path.exists():
            return None, "its completion record is missing"
        try:
            record = self.read_json(record_path)
            problem = _mismatch(path, record)
        except (OSError, ValueError, KeyError, TypeError) as err:
            record, problem = None, f"unreadable completion record ({err})"
        return (record, None) if problem is None else (None, problem)

    def wait_for_shard(self, path: Path, timeout_s: float | None = None) -> tuple[dict[str, Any] | None, str | None]:
        """:meth:`check_shard` after a worker reported ``path`` written, retried for up to ``timeout_s``
        (default :attr:`VISIBLE_WAIT_S`) while it fails: a network filesystem can show another machine's new
        file late (NFS caches attributes and negative lookups for up to ``acdirmax``, 60 s by default;
        ``man 5 nfs``). Listing the folder before each try asks the server again. Changes nothing."""
        deadline = time.monotonic() + (self.VISIBLE_WAIT_S if timeout_s is None else timeout_s)
        delay = 0.1
        while True:
            with contextlib.suppress(OSError):
                os.listdir(path.parent)
            record, problem = self.check_shard(path)
            if problem is None or time.monotonic() >= deadline:
                return record, problem
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 2.0)

    def verified_record(self, path: Path) -> dict[str, Any] | None:
        """The completion record of a finished, intact shard; None when the shard must be made.

        A shard whose file is missing, or does not match its record (size, SHA-256, row count), is
        removed with a warning that names the file, so that it is made again.
        """
        record_path = self.record_path(path)
        if not record_path.exists():
            return None
        record, problem = self.check_shard(path)
        if problem is None:
            return record
        logger.warning("shard %s is damaged (%s); making it again", path, problem)
        for stale in (path, record_path):
            stale.unlink(missing_ok=True)
        return None

    def clear_stage(self, stage_dir: Path) -> None:
        """Remove every shard, record and the stage record of ``stage_dir`` (a global stage redone)."""
        for stale in [*stage_dir.glob("shard-*"), stage_dir / STAGE_RECORD]:
            stale.unlink(missing_ok=True)

    def stage_record(self, stage_dir: Path) -> dict[str, Any] | None:
        """The stage's record (None when missing; a damaged one is named in a warning and treated as missing,
        so the stage is checked and finished again)."""
        path = stage_dir / STAGE_RECORD
        if not path.exists():
            return None
        try:
            record = self.read_json(path)
        except (OSError, ValueError) as err:
            logger.warning("stage record %s is damaged (%s); the stage is checked and finished again", path, err)
            return None
        return record if isinstance(record, dict) else None

    def write_stage_record(self, stage_dir: Path, report: dict[str, Any]) -> None:
        self.write_json(stage_dir / STAGE_RECORD, report)

    # -- run settings ----------------------------------------------------------------------------
    @property
    def settings_path(self) -> Path:
        return self.root / "pipeline.json"

    def read_settings(self) -> dict[str, Any] | None:
        """The settings ``pipeline.json`` holds (None: no run recorded here); a damaged file is an error that
        names it and the way out."""
        path = self.settings_path
        if not path.exists():
            return None
        try:
            settings = self.read_json(path)
        except (OSError, ValueError) as err:
            raise PipelineMismatchError(
                f"{path} is unreadable ({err}). Restore it, delete it when the run's settings are the ones it "
                "was made with, or start over with --overwrite (Pipeline(overwrite=True))."
            ) from None
        if not isinstance(settings, dict):
            raise PipelineMismatchError(f"{path} does not hold a run's settings; delete it or use --overwrite.")
        return settings

    def has_rows(self, stage_dirs: Iterable[Path]) -> bool:
        """Whether any of ``stage_dirs`` holds a finished shard (work a changed setting would throw away)."""
        return any(next(d.glob("shard-*.json"), None) is not None for d in stage_dirs if d.is_dir())

    def finished_shards(self) -> int:
        """How many finished shards the folder holds, every stage together."""
        return sum(1 for _ in self.stages_dir.glob("*/shard-*.json")) if self.stages_dir.is_dir() else 0

    def check_or_write_settings(self, settings: dict[str, Any], stage_dirs: Sequence[Path] = ()) -> None:
        """Write ``pipeline.json``, or refuse when the folder keeps rows made with other settings.

        Settings that do not change rows (:data:`NON_ROW_SETTINGS`: batch sizes, devices, progress bars)
        never block a resume. Other differences are accepted when no finished shard depends on them: the
        first step that differs (``stage_dirs[k]``, its stage folder) and every later stage hold no rows, so
        a start that failed before any row was made, or a fix to a stage that had not finished a shard yet,
        never locks the user out. Otherwise :class:`PipelineMismatchError` names each differing setting and
        the ways out.
        """
        from magpie_hf.utils.redaction import hide_local_paths

        self.root.mkdir(parents=True, exist_ok=True)
        # absolute local paths (a model folder, the embedded model's files) are written relative to the run's
        # folder or by name, so the file can be shared as it is
        settings = hide_local_paths(json.loads(json.dumps(settings)), base=self.root)
        old = self.read_settings()
        if old is not None and old != settings:
            diff = settings_diff(old, settings)
            first = _first_differing_stage(old, settings)
            kept = [*stage_dirs[first:], *([self.input_dir] if first == 0 else [])]
            if diff and self.has_rows(kept):
                lines = "\n".join(f"  {key}: {a} (kept rows) -> {b} (this run)" for key, a, b in diff[:12])
                more = f"\n  ... and {len(diff) - 12} more" if len(diff) > 12 else ""
                raise PipelineMismatchError(
                    f"{self.root} keeps rows made with other settings ({self.settings_path}):\n{lines}{more}\n"
                    "Either resume with the kept settings, write to a new folder (--output_dir), or discard the "
                    f"{self.finished_shards()} finished shard(s) and start over with --overwrite "
                    "(Pipeline(overwrite=True))."
                )
            if diff:
                logger.warning("%s: settings changed where no row was kept yet (%s); recording the new ones",
                               self.root, ", ".join(key for key, _, _ in diff))
        if old != settings:
            self.write_json(self.settings_path, settings)

    def clear(self) -> None:
        """Remove what a run wrote here (stages, settings, manifest, cache, dataset folder); other files stay."""
        import shutil

        for name in ("stages", "cache", "dataset"):
            shutil.rmtree(self.root / name, ignore_errors=True)
        for name in ("pipeline.json", "manifest.json"):
            (self.root / name).unlink(missing_ok=True)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.write_json(self.root / "manifest.json", manifest)

    # -- lock ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold ``.lock`` for the duration of a run; refuse when a live run holds it.

        A lock left by a run that died on this host (its pid is gone) is taken over. A lock from
        another host cannot be checked from here: the error says how to clear it.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / ".lock"
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
        while not _create_lock(path, me):
            holder = _read_lock(path)
            if holder is None and _age(path) < LOCK_GRACE_SECONDS:
                time.sleep(0.1)  # a run is writing it this moment (only where hard links are unsupported)
                continue
            if holder is not None and _is_live(holder):
                raise RunLockedError(
                    f"{self.root} is in use by another run (pid {holder.get('pid')} on host "
                    f"{holder.get('host')!r}, started {holder.get('started')}). Wait for it to finish, or "
                    f"choose another output directory. If no run is live there, delete {path}."
                )
            _take_over(path, holder)
        try:
            yield
        finally:
            if _read_lock(path) == me:
                path.unlink(missing_ok=True)


def _row_settings(value: Any) -> Any:
    """``value`` without the keys of :data:`NON_ROW_SETTINGS` (at any depth)."""
    if isinstance(value, dict):
        return {k: _row_settings(v) for k, v in value.items() if k not in NON_ROW_SETTINGS}
    if isinstance(value, list):
        return [_row_settings(v) for v in value]
    return value


def settings_diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``[(key, old value, new value)]`` for each setting that differs and changes rows (dotted keys; a step
    is named ``steps[i]``).

    Example:
        >>> settings_diff({"seed": 0, "steps": [{"step": "A", "t": 1.0, "batch_size": 8}]},
        ...               {"seed": 1, "steps": [{"step": "A", "t": 0.5, "batch_size": 4}]})
        [('seed', 0, 1), ('steps[0].t', 1.0, 0.5)]
    """
    old, new = _row_settings(old), _row_settings(new)
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in [*old, *(k for k in new if k not in old)]:
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in new or key not in old:
                out.append((name, old.get(key, "(unset)"), new.get(key, "(unset)")))
            else:
                out.extend(settings_diff(old[key], new[key], name))
        return out
    if isinstance(old, list) and isinstance(new, list) and prefix == "steps":
        out = []
        for i in range(max(len(old), len(new))):
            a = old[i] if i < len(old) else "(no step)"
            b = new[i] if i < len(new) else "(no step)"
            out.extend(settings_diff(a, b, f"steps[{i}]") if isinstance(a, dict) and isinstance(b, dict)
                       else [(f"steps[{i}]", _step_name(a), _step_name(b))] if a != b else [])
        return out
    return [] if old == new else [(prefix, old, new)]


def _step_name(value: Any) -> Any:
    return value.get("name") or value.get("step") if isinstance(value, dict) else value


def _first_differing_stage(old: dict[str, Any], new: dict[str, Any]) -> int:
    """The first stage whose rows differ between ``old`` and ``new`` settings (0 when a run-wide one does)."""
    if settings_diff({k: v for k, v in old.items() if k != "steps"}, {k: v for k, v in new.items() if k != "steps"}):
        return 0
    a, b = old.get("steps") or [], new.get("steps") or []
    for i in range(max(len(a), len(b))):
        if i >= len(a) or i >= len(b) or settings_diff(a[i], b[i]):
            return i
    return max(len(a), len(b))


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _file_digest(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def _mismatch(path: Path, record: dict[str, Any]) -> str | None:
    """Why ``path`` does not match its completion record (None when it does)."""
    if not path.exists():
        return "its Parquet file is missing"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"{size} bytes on disk, {record['bytes']} when written"
    _, digest = _file_digest(path)
    if digest != record["sha256"]:
        return "its checksum differs from the one recorded when it was written"
    rows = pq.read_metadata(path).num_rows
    if rows != record["rows"]:
        return f"{rows} rows, {record['rows']} when written"
    return None


#: how long an unreadable lock file is taken for one being written (not for a dead run's)
LOCK_GRACE_SECONDS = 5.0


def _create_lock(path: Path, holder: dict[str, Any]) -> bool:
    """Create ``path`` holding ``holder``, atomically and complete from its first moment (a hard link to a
    written file, which also works over NFS); False when it exists already."""
    tmp = _tmp_name(path)
    tmp.write_text(json.dumps(holder))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: exclusive create, then write
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump(holder, handle)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _take_over(path: Path, holder: dict[str, Any] | None) -> None:
    """Remove the lock of a run that is gone (``holder``), unless another run replaced it meanwhile.

    The lock is first renamed to a name of our own, so of two runs taking over at once only one moves
    it; if what was moved is not the dead run's lock (a live run took over first), it is put back.
    """
    moved = path.with_name(f"{path.name}.stale-{socket.gethostname()}-{os.getpid()}")
    try:
        os.rename(path, moved)
    except FileNotFoundError:
        return  # another run took it over first
    if _read_lock(moved) != holder:
        with contextlib.suppress(OSError):  # exists: a third run has it now
            os.link(moved, path)
    else:
        logger.warning("taking over %s left by a run that is no longer live (%s)", path, holder)
    moved.unlink(missing_ok=True)


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _is_live(holder: dict[str, Any]) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process cannot be checked from here
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
