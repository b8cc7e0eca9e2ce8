"""The typed recipe configuration: flags and --config YAML (precedence, errors), presets, --dry-run of
every shipped config, and the shipped configs' values against the official run settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from magpie_hf.errors import ConfigError
from magpie_hf.recipe import instruction_step, parse_recipe
from magpie_hf.recipe.arguments import InstructionArguments, RunArguments
from magpie_hf.steps.generate import PRO_MIXTURE, DecodingSetting
from tests.conftest import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
CONFIGS = sorted((RECIPES / "configs").glob("*/*.yaml"))




def official_rows() -> dict[str, dict]:
    """The table of tests/fixtures/official_configs.md (a copy of the official run settings), by model."""
    rows = {}
    text = (Path(__file__).parent / "fixtures" / "official_configs.md").read_text()
    for line in text.splitlines():
        m = re.match(r"\|\s*([\w.-]+/[\w.-]+)\s*\|\s*([\d.]+) / ([\d.]+)\s*\|([^|]+)\|\s*(\d+)\s*\|([^|]*)\|", line)
        if not m:
            continue
        model, t, p, response, tp, flags = m.groups()
        response = response.strip()
        rt, rp = (0.0, 1.0) if response.split()[0] == "0" else (float(x) for x in response.split("/"))
        rows[model] = {"temperature": float(t), "top_p": float(p), "response_temperature": rt, "response_top_p": rp,
                       "tensor_parallel_size": int(tp), "flags": {f.strip() for f in flags.split(",") if f.strip()}}
    assert len(rows) >= 20, "the official settings table did not parse"
    return rows


def test_flags_override_the_file_which_overrides_the_preset(tmp_path):
    recipe = load_recipe("magpie_pro").PRO
    config_file = tmp_path / "run.yaml"
    config_file.write_text("response_temperature: 0.6\nnum_rows: 200000\njudge_model: Qwen/Qwen2.5-7B-Instruct\n"
                           "mixture: air\nchat_template_kwargs: '{\"enable_thinking\": false}'\n")
    config = parse_recipe(recipe, ["--config", str(config_file), "--num-rows", "300", "--model", "Qwen/Qwen2.5-72B-Instruct"])
    assert config.run.num_rows == 300  # flag over file
    assert config.responses.response_temperature == 0.6 and config.tagging.judge_model == "Qwen/Qwen2.5-7B-Instruct"
    assert config.instructions.model == "Qwen/Qwen2.5-72B-Instruct" and config.responses.response_model == config.instructions.model
    assert len(config.instructions.decoding_mixture()) == 12
    assert config.instructions.template_kwargs() == {"enable_thinking": False}
    assert config.engine.tensor_parallel_size == 4  # the recipe's paper default
    cpu = parse_recipe(recipe, ["--config", str(config_file), "--preset", "cpu"])
    assert cpu.run.num_rows == 200000 and cpu.instructions.model == "embedded"  # file over preset
    assert cpu.instruction_engine().gguf_file and cpu.judge_engine().model == "Qwen/Qwen2.5-7B-Instruct"


def test_bad_settings_stop_before_anything_loads(tmp_path):
    recipe = load_recipe("magpie_pro").PRO
    bad = tmp_path / "bad.yaml"
    bad.write_text("respons_temperature: 0.6\n")
    with pytest.raises(ConfigError, match="did you mean 'response_temperature'"):
        parse_recipe(recipe, ["--config", str(bad)])
    with pytest.raises(ConfigError, match="Unknown --stages"):
        parse_recipe(recipe, ["--stages", "quality"])
    with pytest.raises(ConfigError, match="needs --version"):
        parse_recipe(recipe, ["--push_to_hub", "me/data"])
    with pytest.raises(ConfigError, match="weights must sum to 1"):
        parse_recipe(recipe, ["--task_mix", "math=0.7,coding=0.2"])
    with pytest.raises(SystemExit):
        parse_recipe(recipe, ["--response-temperature", "hot"])
    with pytest.raises(ConfigError, match="Did you mean 'Filter1'"):
        parse_recipe(recipe, ["--filter", "filter1"])
    with pytest.raises(ConfigError, match="drop --system_prompt and --pre_query_template"):
        parse_recipe(recipe, ["--task", "math", "--system_prompt", "You are a tutor."])
    with pytest.raises(ConfigError, match="add --engine openai"):
        parse_recipe(recipe, ["--preset", "cpu", "--base_url", "http://127.0.0.1:8000/v1"])
    with pytest.raises(ConfigError, match="magpie_po runs fixed stages \\(reward\\); drop --stages"):
        parse_recipe(load_recipe("magpie_po").PO, ["--preset", "cpu", "--stages", "safety"])
    # the default filter reads the reward and neighbour columns: without those stages the plan is refused
    with pytest.raises(SystemExit, match="(?s)'Filter' needs columns .*--no_filter"):
        load_recipe("magpie_pro").main(["--stages", "safety", "--dry-run", "--output-dir", str(tmp_path / "out")])


def test_a_run_can_be_steered_without_python(tmp_path):
    pro = load_recipe("magpie_pro")
    config = parse_recipe(pro.PRO, ["--preset", "cpu", "--stages", "language,neighbors", "--response_model",
                                    "HuggingFaceTB/SmolLM2-360M-Instruct", "--engine", "transformers"])
    assert config.stages() == ["language", "neighbors"]
    assert config.response_engine().model == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert config.instruction_engine() != config.response_engine()
    only = parse_recipe(pro.PRO, ["--preset", "cpu", "--instructions_only"])
    assert only.run.instructions_only and only.stages() == list(pro.PRO.stages)
    assert RunArguments(stages="none").stage_list() == []
    assert InstructionArguments(mixture="1.0:1.0:3,1.2:0.99:1").decoding_mixture()[1].temperature == 1.2
    assert InstructionArguments(mixture=[{"temperature": 0.7, "top_p": 1.0, "weight": 1}]).decoding_mixture()[0].temperature == 0.7


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.name}" for p in CONFIGS])
def test_every_shipped_config_resolves_with_dry_run(path, capsys):
    recipe = path.parent.name
    assert load_recipe(recipe).main(["--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out.split("# stage plan")[0])
    plan = yaml.safe_load(out.split("# stage plan (nothing was loaded)")[1])
    assert resolved["dry_run"] is False and resolved["model"]
    named = yaml.safe_load(path.read_text())
    for key in ("model", "response_model", "judge_model", "reward_model"):
        if key in named:  # what a file names is what runs
            assert resolved[key] == named[key], key
    if path.name == "qwen3-32b-thinking.yaml":  # one model on both sides, as its comment says
        assert resolved["response_model"] == resolved["model"] == "Qwen/Qwen3-32B"
    assert plan["stages"][0]["step"] in {"MagpieInstructions", "TaskControlledInstructions"}


def test_shipped_configs_equal_the_official_run_settings():
    rows = official_rows()
    checked = 0
    for path in sorted((RECIPES / "configs" / "magpie_pro").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if data["model"] not in rows or path.name.startswith("paper-"):  # the paper's runs follow Table 6
            continue
        row = rows[data["model"]]
        config = parse_recipe(load_recipe("magpie_pro").PRO, ["--config", str(path)])
        i, r = config.instructions, config.responses
        assert i.decoding_mixture() == (DecodingSetting(row["temperature"], row["top_p"]),), path
        assert (r.response_temperature, r.response_top_p, r.response_repetition_penalty) == (
            row["response_temperature"], row["response_top_p"], 1.0), path
        assert config.engine.tensor_parallel_size == row["tensor_parallel_size"], path
        assert i.newline_stop == ("no-newline-stop" not in row["flags"]), path
        assert i.sanitize == ("sanitize" in row["flags"]), path
        assert i.no_markdown_start == ("no-markdown-start" in row["flags"]), path
        assert i.first_token_temperature_scale == (1.2 if "hot-first-token" in row["flags"] else 1.0), path
        # ... and the step the recipe builds applies them (the engine loads vLLM's first-step processor when needed)
        step = instruction_step(config)
        assert (step.newline_stop, step.no_markdown_start, step.first_token_temperature_scale) == (
            i.newline_stop, i.no_markdown_start, i.first_token_temperature_scale), path
        assert step.engine.first_token_rules == (i.no_markdown_start or i.first_token_temperature_scale != 1.0), path
        filters = [(f.name, getattr(f, "family", None)) for f in step.instruction_filters()]
        family = "gemma-2" if "gemma-2" in data["model"] else "llama-3"
        assert filters == ([("enumerator", None), ("label_prefix", None), ("query_end", family)] if i.sanitize else []), path
        assert (i.instruction_max_tokens, r.response_max_tokens, config.engine.dtype) == (2048, 4096, "bfloat16"), path
        checked += 1
    wanted = ["Meta-Llama-3-8B", "Meta-Llama-3-70B", "Meta-Llama-3.1-8B", "Meta-Llama-3.1-70B", "Llama-3.3-70B",
              "Qwen2-7B", "Qwen2-72B", "Qwen2.5-7B", "Qwen2.5-72B", "gemma-2-9b", "gemma-2-27b", "Phi-3-mini",
              "Phi-3-medium", "Mistral-7B-Instruct-v0.3", "Yi-1.5-34B"]
    shipped = " ".join(yaml.safe_load(p.read_text())["model"] for p in (RECIPES / "configs" / "magpie_pro").glob("*.yaml"))
    assert all(name in shipped for name in wanted), [n for n in wanted if n not in shipped]
    assert checked >= len(wanted)


def test_paper_configs_use_table_6():
    pro = parse_recipe(load_recipe("magpie_pro").PRO, ["--config", str(RECIPES / "configs/magpie_pro/paper-pro.yaml")])
    assert pro.instructions.decoding_mixture() == PRO_MIXTURE and pro.run.num_rows == 1_000_000
    air = load_recipe("magpie_air")
    config = parse_recipe(air.AIR, ["--config", str(RECIPES / "configs/magpie_air/paper-air.yaml")])
    mixture = config.instructions.decoding_mixture()
    assert len(mixture) == 12 and sum(m.weight for m in mixture) == 3_000_000


def test_recipe_help_shows_each_default_once_and_no_rest_markup(capsys):
    import re

    import pytest

    from magpie_hf.recipe import parse_recipe
    from tests.conftest import load_recipe

    with pytest.raises(SystemExit):
        parse_recipe(load_recipe("magpie_pro").PRO, ["--help"])
    text = capsys.readouterr().out
    assert "``" not in text
    assert "\n    python recipes/magpie_pro.py --preset cpu " in text  # the usage examples keep their lines
    blocks = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    assert blocks and all(block.count("(default") <= 1 for block in blocks), \
        [b for b in blocks if b.count("(default") > 1]
