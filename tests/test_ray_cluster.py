"""A real two-node Ray cluster on this machine: a stage whose shards a node wrote where the driver cannot
read them fails loudly (naming the shards, the node and the fix) instead of shrinking; on shared storage
the same run passes, with shards written by both nodes.

The second node's processes run in a private mount namespace (``unshare --mount``) with a tmpfs over one
folder, so what its workers write there is invisible to the driver and the head node, exactly as on a
node that lacks the shared mount. Each node has 1 CPU and an 80 MB object store; the nodes' processes
are stopped by their process groups (never ``ray stop``, which would end every Ray process on the machine).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from magpie_hf.executors import StageFailedError  # noqa: E402
from magpie_hf.executors.layout import RunLayout  # noqa: E402
from magpie_hf.executors.ray import RayExecutor  # noqa: E402
from magpie_hf.pipeline import Pipeline, ShardsNotVisibleError  # noqa: E402
from magpie_hf.steps import GeneratorStep, Step  # noqa: E402
from magpie_hf.steps.base import STRING  # noqa: E402

pytestmark = pytest.mark.slow

RAY_CLI = Path(sys.executable).with_name("ray")
NODE_ARGS = ["--num-cpus=1", "--num-gpus=0", "--object-store-memory=80000000", "--disable-usage-stats"]
START_TIMEOUT_S = 120


@dataclasses.dataclass(kw_only=True)
class Rows(GeneratorStep):
    """Rows ``row-<i>``; each shard takes ``delay`` seconds, so both nodes' actors get work."""

    delay: float = 0.3

    def output_features(self):
        return {"conversation_id": STRING, "instruction": STRING}

    def generate(self, *, offset, num_rows, seed):
        time.sleep(self.delay)
        ids = [f"row-{offset + i}" for i in range(num_rows)]
        return {"conversation_id": ids, "instruction": [f"text {i}" for i in ids]}


@dataclasses.dataclass(kw_only=True)
class Upper(Step):
    inputs = ("instruction",)

    def output_features(self):
        return {"upper": STRING}

    def process(self, batch, *, seed):
        return {**batch, "upper": [text.upper() for text in batch["instruction"]]}


def _namespace_prefix(probe: Path) -> list[str] | None:
    """The ``unshare`` command that gives a process a private mount namespace in which it may mount a
    tmpfs (as root, or in a user namespace mapped to root); None when neither is permitted here."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "--mount", "--propagation", "private"],
                   ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"]):
        done = subprocess.run([*prefix, "sh", "-c", 'mount -t tmpfs tmpfs "$0"', str(probe)],
                              capture_output=True, timeout=30)
        if done.returncode == 0:
            return prefix
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(command: list[str], env: dict[str, str], log: Path) -> int:
    """Run ``ray start`` (which leaves its daemons behind) in a new session; return its process group."""
    with open(log, "ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = process.wait(timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = None
    if code != 0:
        _stop_groups([process.pid])
        pytest.fail(f"{' '.join(command[:3])} failed ({code}): {log.read_text()[-2000:]}")
    return process.pid


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_groups(groups: list[int]) -> None:
    """End the Ray daemons this test started, by their process groups: SIGTERM, then SIGKILL after 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        for pgid in groups:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while any(_group_alive(g) for g in groups) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not any(_group_alive(g) for g in groups):
            return


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head node and a second node whose processes see a tmpfs over ``private`` (the driver does not)."""
    root = tmp_path_factory.mktemp("cluster")
    private = root / "private"
    private.mkdir()
    prefix = _namespace_prefix(private)
    if prefix is None:
        pytest.skip("unshare --mount (with a tmpfs mount) is not permitted here: cannot give a Ray node a private folder")
    if ray.is_initialized():
        ray.shutdown()
    # Ray's socket paths must stay short: its temp folders go under /tmp
    temp = Path(tempfile.mkdtemp(prefix="mgp-ray-", dir="/tmp"))
    here = Path(__file__).resolve().parent
    env = {
        **os.environ,
        # the workers import this module's steps and this checkout's magpie_hf
        "PYTHONPATH": os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray 2.60 turns token auth on for `ray start --head` when ~/.ray/auth_token exists (a local
        # `ray.init()` writes one: ray/_private/worker.py:1873, ray/scripts/scripts.py:1069) but not for
        # `ray start --address`, which then cannot join: both nodes run without it (this cluster listens
        # on this machine only for the few seconds of the test)
        "RAY_AUTH_MODE": "disabled",
    }
    port = _free_port()
    address = f"127.0.0.1:{port}"
    groups: list[int] = []
    try:
        groups.append(_start([str(RAY_CLI), "start", "--head", f"--port={port}",
                              "--include-dashboard=false", f"--temp-dir={temp / 'head'}", *NODE_ARGS], env, temp / "head.log"))
        mount_then_start = 'mount -t tmpfs tmpfs "$0" && exec "$@"'
        groups.append(_start([*prefix, "sh", "-c", mount_then_start, str(private), str(RAY_CLI), "start",
                              f"--address={address}", f"--temp-dir={temp / 'second'}",
                              *NODE_ARGS], env, temp / "second.log"))
        ray.init(address=address, log_to_driver=False)
        deadline = time.monotonic() + START_TIMEOUT_S
        while sum(n["Alive"] for n in ray.nodes()) < 2:
            assert time.monotonic() < deadline, f"the second node never joined: {ray.nodes()}"
            time.sleep(0.5)
        head = ray.get_runtime_context().get_node_id()
        second = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head)
        yield {"private": private, "shared": root / "shared", "head": head, "second": second}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _stop_groups(groups)
        shutil.rmtree(temp, ignore_errors=True)


def test_shards_the_driver_cannot_read_fail_the_stage_loudly(two_nodes, monkeypatch):
    monkeypatch.setattr(RunLayout, "VISIBLE_WAIT_S", 2.0)  # the NFS grace period, shortened
    run = two_nodes["private"] / "run"
    started = time.perf_counter()
    with pytest.raises(ShardsNotVisibleError) as caught:
        Pipeline(Rows(num_rows=8) >> Upper(), run, shard_size=1, progress=False).run(executor=RayExecutor())
    message = str(caught.value)
    assert isinstance(caught.value, StageFailedError)
    assert "Stage '00-rows'" in message
    assert "put output_dir on shared storage" in message
    assert f"Ray node {two_nodes['second'][:12]}" in message  # the node that wrote them
    assert f"Ray node {two_nodes['head'][:12]}" not in message  # the head's shards are readable
    missing = [line for line in message.splitlines() if line.startswith("  shard ")]
    assert 0 < len(missing) < 8, message  # both nodes worked; only the second node's shards are missing
    assert all(str(run / "stages" / "00-rows") in line and "completion record is missing" in line for line in missing)
    # nothing went on with fewer shards
    assert not (run / "stages" / "01-upper").exists() and not (run / "manifest.json").exists()
    print(f"failing run: {time.perf_counter() - started:.1f} s\n{message}")


def test_on_shared_storage_both_nodes_write_and_every_row_arrives(two_nodes, tmp_path):
    run = two_nodes["shared"] / "run"
    started = time.perf_counter()
    rows = Pipeline(Rows(num_rows=8) >> Upper(), run, shard_size=1, progress=False).run(executor=RayExecutor())
    local = Pipeline(Rows(num_rows=8, delay=0) >> Upper(), tmp_path / "local", shard_size=1, progress=False).run()
    assert rows["conversation_id"] == [f"row-{i}" for i in range(8)]
    assert rows.to_list() == local.to_list()
    writers = {json.loads(p.read_text())["report"]["node"] for p in (run / "stages" / "01-upper").glob("shard-*.json")}
    assert any(two_nodes["second"][:12] in w for w in writers) and any(two_nodes["head"][:12] in w for w in writers)
    print(f"shared run: {time.perf_counter() - started:.1f} s")
