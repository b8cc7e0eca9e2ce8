"""Write a finished run as a dataset folder: Parquet per config, plots, run record and dataset card.

Example:
    >>> import datasets
    >>> from magpie_hf.hub import save_dataset_folder
    >>> raw = datasets.Dataset.from_dict({"instruction": ["Name a prime."], "response": ["7"]})
    >>> folder = save_dataset_folder("runs/demo/dataset", {"raw": raw}, {"recipe": "demo"})  # doctest: +SKIP
    >>> datasets.load_dataset(str(folder), "raw")["train"][0]["response"]                    # doctest: +SKIP
    '7'
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from magpie_hf.utils.redaction import LOCAL_PATHS_NOTE, hide_local_paths, redact

from .card import dataset_license, write_card
from .columns import stock_columns
from .layout import MAX_SHARD_BYTES, RUN_FILE, write_configs
from .plots import write_plots
from .stats import compute_stats

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)


def save_dataset_folder(
    folder: str | os.PathLike,
    configs: Mapping[str, datasets.Dataset | datasets.DatasetDict],
    run_info: dict,
    *,
    license: str | None = None,  # noqa: A002 - the Hub metadata field is called license
    source_model_license: str | None = None,
    pretty_name: str | None = None,
    embedding_map: bool = True,
    stats_config: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write ``configs`` under ``folder`` as a dataset that ``datasets.load_dataset(str(folder), CONFIG)`` reads.

    Args:
        folder: the dataset folder (created; files of the same configs are replaced).
        configs: config name -> ``Dataset`` (split "train") or ``DatasetDict``; the first config is the default.
            Configs with conversations get the published columns (:func:`magpie_hf.hub.columns.stock_columns`:
            ``messages``, ShareGPT ``conversations``, lengths, ``model``, upper-case ``language``).
        run_info: what the recipe knows about the run (``recipe``, ``command``, ``package_version``, ``models``,
            ``pre_query_template``, ``decoding_mixture``, ``seed``, ``response_sampling``, ``stage_stats``,
            ``filter_report``, ``preset``, ...). Every key is optional; anything that looks like a token is redacted,
            and absolute local paths are written relative to the working directory or by name.
        license: the license the user chooses for the data (a Hub license id); default: the license of the models
            that wrote the rows (``run_info["models"]``, :func:`magpie_hf.hub.card.dataset_license`).
        source_model_license: the generating model's license; default: looked up for known models.
        pretty_name: the card's title; default from the recipe name.
        embedding_map: draw the 2-D map of instruction embeddings (needs the embedded all-MiniLM-L6-v2).
        stats_config: the config the statistics describe (default: the one with the most tag columns).
        max_shard_bytes: split a split into several Parquet files above this many bytes of Arrow data.

    Returns:
        The folder's path.
    """
    from magpie_hf import __version__

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    run_info = hide_local_paths(redact(dict(run_info or {})))
    run_info.setdefault("package_version", __version__)
    configs = {name: _published(value) for name, value in configs.items()}
    layout = write_configs(root, configs, max_shard_bytes=max_shard_bytes)
    stats = compute_stats(layout, stats_config, seed=int(run_info.get("seed") or 0))
    try:
        plots = write_plots(stats, root, embedding_map=embedding_map, seed=int(run_info.get("seed") or 0))
    except Exception as err:  # plots are a courtesy: a missing optional model never loses the dataset
        logger.warning("Plots skipped: %s", err)
        plots = []
    record = {
        "format": 1,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "package_version": __version__,
        "license": license,
        "license_metadata": dataset_license(run_info.get("models"), license),
        "source_model_license": source_model_license,
        "local_paths": LOCAL_PATHS_NOTE,
        "pretty_name": pretty_name or _default_name(run_info),
        "run_info": run_info,
        "configs": layout.rows,
        "statistics": stats.to_dict(),
        "plots": [asdict(p) for p in plots],
    }
    (root / RUN_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    write_card(root, record=record, layout=layout)
    logger.info("Dataset written to %s (%s)", root, ", ".join(f"{c}: {layout.config_rows(c):,} rows" for c in layout.configs))
    return root


def _published(value):
    """A config with the published columns (a DatasetDict split by split); other values as they are."""
    import datasets

    if isinstance(value, datasets.DatasetDict):
        return datasets.DatasetDict({split: stock_columns(ds) for split, ds in value.items()})
    return stock_columns(value) if isinstance(value, datasets.Dataset) else value


#: the published names of the recipes' datasets (paper and official repository)
RECIPE_TITLES = {"magpie_pro": "Magpie-Pro", "magpie_air": "Magpie-Air", "magpie_mt": "Magpie-Pro-MT",
                 "magpie_po": "Magpie-PO", "magpie_reasoning": "Magpie-Reasoning"}


def _default_name(run_info: dict) -> str:
    """``Magpie-Pro from Qwen2.5-72B-Instruct``: the recipe's published name and the instruction model's."""
    recipe = str(run_info.get("recipe") or "magpie")
    name = recipe.replace("_", " ").replace("-", " ").strip()
    title = RECIPE_TITLES.get(recipe) or "-".join(w if w.isupper() else w.capitalize() for w in name.split()) or "Magpie"
    models = run_info.get("models")
    model = (models.get("instruct") or models.get("instruction") or models.get("generator")) if isinstance(models, dict) else models
    if model:
        short = str(model).split("::")[0].split(" (")[0].rstrip("/").rsplit("/", 1)[-1]
        return f"{title} from {short}" if short else title
    return title
