"""Fail early, clearly and never silently (issue 25): every bad flag, file, server and push is caught before
the work with a one-line message naming the flag and the way out; the run folder never traps the user; no
secret reaches a log line; the exit status tells the truth. Most cases stop before any model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from magpie_hf.errors import ConfigError
from magpie_hf.executors.layout import PipelineMismatchError, RunLayout, settings_diff
from magpie_hf.pipeline import Pipeline
from magpie_hf.recipe import parse_recipe
from tests.conftest import load_recipe
from tests.test_hub import TOKEN, USER, hub, make_folder  # noqa: F401 - hub is a fixture
from tests.test_pipeline import Double, KeepTop, Numbers

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pro():
    return load_recipe("magpie_pro").PRO


# ------------------------------------------------------------------------------ flags and files
BAD_FLAGS = [
    (["--temperature", "-0.5"], r"--temperature must be >= 0, got -0\.5"),
    (["--top_p", "1.5"], r"--top_p must be > 0 and <= 1, got 1\.5"),
    (["--top_p", "0"], r"--top_p must be > 0 and <= 1"),
    (["--max_model_len", "0"], r"--max_model_len must be >= 1, got 0"),
    (["--batch_size", "-1"], r"--batch_size must be >= 1, got -1"),
    (["--instruction_max_tokens", "0"], r"--instruction_max_tokens must be >= 1"),
    (["--response_repetition_penalty", "0"], r"--response_repetition_penalty must be > 0"),
    (["--response_top_p", "2"], r"--response_top_p must be > 0 and <= 1"),
    (["--gpu_memory_utilization", "1.5"], r"--gpu_memory_utilization must be > 0 and <= 1"),
    (["--shard_size", "0"], r"--shard_size must be >= 1, got 0"),
    (["--num_rows", "0"], r"--num_rows must be >= 1"),
    (["--request_timeout", "0"], r"--request_timeout must be > 0"),
    (["--max_retries", "-1"], r"--max_retries must be >= 0"),
    (["--judge_reward_samples", "0"], r"--judge_reward_samples must be >= 1"),
    (["--mixture", "1.0:abc:1"], r"--mixture '1\.0:abc:1': '1\.0:abc:1' is not T:P:W"),
    (["--mixture", "1.0:1.5:1"], r"--mixture '1\.0:1\.5:1': the setting .* is refused .*0 < top_p <= 1"),
    (["--mixture", "hot"], r"--mixture 'hot'.*expected a name \(pro, air, embedded\), 'none'"),
    (["--mixture", "pro", "--temperature", "0.5"], r"both given \(in flags\): use --mixture none"),
    (["--no_filter", "--filter", "Filter2"], r"--no_filter writes no 'filtered' config, so --filter Filter2 would not run"),
    (["--instructions_only", "--stages", "task_category"], r"--instructions_only stops before the tagging stages"),
    (["--instructions_only", "--filter", "Filter2"], r"--instructions_only writes no responses or tags to filter"),
    (["--engine", "openai", "--model", "org/model"], r"--engine openai needs --base_url URL"),
    (["--model", "/no/such/model"], r"--model /no/such/model: no such folder"),
    (["--judge_model", "./typo-judge"], r"--judge_model ./typo-judge: no such folder"),
    (["--model", "bad id!!"], r"--model 'bad id!!' is neither a folder here nor a valid Hub id"),
    (["--push_to_hub", "me/bad repo", "--version", "1.0.0"], r"--push_to_hub 'me/bad repo' is not a Hub repository id"),
    (["--push_to_hub", "me/data", "--version", "one"], r"--version: Invalid version 'one'"),
    (["--preset", "nonsense"], r"--preset: unknown preset 'nonsense'; choose among cpu, paper"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_error_line_naming_it(argv, message, tmp_path):
    with pytest.raises(SystemExit) as info:  # the library raises ConfigError; the script's main makes it one line
        load_recipe("magpie_pro").main(["--preset", "cpu", "--output_dir", str(tmp_path / "out"), *argv])
    text = str(info.value.code)
    assert text.startswith("error: ") and len(text.splitlines()) == 1, text
    assert __import__("re").search(message, text), text
    assert not (tmp_path / "out").exists()  # nothing was made


BAD_FILES = [
    ("preset: nonsense\n", r"'preset' in --config .*: unknown preset 'nonsense'; choose among cpu, paper"),
    ("engine: vlm\n", r"--engine 'vlm' is not one of the choices: auto, transformers, vllm, openai"),
    ("temperature: -1\n", r"--temperature must be >= 0, got -1"),
    ("mixture: [{temperature: 1.0, top_p: 2.0, weight: 1}]\n", r"--mixture .* refused .*0 < top_p <= 1"),
    ("mixture: air\ntemperature: 0.5\n", r"both given \(in the same --config file\)"),
    ("num_rows: 0\n", r"--num_rows must be >= 1"),
]


@pytest.mark.parametrize("text, message", BAD_FILES, ids=[t.strip() for t, _ in BAD_FILES])
def test_a_bad_config_file_value_is_held_to_the_flag_rules(pro, text, message, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_recipe(pro, ["--config", str(path)])


def test_po_pairs_and_mt_turns_from_a_file_are_checked(tmp_path):
    path = tmp_path / "po.yaml"
    path.write_text("pairs: best-of-three\n")
    with pytest.raises(ConfigError, match="--pairs 'best-of-three' is not one of the choices: instruct-vs-base, best-of-n"):
        parse_recipe(load_recipe("magpie_po").PO, ["--preset", "cpu", "--config", str(path)])
    with pytest.raises(ConfigError, match="--min_turns 3 is more than --n_turns 2"):
        parse_recipe(load_recipe("magpie_mt").PRO_MT, ["--preset", "cpu", "--min_turns", "3"])


def test_output_dir_that_is_a_file_or_not_writable(pro, tmp_path):
    file = tmp_path / "a-file"
    file.write_text("x")
    with pytest.raises(ConfigError, match="--output_dir .*a-file is a file, not a folder"):
        parse_recipe(pro, ["--preset", "cpu", "--output_dir", str(file)])
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="--output_dir .*locked is not writable here"):
            parse_recipe(pro, ["--preset", "cpu", "--output_dir", str(locked / "run")])
    finally:
        locked.chmod(0o700)


# ------------------------------------------------------------------------------ what runs is what the card says
def test_temperature_and_top_p_replace_a_preset_mixture(pro, capsys, tmp_path):
    config = parse_recipe(pro, ["--preset", "cpu", "--temperature", "0.01", "--top_p", "0.01"])
    assert config.instructions.mixture is None
    (setting,) = config.instructions.decoding_mixture()
    assert (setting.temperature, setting.top_p) == (0.01, 0.01)
    # the preset's mixture alone: no unused temperature/top_p in the record
    preset = parse_recipe(pro, ["--preset", "cpu"])
    assert preset.instructions.mixture == "embedded" and preset.instructions.temperature is None
    # --mixture none: one setting at the defaults; a file's single setting under a flag's mixture: the mixture
    assert parse_recipe(pro, ["--preset", "cpu", "--mixture", "none"]).instructions.decoding_mixture()[0].temperature == 1.0
    path = tmp_path / "one.yaml"
    path.write_text("mixture: null\ntemperature: 0.7\ntop_p: 0.9\n")
    flagged = parse_recipe(pro, ["--config", str(path), "--mixture", "air"])
    assert len(flagged.instructions.decoding_mixture()) == 12 and flagged.instructions.temperature is None
    # the dry run (the card's configuration block is the same YAML) shows what runs
    load_recipe("magpie_pro").main(["--preset", "cpu", "--temperature", "0.01", "--top_p", "0.01", "--dry-run",
                                    "--output_dir", str(tmp_path / "dry")])
    out = capsys.readouterr().out
    assert "mixture: null" in out and "temperature: 0.01" in out and "top_p: 0.01" in out


# ------------------------------------------------------------------------------ the run folder never traps
def steps(num_rows=40, factor=None):
    return Numbers(num_rows=num_rows) >> (Double() if factor is None else Double(batch_size=factor))


def test_a_start_that_made_no_row_never_blocks_the_corrected_command(tmp_path, monkeypatch):
    monkeypatch.setattr(Numbers, "fail_at_shard", 0)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(steps(num_rows=40), tmp_path, shard_size=10, seed=1, progress=False).run()
    assert (tmp_path / "pipeline.json").exists() and not list(tmp_path.glob("stages/*/shard-*.json"))
    monkeypatch.setattr(Numbers, "fail_at_shard", None)
    fixed = Pipeline(steps(num_rows=30), tmp_path, shard_size=5, seed=2, progress=False).run()
    assert len(fixed) == 30 - 5  # multiples of 7 dropped
    assert json.loads((tmp_path / "pipeline.json").read_text())["seed"] == 2


def test_a_fix_to_a_stage_that_kept_no_row_keeps_the_earlier_stages(tmp_path, monkeypatch):
    """Stage 0 done, stage 1 failed before it kept a row: a changed stage-1 setting resumes on stage 0's rows."""
    def boom(self, dataset, *, seed):
        raise KeyboardInterrupt("stage 1 crashed")

    monkeypatch.setattr(KeepTop, "process_dataset", boom)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(Numbers(num_rows=20) >> KeepTop(k=5), tmp_path, shard_size=10, seed=1, progress=False).run()
    monkeypatch.undo()
    made = {p: p.stat().st_mtime_ns for p in tmp_path.glob("stages/00-*/shard-*.parquet")}
    assert len(made) == 2
    fixed = Pipeline(Numbers(num_rows=20) >> KeepTop(k=3), tmp_path, shard_size=10, seed=1, progress=False)
    assert len(fixed.run()) == 3
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("stages/00-*/shard-*.parquet")} == made  # not made again
    with pytest.raises(PipelineMismatchError, match=r"steps\[1\]\.k: 3 \(kept rows\) -> 4 \(this run\)"):
        Pipeline(Numbers(num_rows=20) >> KeepTop(k=4), tmp_path, shard_size=10, seed=1, progress=False).run()


def test_kept_rows_with_other_settings_name_each_difference_and_the_ways_out(tmp_path):
    Pipeline(steps(num_rows=40), tmp_path, shard_size=10, seed=1, progress=False).run()
    with pytest.raises(PipelineMismatchError) as info:
        Pipeline(steps(num_rows=50), tmp_path, shard_size=10, seed=3, progress=False).run()
    text = str(info.value)
    assert "seed: 1 (kept rows) -> 3 (this run)" in text and "steps[0].num_rows: 40 (kept rows) -> 50 (this run)" in text
    assert "--output_dir" in text and "--overwrite" in text and "resume with the kept settings" in text
    # batch sizes do not change rows: never a reason to refuse
    assert len(Pipeline(steps(factor=7), tmp_path, shard_size=10, seed=1, progress=False).run()) == 40 - 6
    # --overwrite starts over
    again = Pipeline(steps(num_rows=50), tmp_path, shard_size=10, seed=3, progress=False, overwrite=True).run()
    assert len(again) == 50 - 8


def test_settings_diff_names_keys():
    assert settings_diff({"seed": 0, "steps": [{"step": "A", "x": 1}]}, {"seed": 0, "steps": [{"step": "A", "x": 1}, {"step": "B"}]}) \
        == [("steps[1]", "(no step)", "B")]


@pytest.mark.parametrize("name", ["pipeline.json", "_stage.json"])
def test_a_damaged_record_is_named(tmp_path, name, caplog):
    Pipeline(Numbers(num_rows=20) >> KeepTop(k=3), tmp_path, shard_size=10, progress=False).run()
    target = tmp_path / name if name == "pipeline.json" else next(tmp_path.glob("stages/01-*/_stage.json"))
    target.write_text("{ not json")
    rerun = Pipeline(Numbers(num_rows=20) >> KeepTop(k=3), tmp_path, shard_size=10, progress=False)
    if name == "pipeline.json":
        with pytest.raises(PipelineMismatchError, match=f"{target} is unreadable .*--overwrite"):
            rerun.run()
    else:
        assert len(rerun.run()) == 3
        assert f"stage record {target} is damaged" in caplog.text


def test_a_recipe_on_a_folder_of_other_settings_exits_with_one_error(tmp_path):
    out = tmp_path / "run"
    layout = RunLayout(out)
    layout.write_json(layout.settings_path, {"seed": 99, "shard_size": 40, "steps": []})
    layout.input_dir.mkdir(parents=True)
    (layout.input_dir / "shard-00000.json").write_text("{}")  # rows kept under other settings
    with pytest.raises(SystemExit) as info:
        load_recipe("magpie_pro").main(["--preset", "cpu", "--num_rows", "4", "--output_dir", str(out)])
    text = str(info.value.code)
    assert text.startswith("error: ") and "seed: 99 (kept rows) -> 0 (this run)" in text and "--overwrite" in text
    assert "--debug" in text
    with pytest.raises(PipelineMismatchError):  # --debug: the traceback
        load_recipe("magpie_pro").main(["--preset", "cpu", "--num_rows", "4", "--output_dir", str(out), "--debug"])


# ------------------------------------------------------------------------------ the Hub, before the work
def test_push_without_a_token_stops_before_generation(hub, tmp_path):
    with pytest.raises(SystemExit, match="error: --push_to_hub needs a Hugging Face token"):
        load_recipe("magpie_pro").main(["--preset", "cpu", "--output_dir", str(tmp_path / "run"),
                                        "--push_to_hub", f"{USER}/data", "--version", "1.0.0"])
    assert not (tmp_path / "run").exists()


def test_push_to_an_existing_tag_or_with_a_refused_token_stops_before_generation(hub, tmp_path, monkeypatch):
    from magpie_hf.hub import publish

    publish(make_folder(tmp_path / "ds"), f"{USER}/data", "1.0.0", token=TOKEN)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    argv = ["--preset", "cpu", "--output_dir", str(tmp_path / "run"), "--push_to_hub", f"{USER}/data"]
    with pytest.raises(SystemExit, match=r"error: tester/data already has the tag v1\.0\.0.*--version \(e\.g\. 1\.0\.1\)"):
        load_recipe("magpie_pro").main([*argv, "--version", "1.0.0"])
    monkeypatch.setenv("HF_TOKEN", "hf_NOTAVALIDTOKEN0000000")
    with pytest.raises(SystemExit, match=r"error: The Hugging Face Hub refused the token \(HTTP 401\) while checking the token; nothing was generated yet"):
        load_recipe("magpie_pro").main([*argv, "--version", "1.0.1"])
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ servers
@pytest.mark.parametrize("misbehaviour, message", [
    ({"html": True}, r"/v1/models answered HTTP 200 with something that is not JSON \(text/html.*'<!DOCTYPE html>"),
    ({"delay": 3}, r"/v1/models did not answer \(APITimeoutError"),
], ids=["html", "silent"])
def test_a_misbehaving_server_is_named_at_start(server, misbehaviour, message, monkeypatch):
    from magpie_hf.engines import EngineConfig
    from magpie_hf.engines.openai import OpenAICompletionsEngine, OpenAIServerError

    server.configure(**misbehaviour)
    monkeypatch.setattr(OpenAICompletionsEngine, "PROBE_TIMEOUT_S", 1.0)
    config = EngineConfig.embedded(backend="openai", base_url=server.base_url, api_key_env=server.key_env, timeout_s=1.0)
    with pytest.raises(OpenAIServerError, match=message):
        OpenAICompletionsEngine(config)


def test_an_html_reply_to_a_request_names_the_url_and_body(server):
    from magpie_hf.engines import EngineConfig, SamplingConfig
    from magpie_hf.engines.openai import OpenAICompletionsEngine, OpenAIServerError

    engine = OpenAICompletionsEngine(EngineConfig.embedded(backend="openai", base_url=server.base_url,
                                                           api_key_env=server.key_env))
    server.configure(html=True)
    with pytest.raises(OpenAIServerError, match=r"/v1/completions answered HTTP 200 .*not JSON .*Please sign in"):
        engine.generate(["Hello"], SamplingConfig(max_tokens=2))


def test_recipe_server_flags_reach_the_engine(pro):
    config = parse_recipe(pro, ["--engine", "openai", "--base_url", "http://127.0.0.1:9/v1", "--model", "org/m",
                                "--request_timeout", "20", "--max_retries", "0"])
    engine = config.instruction_engine()
    assert (engine.timeout_s, engine.max_retries) == (20.0, 0)
    default = parse_recipe(pro, ["--engine", "openai", "--base_url", "http://127.0.0.1:9/v1", "--model", "org/m"])
    assert default.instruction_engine().timeout_s * (default.instruction_engine().max_retries + 1) <= 900


# ------------------------------------------------------------------------------ no secret, truthful exit status
@pytest.mark.slow
def test_a_key_in_base_url_reaches_no_log_line_file_or_hub(server, hub, tmp_path):
    """The key planted in --base_url authenticates (it goes in the header) and appears in no byte of stdout,
    stderr, the output folder or what reached the Hub (files and commit messages); nor does the Hub token."""
    from magpie_hf.utils.embedded import embedded_chat_model

    model_dir, gguf = embedded_chat_model()
    host = server.base_url.split("://", 1)[1]
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != server.key_env and not k.startswith("HF_")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1",
               HF_HOME=str(tmp_path / "home"), HF_TOKEN=TOKEN)
    for version, url in (("1.0.0", f"http://user:{server.secret}@{host}"), ("1.0.1", f"http://{host}?api_key={server.secret}")):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "recipes" / "magpie_pro.py"), "--engine", "openai", "--base_url", url,
             "--model", str(model_dir), "--gguf_file", gguf, "--num_rows", "2", "--shard_size", "2",
             "--instruction_max_tokens", "16", "--instructions_only", "--no_filter", "--output_dir", str(out),
             "--overwrite", "--push_to_hub", f"{USER}/secret-check", "--version", version],
            capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        for secret in (server.secret, TOKEN):
            assert secret not in proc.stdout + proc.stderr
            for path in out.rglob("*"):
                if path.is_file():
                    assert secret.encode() not in path.read_bytes(), path
    assert server.requests_seen() >= 2  # the key from the URL authenticated
    repo = hub.repo(f"{USER}/secret-check")
    assert set(repo.tags) == {"v1.0.0", "v1.0.1"}
    for commit in repo.commits.values():
        for secret in (server.secret, TOKEN):
            assert secret not in commit.title + commit.message
            assert all(secret.encode() not in blob.data for blob in commit.files.values())


@pytest.mark.slow
def test_a_push_that_did_not_happen_exits_non_zero_and_keeps_the_data(tmp_path):
    """An unreachable Hub: warned at start, the run finishes, the dataset is kept, the hint printed, status 1."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_TOKEN=TOKEN, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="0",
               HF_HOME=str(tmp_path / "home"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "magpie_pro.py"), "--preset", "cpu", "--num_rows", "2",
         "--instruction_max_tokens", "16", "--instructions_only", "--output_dir", str(tmp_path / "run"),
         "--push_to_hub", f"{USER}/data", "--version", "1.0.0"],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "magpie-hf push" in proc.stdout and "error: the dataset was not pushed" in proc.stderr
    assert (tmp_path / "run" / "dataset" / "README.md").exists()
    assert TOKEN not in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ bad rows are rows
def test_missing_empty_and_unencodable_instructions_are_null_rows_with_a_reason(embedded_engine, tmp_path):
    import datasets
    import pyarrow as pa

    from magpie_hf.steps import Responses

    step = Responses(engine=embedded_engine, max_tokens=4)
    step.load()
    batch = {"conversation_id": ["a", "b", "c", "d"], "instruction": ["Say hi.", None, "  ", "caf" + chr(0xD800)]}
    out = step.process(batch, seed=0)
    assert out["conversation_id"] == ["a", "b", "c", "d"]  # nothing dropped
    assert isinstance(out["response"][0], str) and out["response_error"][0] is None
    assert out["response"][1:] == [None, None, None] and out["response_finish_reason"][1:] == ["error"] * 3
    assert out["response_error"][1:] == ["no instruction (null)", "empty instruction",
                                         "instruction is not valid Unicode (a lone surrogate at character 3); kept with it escaped"]
    assert out["instruction"][3] == "caf\\ud800" and step.stats["invalid_instruction"] == 3
    pa.table({"instruction": out["instruction"], "response_error": out["response_error"]})  # storable
    # in a pipeline: the rows are kept and counted in the stage report (and so in the card's stage statistics)
    data = datasets.Dataset.from_dict({"conversation_id": ["x", "y"], "instruction": [None, "Name a fruit."]})
    pipe = Pipeline([Responses(engine=embedded_engine, max_tokens=4)], tmp_path, input_dataset=data, progress=False)
    rows = pipe.run()
    assert rows["response_error"][0] == "no instruction (null)" and rows["response"][1]
    assert pipe.manifest()["stages"][0]["stats"]["invalid_instruction"] == 1


def test_best_of_n_answers_of_a_bad_instruction_are_null_with_the_reason(embedded_engine):
    from magpie_hf.steps import MultiResponses

    step = MultiResponses(engine=embedded_engine, n=2, max_tokens=4, temperature=0.8)
    step.load()
    out = step.process({"instruction": ["", "Say hi.", None]}, seed=0)
    assert out["responses"][0] == [None, None] and out["responses_error"][0] == "empty instruction"
    assert out["responses_error"][2] == "no instruction (null)" and out["responses_finish_reasons"][2] == ["error", "error"]
    assert all(isinstance(r, str) for r in out["responses"][1]) and step.stats["invalid_instruction"] == 2


def test_repeated_conversation_ids_are_refused_up_front(tmp_path):
    import datasets

    data = datasets.Dataset.from_dict({"conversation_id": ["a", "b", "a"], "value": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match=r"1 conversation_id value\(s\) that repeat \(e\.g\. \['a'\]\).*with_indices=True"):
        Pipeline([Double()], tmp_path, input_dataset=data, progress=False).run()
    assert not (tmp_path / "pipeline.json").exists()


def test_setup_logging_quiets_other_libraries_whoever_configured_logging_first():
    """An earlier ``logging.basicConfig(level=INFO)`` (a notebook, another tool) must not let third-party INFO
    lines (an HTTP client's request URLs) through: ``setup_logging`` sets the root level itself."""
    import logging

    from magpie_hf.utils.logs import setup_logging

    root = logging.getLogger()
    before = root.level
    try:
        root.setLevel(logging.INFO)
        setup_logging()
        # WARNING or quieter: distilabel's own logging setup, imported by the interop tests, puts httpx at CRITICAL
        assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
        assert logging.getLogger("some.library").getEffectiveLevel() == logging.WARNING
        assert logging.getLogger("magpie_hf").getEffectiveLevel() == logging.INFO
    finally:
        root.setLevel(before)
