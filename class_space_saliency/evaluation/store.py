"""The benchmark's append-only results store: a config file and one JSONL shard per rank.

Layout of ``out_dir``: ``config.json`` (what the run measures; checked on resume) and
``results.rank{r}.jsonl`` (one JSON record per line, appended and flushed per batch). Only
newline-terminated lines count: a line cut short by a killed process is dropped on resume.
Gzipped shards (``results.rank{r}.jsonl.gz``, as committed) are read too.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable
from pathlib import Path

from .protocols import PerturbationProtocol, protocol_to_dict

CONFIG_FILE = "config.json"
SHARD_GLOBS = ("results.rank*.jsonl", "results.rank*.jsonl.gz")
LOCALISATION = "localisation"
"""Protocol name of localisation records (one per image x method, for datasets with masks)."""


def record_key(record: dict) -> tuple:
    """Identity of a record: ``(image, method, protocol)``; a skip record has method None."""
    return (record["image"], record.get("method"), record.get("protocol"))


def _read_jsonl(path: Path) -> tuple[list[dict], int]:
    """Complete records of ``path`` and the byte length they span.

    A last line without a newline or that is not valid JSON is left out (a write cut
    short); an invalid line before the last raises ``ValueError``.
    """
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    lines = data.splitlines(keepends=True)
    records, valid = [], 0
    for number, line in enumerate(lines, 1):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no newline")
            records.append(json.loads(line))
        except ValueError as error:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number} is not a JSON record ({error})") from error
        valid += len(line)
    return records, valid


def _normalize(config: dict) -> dict:
    """``config`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(config))


def with_protocol_defaults(config: dict) -> dict:
    """``config`` with each protocol's knobs completed by their defaults.

    A run written before a knob existed ran with its default (e.g. ``upsample="bilinear"``),
    so it resumes and grows under today's config.
    """
    protocols = [protocol_to_dict(PerturbationProtocol(**knobs)) for knobs in config["protocols"]]
    return _normalize({**config, "protocols": protocols})


GROWABLE = ("n", "methods", "protocols")
"""Config entries a run folder accepts more of on a rerun."""


def merge_configs(stored: dict, wanted: dict) -> dict:
    """``stored`` grown by ``wanted``: the larger ``n``, the union of methods and protocols.

    Raises:
        ValueError: Naming the entries that differ otherwise (including a method or
            protocol of the same name with other settings).
    """
    stored, wanted = _normalize(stored), _normalize(wanted)
    keys = sorted(
        k
        for k in stored.keys() | wanted.keys()
        if k not in GROWABLE and stored.get(k) != wanted.get(k)
    )
    merged = dict(stored, n=max(stored["n"], wanted["n"]))
    for key in ("methods", "protocols"):
        merged[key] = stored[key] + [item for item in wanted[key] if item not in stored[key]]
        names = [item["name"] for item in merged[key]]
        if len(set(names)) != len(names):
            keys.append(key)
    if keys:
        raise ValueError(f"differs in {sorted(keys)}")
    return merged


class ResultStore:
    """Config and result shards of one benchmark run.

    Args:
        out_dir: Folder of the run (created if needed).
        rank: This process's rank; it appends to ``results.rank{rank}.jsonl`` only.

    Example:
        >>> store = ResultStore("runs/b16")
        >>> store.append([{"image": 0, "method": "class_space", "protocol": "p", "auc": 0.5}])
        >>> {record_key(r) for r in load_records("runs/b16")}  # what a resumed run skips
        {(0, 'class_space', 'p')}
    """

    def __init__(self, out_dir: str | Path, rank: int = 0) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.out_dir / CONFIG_FILE
        self.shard_path = self.out_dir / f"results.rank{rank}.jsonl"

    def check_config(self, config: dict) -> dict:
        """The config to run under: ``config``, or the stored one grown by it.

        A run may grow in the same folder (more images, more methods, more protocols);
        any other difference raises ``ValueError``.

        Returns:
            The merged config (``n`` the larger, methods and protocols the union).
        """
        if not self.config_path.exists():
            return _normalize(config)
        stored = with_protocol_defaults(json.loads(self.config_path.read_text()))
        try:
            return merge_configs(stored, config)
        except ValueError as error:
            raise ValueError(
                f"{self.out_dir} holds results of a different benchmark configuration "
                f"({error}); a run can only grow (more images, methods, protocols): use another "
                "output folder or delete it to start over"
            ) from None

    def write_config(self, config: dict) -> None:
        """Write ``config.json`` atomically (temporary file, then rename)."""
        temporary = self.config_path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(_normalize(config), indent=2) + "\n")
        os.replace(temporary, self.config_path)

    def repair(self) -> int:
        """Drop a cut-short last line of this rank's shard; return the bytes dropped."""
        if not self.shard_path.exists():
            return 0
        _, valid = _read_jsonl(self.shard_path)
        dropped = self.shard_path.stat().st_size - valid
        if dropped:
            with open(self.shard_path, "r+b") as handle:
                handle.truncate(valid)
        return dropped

    def append(self, records: Iterable[dict]) -> None:
        """Append records to this rank's shard, flushed and synced to disk."""
        lines = "".join(json.dumps(record) + "\n" for record in records)
        if not lines:
            return
        with open(self.shard_path, "a") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())


def _rank_of(path: Path) -> tuple[int, bool]:
    """Sort key of a shard: its rank, the plain file before the gzipped one."""
    rank = path.name.removeprefix("results.rank").removesuffix(".gz").removesuffix(".jsonl")
    return int(rank), path.suffix == ".gz"


def load_records(out_dir: str | Path) -> list[dict]:
    """All complete records of a run folder, merged over the rank shards.

    Args:
        out_dir: The folder ``run_benchmark`` wrote to (plain or gzipped shards).

    Returns:
        Records sorted by ``(image, method, protocol)``; where shards hold one key twice,
        the lowest rank's record is kept (a plain shard before its gzipped copy).
    """
    merged: dict[tuple, dict] = {}
    paths = [path for pattern in SHARD_GLOBS for path in Path(out_dir).glob(pattern)]
    for path in sorted(paths, key=_rank_of):
        for record in _read_jsonl(path)[0]:
            merged.setdefault(record_key(record), record)
    return sorted(
        merged.values(), key=lambda r: (r["image"], str(r.get("method")), str(r.get("protocol")))
    )


def load_config(out_dir: str | Path) -> dict:
    """The ``config.json`` of a run folder."""
    path = Path(out_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {out_dir} a benchmark output folder?")
    return json.loads(path.read_text())
