"""The folder layout of a published dataset: Parquet per config and split, the way the Hub expects it.

```
folder/
  README.md                                   dataset card (YAML metadata + text)
  magpie_run.json                             provenance: run_info, statistics, license
  plots/*.png                                 plots linked from the card
  data/<config>/<split>-00000-of-00001.parquet
```

The card's ``configs:`` metadata points every config/split at its files, so both
``datasets.load_dataset(str(folder), "raw")`` and ``load_dataset("user/repo", "raw")`` read the same rows.

Example:
    >>> import datasets
    >>> from magpie_hf.hub.layout import write_configs
    >>> layout = write_configs("/tmp/ds", {"raw": datasets.Dataset.from_dict({"instruction": ["Hi"]})})  # doctest: +SKIP
    >>> layout.files("raw")                                                                           # doctest: +SKIP
    {'train': ['data/raw/train-00000-of-00001.parquet']}
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets

DATA_DIR = "data"
PLOTS_DIR = "plots"
CARD_FILE = "README.md"
RUN_FILE = "magpie_run.json"
#: one Parquet file per this many bytes of Arrow data (the Hub's own converter uses ~500 MB)
MAX_SHARD_BYTES = 500 * 1024 * 1024

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHARD = re.compile(r"^(?P<split>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.parquet$")


@dataclass
class FolderLayout:
    """Which Parquet files (relative POSIX paths) hold each config's splits, and their row counts."""

    root: Path
    splits: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # config -> split -> files
    rows: dict[str, dict[str, int]] = field(default_factory=dict)  # config -> split -> rows
    num_bytes: dict[str, dict[str, int]] = field(default_factory=dict)  # config -> split -> uncompressed bytes
    file_bytes: dict[str, dict[str, int]] = field(default_factory=dict)  # config -> split -> Parquet bytes

    @property
    def configs(self) -> list[str]:
        return list(self.splits)

    def files(self, config: str) -> dict[str, list[str]]:
        return self.splits[config]

    def all_files(self) -> list[str]:
        return [f for splits in self.splits.values() for files in splits.values() for f in files]

    def config_rows(self, config: str) -> int:
        return sum(self.rows[config].values())

    def dataset_infos(self):
        """``datasets``' own per-config info (features, split sizes) for the card's ``dataset_info`` metadata.

        Besides telling the Hub viewer the schema, the sizes make ``datasets``' local cache key change when a
        folder's content changes (datasets 5.2 keys a local folder with a ``configs:`` card only on its name and
        the card's metadata, so two runs written to ``.../dataset`` would otherwise share a cache entry).
        """
        import datasets
        import pyarrow.parquet as pq
        from datasets.info import DatasetInfosDict

        infos = DatasetInfosDict()
        for config, splits in self.splits.items():
            first = self.root / next(iter(splits.values()))[0]
            split_dict = datasets.SplitDict()
            for split in splits:
                split_dict.add(datasets.SplitInfo(name=split, num_bytes=self.num_bytes[config][split], num_examples=self.rows[config][split]))
            infos[config] = datasets.DatasetInfo(
                features=datasets.Features.from_arrow_schema(pq.read_schema(first)),
                splits=split_dict,
                download_size=sum(self.file_bytes[config].values()),
                dataset_size=sum(self.num_bytes[config].values()),
                config_name=config,
            )
        return infos

    def _add_file(self, config: str, split: str, relpath: str) -> None:
        import pyarrow.parquet as pq

        path = self.root / relpath
        meta = pq.ParquetFile(path).metadata
        self.splits.setdefault(config, {}).setdefault(split, []).append(relpath)
        for table, value in (
            (self.rows, meta.num_rows),
            (self.num_bytes, sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))),
            (self.file_bytes, path.stat().st_size),
        ):
            table.setdefault(config, {})[split] = table.get(config, {}).get(split, 0) + value

    def card_configs(self) -> list[dict]:
        """The ``configs:`` entries of the card metadata; the first config is the default."""
        return [
            {
                "config_name": config,
                "data_files": [{"split": split, "path": f"{DATA_DIR}/{config}/{split}-*"} for split in splits],
                **({"default": True} if i == 0 else {}),
            }
            for i, (config, splits) in enumerate(self.splits.items())
        ]


def check_name(name: str, what: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"Invalid {what} name {name!r}: use letters, digits, '_', '-' or '.' (e.g. 'raw', 'sft').")
    return name


def write_configs(
    folder: str | os.PathLike,
    configs: Mapping[str, datasets.Dataset | datasets.DatasetDict],
    *,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> FolderLayout:
    """Write every config as ``folder/data/<config>/<split>-0000i-of-0000N.parquet`` (a Dataset is split "train").

    Files of a config that is rewritten are replaced, never mixed with old shards.
    """
    import datasets

    if not configs:
        raise ValueError("No configs to write: pass e.g. {'raw': dataset}.")
    root = Path(folder)
    layout = FolderLayout(root)
    for config, value in configs.items():
        check_name(config, "config")
        if isinstance(value, datasets.Dataset):
            splits = {"train": value}
        elif isinstance(value, datasets.DatasetDict):
            splits = dict(value)
        else:
            raise TypeError(f"Config {config!r} must be a datasets.Dataset or DatasetDict, not {type(value).__name__}.")
        target = root / DATA_DIR / config
        target.mkdir(parents=True, exist_ok=True)
        for stale in target.glob("*.parquet"):
            stale.unlink()
        for split, dataset in splits.items():
            check_name(split, "split")
            num_shards = max(1, math.ceil(dataset.data.nbytes / max_shard_bytes)) if len(dataset) else 1
            for index in range(num_shards):
                name = f"{split}-{index:05d}-of-{num_shards:05d}.parquet"
                shard = dataset.shard(num_shards, index, contiguous=True) if num_shards > 1 else dataset
                tmp = target / f".{name}.tmp"
                shard.to_parquet(str(tmp))
                tmp.replace(target / name)  # atomic: a killed run never leaves half a Parquet file
                layout._add_file(config, split, f"{DATA_DIR}/{config}/{name}")
    return layout


def read_layout(folder: str | os.PathLike) -> FolderLayout:
    """Find the configs, splits and row counts of a folder written by :func:`write_configs`.

    Config order follows the card's ``configs:`` metadata when there is a card (so the default stays first).
    """
    root = Path(folder)
    data = root / DATA_DIR
    if not data.is_dir():
        raise FileNotFoundError(f"{root} is not a dataset folder: {data} is missing (write it with save_dataset_folder).")
    order = _card_config_order(root)
    found = sorted(p.name for p in data.iterdir() if p.is_dir() and any(p.glob("*.parquet")))
    layout = FolderLayout(root)
    for config in [c for c in order if c in found] + [c for c in found if c not in order]:
        for path in sorted((data / config).glob("*.parquet")):
            match = _SHARD.match(path.name)
            layout._add_file(config, match.group("split") if match else path.stem, f"{DATA_DIR}/{config}/{path.name}")
    if not layout.splits:
        raise FileNotFoundError(f"No Parquet files under {data}/<config>/.")
    return layout


def _card_config_order(root: Path) -> list[str]:
    card = root / CARD_FILE
    if not card.exists():
        return []
    from huggingface_hub import DatasetCard

    try:
        configs = DatasetCard(card.read_text(encoding="utf-8")).data.to_dict().get("configs") or []
    except Exception:  # a hand-edited card with broken YAML: fall back to alphabetical order
        return []
    return [c["config_name"] for c in configs if isinstance(c, dict) and "config_name" in c]
