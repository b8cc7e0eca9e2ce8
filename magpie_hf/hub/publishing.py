"""Publish a dataset folder to the Hub as ONE commit marked with a version tag that never moves.

What :func:`publish` promises:

- every file of the version (Parquet of each config, card, plots, run record) lands in one commit, and files of
  an older version that this one no longer has (e.g. shards of a config that shrank) are deleted in it, so
  ``load_dataset(repo, config, revision="vX.Y.Z")`` returns exactly this version's rows;
- an existing tag is refused BEFORE anything is written (``force=True`` moves it);
- transient failures (429, 5xx, dropped connections) are retried with backoff, and a commit whose answer was
  lost is recognised instead of being made twice (the commit carries ``parent_commit`` and its title is looked
  for on the branch before each retry);
- 401/403 stop at once with an actionable message; the token is never printed, logged or written;
- without a token, or when the Hub cannot be reached, nothing crashes: the folder stays and the command that
  pushes it later is printed.

Example:
    >>> from magpie_hf.hub import publish
    >>> result = publish("runs/pro/dataset", "me/magpie-pro", "1.0.0")   # doctest: +SKIP
    >>> result.tag, result.commit_sha[:7]                                # doctest: +SKIP
    ('v1.0.0', '3f2c1ab')
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from magpie_hf.errors import CommitConflictError, ConfigError, HubAuthError, PublishError, TagExistsError

from .card import render_card
from .layout import CARD_FILE, DATA_DIR, PLOTS_DIR, RUN_FILE, read_layout

logger = logging.getLogger(__name__)

REPO_TYPE = "dataset"
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_SEMVER = re.compile(
    r"^v?(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


@dataclass
class RetryPolicy:
    """How often and how patiently a transient failure of the commit is retried."""

    attempts: int = 5
    base_delay: float = 2.0
    max_delay: float = 60.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        if retry_after is not None:
            try:
                return min(float(retry_after), self.max_delay)
            except ValueError:
                pass
        return min(self.base_delay * 2 ** (attempt - 1), self.max_delay)


@dataclass
class PublishResult:
    """What :func:`publish` did. ``pushed`` is False when there was no token or no Hub to reach."""

    pushed: bool
    folder: Path
    repo_id: str
    tag: str
    branch: str = "main"
    commit_sha: str | None = None
    commit_url: str | None = None
    attempts: int = 0
    message: str = ""


def parse_version(version: str) -> str:
    """``"1.2.3"`` or ``"v1.2.3"`` -> the tag ``"v1.2.3"``; anything that is not semantic versioning is refused."""
    text = str(version).strip()
    if not _SEMVER.match(text):
        raise ValueError(f"Invalid version {version!r}: use semantic versioning MAJOR.MINOR.PATCH, e.g. 1.0.0 or 1.1.0-rc.1.")
    return text if text.startswith("v") else f"v{text}"


def push_later_hint(folder: str | os.PathLike, repo_id: str, tag: str) -> str:
    return f"magpie-hf push {folder} {repo_id} --version {tag.removeprefix('v')}"


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of huggingface_hub's HTTP client (httpx2 since huggingface_hub 2.0, the floor in
    pyproject.toml), plus offline mode."""
    import httpx2

    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, httpx2.TransportError]
    try:
        from huggingface_hub.errors import OfflineModeIsEnabled

        errors.append(OfflineModeIsEnabled)
    except ImportError:  # pragma: no cover - old huggingface_hub
        pass
    return tuple(errors)


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _is_transient(err: BaseException) -> bool:
    return _status(err) in TRANSIENT_STATUSES or isinstance(err, _network_errors())


def _auth_message(status: int, repo_id: str, step: str, hint: str) -> str:
    what = "rejected the token (HTTP 401)" if status == 401 else f"refused write access to {repo_id} (HTTP 403)"
    return (
        f"The Hugging Face Hub {what} while {step}. Use a token with write access to {repo_id.split('/')[0]!r}: "
        "create one at https://huggingface.co/settings/tokens, then run `hf auth login` or set HF_TOKEN. "
        f"The dataset folder is kept; push it later with: {hint}"
    )


class _Publisher:
    """One publish run (kept small: the steps are methods so each failure names the step it happened in)."""

    def __init__(self, folder: Path, repo_id: str, tag: str, token: str, *, private: bool, branch: str,
                 force: bool, commit_message: str | None, retry: RetryPolicy):
        from huggingface_hub import HfApi

        self.folder, self.repo_id, self.tag, self.branch = folder, repo_id, tag, branch
        self.private, self.force, self.retry = private, force, retry
        self._token = token
        self.api = HfApi(token=token)
        self.layout = read_layout(folder)
        self.record = self._read_record()
        recipe = (self.record.get("run_info") or {}).get("recipe") or "dataset"
        self.commit_message = commit_message or f"Publish {recipe} {tag}"
        if tag not in self.commit_message:
            self.commit_message = f"{self.commit_message} ({tag})"
        self.step = "starting"

    def _read_record(self) -> dict:
        path = self.folder / RUN_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    # --------------------------------------------------------------------------------------------- steps
    def run(self) -> PublishResult:
        if "/" not in self.repo_id:
            self.step = "looking up your user name"
            self.repo_id = f"{self.api.whoami()['name']}/{self.repo_id}"
        tags = self._existing_tags()
        if self.tag in tags and not self.force:
            raise TagExistsError(
                f"{self.repo_id} already has the tag {self.tag} (commit {tags[self.tag][:8]}); a published version "
                f"never moves, so nothing was changed. Publish a new version (e.g. --version "
                f"{_next_patch(self.tag)}), or pass --force (force=True) to move the tag."
            )
        self.step = "creating the repository"
        self.api.create_repo(self.repo_id, repo_type=REPO_TYPE, private=self.private, exist_ok=True)
        if self.branch != "main":
            self.step = f"creating the branch {self.branch!r}"
            self.api.create_branch(self.repo_id, branch=self.branch, repo_type=REPO_TYPE, exist_ok=True)
        card = self._card()
        commit_sha, attempts = self._commit(card)
        self.step = f"tagging the commit {self.tag}"
        if self.tag in tags:
            logger.warning("Moving tag %s of %s from %s to %s (force).", self.tag, self.repo_id, tags[self.tag][:8], commit_sha[:8])
            self.api.delete_tag(self.repo_id, tag=self.tag, repo_type=REPO_TYPE)
        self._with_retries(lambda: self._create_tag(commit_sha))
        endpoint = self.api.endpoint.rstrip("/")
        return PublishResult(
            pushed=True,
            folder=self.folder,
            repo_id=self.repo_id,
            tag=self.tag,
            branch=self.branch,
            commit_sha=commit_sha,
            commit_url=f"{endpoint}/datasets/{self.repo_id}/commit/{commit_sha}",
            attempts=attempts,
            message=f"Published {self.repo_id} {self.tag} ({endpoint}/datasets/{self.repo_id}/tree/{self.tag})",
        )

    def _existing_tags(self) -> dict[str, str]:
        from huggingface_hub.errors import RepositoryNotFoundError

        self.step = "reading the repository's tags"
        try:
            refs = self.api.list_repo_refs(self.repo_id, repo_type=REPO_TYPE)
        except RepositoryNotFoundError:
            return {}  # a new repository (an invalid token is a plain 401, not "not found")
        return {t.name: t.target_commit for t in refs.tags}

    def _branch_head(self) -> str:
        refs = self.api.list_repo_refs(self.repo_id, repo_type=REPO_TYPE)
        heads = {b.name: b.target_commit for b in refs.branches}
        if self.branch not in heads:
            raise PublishError(f"Branch {self.branch!r} of {self.repo_id} vanished during publish.")
        return heads[self.branch]

    def _card(self) -> bytes:
        """The Hub card (load snippet with repo id and tag), or the folder's README when it has no run record."""
        if self.record:
            text = render_card(self.folder, repo_id=self.repo_id, version=self.tag, record=self.record, layout=self.layout)
        else:
            text = (self.folder / CARD_FILE).read_text(encoding="utf-8")
        data = text.encode("utf-8")
        self._refuse_token_in(data, CARD_FILE)
        return data

    def _refuse_token_in(self, data: bytes, name: str) -> None:
        if self._token and self._token.encode() in data:
            raise PublishError(f"{name} contains the Hub token; refusing to upload it. Remove the token from the run info.")

    def _operations(self, card: bytes, remote_files: list[str]) -> list:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        local = [*self.layout.all_files(), *(f"{PLOTS_DIR}/{p.name}" for p in sorted((self.folder / PLOTS_DIR).glob("*.png")))]
        ops: list = [CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card)]
        if (self.folder / RUN_FILE).exists():
            run_file = (self.folder / RUN_FILE).read_bytes()
            self._refuse_token_in(run_file, RUN_FILE)
            ops.append(CommitOperationAdd(path_in_repo=RUN_FILE, path_or_fileobj=run_file))
        ops += [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(self.folder / path)) for path in local]
        keep = set(local)
        ops += [
            CommitOperationDelete(path_in_repo=path)
            for path in remote_files
            if path.startswith((f"{DATA_DIR}/", f"{PLOTS_DIR}/")) and path not in keep
        ]
        return ops

    def _commit(self, card: bytes) -> tuple[str, int]:
        """Create the commit, retrying transient failures without ever applying it twice."""
        from huggingface_hub.errors import HfHubHTTPError

        self.step = "reading the branch head"
        parent = self._branch_head()
        remote = self.api.list_repo_files(self.repo_id, repo_type=REPO_TYPE, revision=self.branch)
        description = "Configs: " + ", ".join(f"{c} ({self.layout.config_rows(c):,} rows)" for c in self.layout.configs)
        for attempt in range(1, self.retry.attempts + 1):
            self.step = f"committing (attempt {attempt}/{self.retry.attempts})"
            try:
                info = self.api.create_commit(
                    self.repo_id,
                    operations=self._operations(card, remote),  # fresh objects: create_commit mutates them
                    commit_message=self.commit_message,
                    commit_description=description,
                    repo_type=REPO_TYPE,
                    revision=self.branch,
                    parent_commit=parent,
                )
                return info.oid, attempt
            except HfHubHTTPError as err:
                if _status(err) in (409, 412):  # the branch moved: our own lost commit, or someone else's
                    applied = self._applied_commit(parent)
                    if applied:
                        return applied, attempt
                    raise CommitConflictError(
                        f"{self.repo_id}@{self.branch} changed while publishing (HTTP {_status(err)}); re-run to publish on top of it."
                    ) from err
                if not _is_transient(err) or attempt == self.retry.attempts:
                    raise
                self._wait(attempt, err)
            except _network_errors() as err:
                if attempt == self.retry.attempts:
                    raise
                self._wait(attempt, err)
            applied = self._applied_commit(parent)  # did the failed attempt land after all?
            if applied:
                logger.info("The commit of attempt %d was applied although its answer was lost; not committing again.", attempt)
                return applied, attempt
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait(self, attempt: int, err: BaseException) -> None:
        response = getattr(err, "response", None)
        retry_after = response.headers.get("Retry-After") if response is not None else None
        delay = self.retry.delay(attempt, retry_after)
        reason = f"HTTP {_status(err)}" if _status(err) else type(err).__name__
        logger.warning("Commit to %s failed (%s); retrying in %.1f s (attempt %d/%d).", self.repo_id, reason, delay, attempt + 1, self.retry.attempts)
        time.sleep(delay)

    def _applied_commit(self, parent: str) -> str | None:
        """The sha of our commit if it is on the branch after ``parent``; None if the branch did not move."""
        head = self._branch_head()
        if head == parent:
            return None
        for commit in self.api.list_repo_commits(self.repo_id, repo_type=REPO_TYPE, revision=head):
            if commit.commit_id == parent:
                break
            if commit.title == self.commit_message:
                return commit.commit_id
        raise CommitConflictError(
            f"{self.repo_id}@{self.branch} moved to {head[:8]} while publishing (not our commit); re-run to publish on top of it."
        )

    def _create_tag(self, commit_sha: str) -> None:
        from huggingface_hub.errors import HfHubHTTPError

        try:
            self.api.create_tag(self.repo_id, tag=self.tag, revision=commit_sha, tag_message=self.commit_message, repo_type=REPO_TYPE)
        except HfHubHTTPError as err:
            if _status(err) != 409:
                raise
            target = {t.name: t.target_commit for t in self.api.list_repo_refs(self.repo_id, repo_type=REPO_TYPE).tags}.get(self.tag)
            if target != commit_sha:  # a retried request that did land is fine; someone else's tag is not
                raise TagExistsError(f"The tag {self.tag} was created on {self.repo_id} by someone else during this publish.") from err

    def _with_retries(self, fn) -> None:
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return fn()
            except Exception as err:
                if not _is_transient(err) or attempt == self.retry.attempts:
                    raise
                self._wait(attempt, err)


def _next_patch(tag: str) -> str:
    major, minor, patch = _SEMVER.match(tag).groups()[:3]
    return f"{major}.{minor}.{int(patch) + 1}"


def check_publish(repo_id: str, version: str, *, token: str | None = None, force: bool = False) -> None:
    """What :func:`publish` would refuse after hours of generation, checked before it: the version, the repo id,
    a token, and (when the Hub answers) that the token is accepted and the tag is still free. An unreachable Hub
    only warns: the push is tried when the run is done, and the dataset is kept if it fails.

    Raises:
        ValueError: invalid version or repo id. PublishError: no token. HubAuthError: the token is refused.
        TagExistsError: the tag exists and ``force`` is False.
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    tag = parse_version(version)
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"--push_to_hub {repo_id!r} is not a Hub repository id: expected 'user/name' or 'name'.")
    token = token or get_token()
    if not token:
        raise PublishError(
            "--push_to_hub needs a Hugging Face token with write access: set HF_TOKEN or run `hf auth login`; or drop "
            "--push_to_hub and publish the dataset folder later with `magpie-hf push FOLDER USER/REPO --version X.Y.Z`."
        )
    api = HfApi(token=token)
    step = "checking the token"
    try:
        user = api.whoami()["name"]
        name = repo_id if "/" in repo_id else f"{user}/{repo_id}"
        step = f"reading the tags of {name}"
        try:
            tags = {t.name for t in api.list_repo_refs(name, repo_type=REPO_TYPE).tags}
        except RepositoryNotFoundError:
            return  # a new repository, made when the run publishes
    except _network_errors() as err:
        logger.warning("Could not reach the Hugging Face Hub while %s (%s); the push is tried when the run is done.",
                       step, type(err).__name__)
        return
    except HfHubHTTPError as err:
        if _status(err) in (401, 403):
            raise HubAuthError(
                f"The Hugging Face Hub refused the token (HTTP {_status(err)}) while {step}; nothing was generated yet. "
                f"Use a token with write access to {repo_id.split('/')[0]!r} (https://huggingface.co/settings/tokens, "
                "then `hf auth login` or HF_TOKEN), or drop --push_to_hub and push the folder later with `magpie-hf push`."
            ) from None
        logger.warning("The Hub answered HTTP %s while %s; the push is tried when the run is done.", _status(err), step)
        return
    if tag in tags and not force:
        raise TagExistsError(
            f"{name} already has the tag {tag}; a published version never changes. Choose another --version (e.g. "
            f"{_next_patch(tag)}), or pass --force to move the tag."
        )


def publish(
    folder: str | os.PathLike,
    repo_id: str,
    version: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    force: bool = False,
    commit_message: str | None = None,
    retry: RetryPolicy | None = None,
) -> PublishResult:
    """Upload the dataset ``folder`` to the Hub dataset ``repo_id`` in one commit tagged ``vX.Y.Z``.

    Args:
        folder: a folder written by :func:`magpie_hf.hub.save_dataset_folder`.
        repo_id: ``"user/name"`` (or ``"name"`` for your own namespace); created if missing.
        version: semantic version, ``"1.0.0"`` or ``"v1.0.0"``; the tag is ``v1.0.0``.
        token: Hub token; default ``huggingface_hub.get_token()`` (``HF_TOKEN`` or ``hf auth login``).
        private: create the repository private (an existing repository keeps its visibility).
        revision: commit to this branch (created from main if missing) instead of main.
        force: move an existing tag to the new commit instead of refusing.
        commit_message: default ``"Publish <recipe> vX.Y.Z"``; the tag is appended when missing.
        retry: backoff for transient failures of the commit (default 5 attempts, 2 s doubling).

    Returns:
        A :class:`PublishResult`; ``pushed=False`` (and the push-later command printed) without a token or Hub.

    Raises:
        HubAuthError: the Hub answered 401/403. TagExistsError: the tag exists and ``force`` is False.
        ValueError: invalid version or repo id. FileNotFoundError: ``folder`` is not a dataset folder.
    """
    from huggingface_hub import get_token
    from huggingface_hub.errors import HfHubHTTPError

    tag = parse_version(version)
    root = Path(folder)
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"Invalid repository id {repo_id!r}: expected 'user/name' or 'name'.")
    read_layout(root)  # a bad folder fails here, before any network call
    hint = push_later_hint(root, repo_id, tag)
    token = token or get_token()
    if not token:
        message = (
            "No Hugging Face token found (pass token=, set HF_TOKEN or run `hf auth login`), so nothing was pushed.\n"
            f"The dataset is kept at {root}. Push it later with:\n  {hint}"
        )
        print(message)
        return PublishResult(pushed=False, folder=root, repo_id=repo_id, tag=tag, branch=revision or "main", message=message)
    publisher = _Publisher(root, repo_id, tag, token, private=private, branch=revision or "main", force=force,
                           commit_message=commit_message, retry=retry or RetryPolicy())
    try:
        result = publisher.run()
    except _network_errors() as err:
        message = (
            f"Could not reach the Hugging Face Hub while {publisher.step} ({type(err).__name__}), so nothing was pushed.\n"
            f"The dataset is kept at {root}. Push it later with:\n  {hint}"
        )
        print(message)
        return PublishResult(pushed=False, folder=root, repo_id=publisher.repo_id, tag=tag, branch=publisher.branch, message=message)
    except HfHubHTTPError as err:
        if _status(err) in (401, 403):
            raise HubAuthError(_auth_message(_status(err), publisher.repo_id, publisher.step, hint)) from err
        raise
    logger.info(result.message)
    return result


def finish_recipe(
    folder: str | os.PathLike,
    *,
    repo_id: str | None = None,
    version: str | None = None,
    private: bool = False,
    revision: str | None = None,
    force: bool = False,
    token: str | None = None,
) -> PublishResult | None:
    """What a recipe does with its dataset folder at the end: publish ``folder`` to ``repo_id`` as ``version``;
    without a ``repo_id``, print how to load and push it.

    Returns the :class:`PublishResult`, or None when nothing was to be pushed. A refused publish raises
    (:class:`~magpie_hf.errors.ConfigError` without a version, :class:`PublishError` for an existing tag or a refused
    token); the folder is always kept.

    Example::

        folder = save_dataset_folder(out / "dataset", configs, run_info, license="apache-2.0")
        finish_recipe(folder, repo_id="me/magpie-pro", version="v1.0.0")   # publishes, or prints how to push later
    """
    folder = Path(folder)
    if repo_id:
        if not version:
            raise ConfigError("publishing needs a version X.Y.Z (the tag that pins it, e.g. --version 1.0.0)")
        return publish(folder, repo_id, parse_version(version), token=token, private=private, revision=revision,
                       force=force)
    default = read_layout(folder).configs[0]
    print(
        f"Dataset written to {folder}\n"
        f"  load it:  datasets.load_dataset({str(folder)!r}, {default!r})\n"
        f"  push it:  {push_later_hint(folder, 'USER/REPO', version or 'v1.0.0')}"
    )
    return None
