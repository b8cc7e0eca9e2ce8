"""The dataset card: YAML metadata (``huggingface_hub.DatasetCardData``) plus text from Jinja templates.

Templates live in ``hub_cards/`` at the repository root (or, in an installed wheel, in
``magpie_hf/hub_cards/``): ``dataset_card.md.j2`` includes ``_provenance.md.j2`` and ``_statistics.md.j2``.
The card is rendered from the run record ``magpie_run.json`` that :func:`magpie_hf.hub.save_dataset_folder`
writes, so :func:`magpie_hf.hub.publish` can re-render it with the repository id and version without
recomputing statistics or plots.

Example:
    >>> from magpie_hf.hub.card import render_card
    >>> text = render_card("runs/pro/dataset", repo_id="me/magpie-pro", version="v1.0.0")  # doctest: +SKIP
    >>> text.splitlines()[0]                                                               # doctest: +SKIP
    '---'
"""

from __future__ import annotations

import json
import math
import os
import re
from functools import lru_cache
from pathlib import Path

from magpie_hf.errors import CardTemplateNotFound
from magpie_hf.utils.redaction import local_path

from .layout import CARD_FILE, RUN_FILE, FolderLayout, read_layout

TEMPLATE = "dataset_card.md.j2"
PAPER_URL = "https://arxiv.org/abs/2406.08464"

#: licenses of known models, first matching model-id prefix first: a Hub license id
#: (https://huggingface.co/docs/hub/repositories-licenses), or (name, link) for a custom license (the model card's
#: ``license: other`` + ``license_name`` + ``license_link``)
_QWEN = "https://huggingface.co/Qwen/{}/blob/main/LICENSE"
KNOWN_MODEL_LICENSES: tuple[tuple[str, str | tuple[str, str]], ...] = (
    ("meta-llama/Meta-Llama-3.1-", "llama3.1"),
    ("meta-llama/Llama-3.1-", "llama3.1"),
    ("meta-llama/Llama-3.2-", "llama3.2"),
    ("meta-llama/Llama-3.3-", "llama3.3"),
    ("meta-llama/Meta-Llama-3-", "llama3"),
    ("meta-llama/Llama-2-", "llama2"),
    ("meta-llama/Meta-Llama-Guard-2", "llama3"),
    ("meta-llama/Llama-Guard-3", "llama3.1"),
    ("sfairXC/FsfairX-LLaMA3-RM", "llama3 (derived from Llama-3)"),
    ("HuggingFaceTB/SmolLM2-", "apache-2.0"),
    ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0"),
    ("sentence-transformers/all-mpnet-base-v2", "apache-2.0"),
    ("google/gemma-", "gemma"),
    ("microsoft/Phi-3", "mit"),
    ("mistralai/Mistral-7B-Instruct", "apache-2.0"),
    ("01-ai/Yi-1.5-", "apache-2.0"),
    ("Qwen/Qwen2.5-72B-Instruct", ("qwen", _QWEN.format("Qwen2.5-72B-Instruct"))),
    ("Qwen/Qwen2.5-Math-72B-Instruct", ("qwen", _QWEN.format("Qwen2.5-Math-72B-Instruct"))),
    ("Qwen/Qwen2.5-3B-Instruct", ("qwen-research", _QWEN.format("Qwen2.5-3B-Instruct"))),
    ("Qwen/Qwen2-72B-Instruct", ("tongyi-qianwen", _QWEN.format("Qwen2-72B-Instruct"))),
    ("Qwen/Qwen2.5-", "apache-2.0"),
    ("Qwen/Qwen2-", "apache-2.0"),
    ("Qwen/Qwen3-", "apache-2.0"),
    ("deepseek-ai/DeepSeek-Coder-V2-Lite", ("deepseek-license",
                                            "https://github.com/deepseek-ai/DeepSeek-Coder-V2/blob/main/LICENSE-MODEL")),
    ("deepseek-ai/DeepSeek-R1", "mit"),
)
#: run_info keys the templates render in their own sections; any other key is listed under "Other settings"
KNOWN_RUN_KEYS = (
    "recipe",
    "command",
    "package_version",
    "models",
    "pre_query_template",
    "chat_template_kwargs",
    "decoding_mixture",
    "seed",
    "response_sampling",
    "stage_stats",
    "filter_report",
    "preset",
    "language_target",
    "reasoning",
    "task_control",
    "configuration",
    "reproducibility",
)


def templates_dir() -> Path:
    """``<repo>/hub_cards`` in a source checkout (editable installs), else the copy inside the installed package."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "hub_cards", here.parents[1] / "hub_cards"):
        if (candidate / TEMPLATE).is_file():
            return candidate
    raise CardTemplateNotFound(
        f"Dataset card templates ({TEMPLATE}) not found in {here.parents[2] / 'hub_cards'} or "
        f"{here.parents[1] / 'hub_cards'}; reinstall magpie-hf."
    )


def model_license(model_id: str) -> str | None:
    """The license of a known model: its Hub license id, or the name of its custom license; None when unknown."""
    found = _known_license(model_id)
    return found[0] if isinstance(found, tuple) else found


def _known_license(model_id: str) -> str | tuple[str, str] | None:
    return next((license_ for prefix, license_ in KNOWN_MODEL_LICENSES if str(model_id).startswith(prefix)), None)


def dataset_license(models: dict | None, license: str | None = None) -> dict[str, str]:  # noqa: A002
    """The card's license metadata: ``{"license": id}``, or ``{"license": "other", "license_name", "license_link"}``.

    ``license`` (the user's ``--license``) wins; otherwise it is the license of the models that wrote the rows
    (instruction and response models; not the judge, guard, reward or embedding models): the Hub's id where the
    model has one, its custom license's name and link where not, every license named when they differ.

    Example:
        >>> dataset_license({"instruct": "Qwen/Qwen2.5-7B-Instruct", "judge": "meta-llama/Meta-Llama-3-8B-Instruct"})
        {'license': 'apache-2.0'}
        >>> dataset_license({"instruct": "Qwen/Qwen2.5-72B-Instruct"})["license_name"]
        'qwen'
    """
    if license:
        return {"license": license}
    generators = [str(m) for role, m in (models or {}).items() if m and str(role).lower() not in NON_GENERATOR_ROLES]
    found: dict[str, str | None] = {}  # license name -> link (None: a Hub id)
    for model in dict.fromkeys(generators):
        known = _known_license(model)
        if isinstance(known, tuple):
            found[known[0]] = known[1]
        elif known is not None:
            found[known] = None
        else:  # unknown here: the model's own card says it
            model_id = model.split("::")[0].split(" (")[0]
            found[f"license-of-{_slug(model_id)}"] = (
                f"https://huggingface.co/{model_id}" if re.fullmatch(r"[\w.-]+/[\w.-]+", model_id) else None)
    if len(found) == 1 and next(iter(found.values())) is None and not next(iter(found)).startswith("license-of-"):
        return {"license": next(iter(found))}
    if not found:
        return {"license": "other", "license_name": "see-dataset-card"}
    metadata = {"license": "other", "license_name": "-and-".join(_slug(name) for name in found)}
    link = next((link for link in found.values() if link), None)
    if link:
        metadata["license_link"] = link
    return metadata


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def size_category(rows: int) -> str:
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
    return next((name for bound, name in bounds if rows < bound), "n>1T" if rows >= 10**12 else "1B<n<10B")


# ---------------------------------------------------------------------------------------------- jinja filters
def _missing(value) -> bool:
    import jinja2

    return value is None or isinstance(value, jinja2.Undefined)


def _num(value) -> str:
    if _missing(value):
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value.is_integer():
            return f"{int(value):,}" if abs(value) >= 100 else f"{value:.1f}"
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _cell(value) -> str:
    """Make a value safe inside a Markdown table cell."""
    if isinstance(value, (dict, list)):
        value = json.dumps(value, ensure_ascii=False)
    return "–" if _missing(value) else str(value).replace("|", "\\|").replace("\n", " ").strip()


def _kv(value) -> str:
    if isinstance(value, dict):
        return _cell(", ".join(f"{k}={_num(v)}" for k, v in value.items())) if value else "–"
    return _cell(value)


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


@lru_cache(maxsize=4)
def _environment(directory: str):
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(directory),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.ChainableUndefined,  # run_info is free-form: a missing key renders as "–", never fails
        autoescape=False,
    )
    env.filters.update(num=_num, cell=_cell, kv=_kv, tojson_text=_json)
    return env


# ---------------------------------------------------------------------------------------------- card
def card_data(record: dict, layout: FolderLayout):
    """The YAML metadata of the card as ``huggingface_hub.DatasetCardData``."""
    from huggingface_hub import DatasetCardData

    largest = max(layout.config_rows(c) for c in layout.configs)
    tags = ["synthetic", "magpie", "magpie-hf"] + [c for c in ("sft", "dpo") if c in layout.configs]
    extra = record_license(record)
    languages = _hub_languages(record.get("statistics") or {})
    data = DatasetCardData(
        pretty_name=record["pretty_name"],
        language=languages or None,
        task_categories=["text-generation"],
        size_categories=[size_category(largest)],
        tags=tags,
        configs=layout.card_configs(),
        **extra,
    )
    layout.dataset_infos().to_dataset_card_data(data)
    return data


def record_license(record: dict) -> dict[str, str]:
    """The license metadata of a run record (a record from before license metadata was recorded: from its fields)."""
    if record.get("license_metadata"):
        return dict(record["license_metadata"])
    license_ = record.get("license")
    return dataset_license((record.get("run_info") or {}).get("models"), None if license_ in (None, "other") else license_)


def _hub_languages(statistics: dict) -> list[str]:
    """Two-letter language codes with at least 1% of the rows (Hub metadata wants lowercase ISO 639-1)."""
    counts = (statistics.get("categorical") or {}).get("language", {}).get("counts") or {}
    total = sum(counts.values()) or 1
    return [v.lower() for v, c in counts.items() if re.fullmatch(r"[A-Za-z]{2}", v) and c / total >= 0.01][:10]


#: model roles that do not write the rows (their licenses are listed, but the card's "source model" is the generator)
NON_GENERATOR_ROLES = ("embedding", "embeddings", "reward", "reward_model", "guard", "safety", "tagger", "judge", "language")


def model_sources(record: dict) -> tuple[list[dict], str | None]:
    """``[{role, model, license, generator}]`` for the run's models, and the source (generator) models' license.

    ``record["source_model_license"]`` (the user's word) wins over the table of known model licenses.
    """
    models = (record.get("run_info") or {}).get("models") or {}
    if not isinstance(models, dict):
        models = {"generator": models}
    override = record.get("source_model_license")
    sources = []
    for role, model in models.items():
        if not model:
            continue
        generator = str(role).lower() not in NON_GENERATOR_ROLES
        license_name = override if generator and override else model_license(str(model))
        sources.append({"role": role, "model": model, "license": license_name, "generator": generator})
    generator_licenses = sorted({s["license"] for s in sources if s["generator"] and s["license"]})
    return sources, override or (", ".join(generator_licenses) if generator_licenses else None)


def categorical_tables(statistics: dict | None, top: int = 15) -> list[dict]:
    """Rows of the card's tag tables: the ``top`` most frequent values, the rest folded into "(other values)"."""
    tables = []
    for name, column in ((statistics or {}).get("categorical") or {}).items():
        counts = list(column["counts"].items())
        total = sum(c for _, c in counts) or 1
        shown = counts if len(counts) <= top + 1 else counts[:top]
        rows = [{"value": v, "count": c, "share": 100 * c / total} for v, c in shown]
        if len(shown) < len(counts):
            rest = sum(c for _, c in counts[top:])
            rows.append({"value": f"({len(counts) - top} other values)", "count": rest, "share": 100 * rest / total})
        tables.append({"name": name, "label": column["label"], "rows": rows})
    return tables


def render_card(
    folder: str | os.PathLike,
    *,
    repo_id: str | None = None,
    version: str | None = None,
    record: dict | None = None,
    layout: FolderLayout | None = None,
) -> str:
    """Render ``README.md`` for ``folder`` from its run record: a Hub card when ``repo_id`` is given, else local."""
    from huggingface_hub import DatasetCard

    root = Path(folder)
    layout = layout or read_layout(root)
    if record is None:
        record = json.loads((root / RUN_FILE).read_text(encoding="utf-8"))
    record = json.loads(json.dumps(record, default=str))  # render exactly what magpie_run.json holds
    run_info = record.get("run_info") or {}
    data = card_data(record, layout)
    sources, source_license = model_sources(record)
    context = {
        "card_data": data.to_yaml(),
        "pretty_name": record["pretty_name"],
        "license": record_license(record),
        "license_chosen": record.get("license") not in (None, "other"),
        "source_model_license": source_license,
        "generators": [s for s in sources if s["generator"]],
        "sources": sources,
        "paper_url": PAPER_URL,
        "repo_id": repo_id,
        "version": version,
        "folder": local_path(str(root.resolve())),
        "configs": [
            {"name": c, "splits": layout.rows[c], "rows": layout.config_rows(c), "default": i == 0}
            for i, c in enumerate(layout.configs)
        ],
        "default_config": layout.configs[0],
        "run": {key: run_info.get(key) for key in KNOWN_RUN_KEYS},
        "extra_settings": {k: v for k, v in run_info.items() if k not in KNOWN_RUN_KEYS},
        "created": record.get("created"),
        "statistics": record.get("statistics"),
        "categorical_tables": categorical_tables(record.get("statistics")),
        "plots": record.get("plots") or [],
        "package_version": run_info.get("package_version") or record.get("package_version"),
    }
    template = _environment(str(templates_dir())).get_template(TEMPLATE)
    text = template.render(**context)
    text = re.sub(r"\n{3,}", "\n\n", text)
    DatasetCard(text)  # parses the metadata block: a template bug fails here, not on the Hub
    return text


def write_card(folder: str | os.PathLike, **kwargs) -> Path:
    path = Path(folder) / CARD_FILE
    path.write_text(render_card(folder, **kwargs), encoding="utf-8")
    return path
