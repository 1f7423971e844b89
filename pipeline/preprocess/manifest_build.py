"""The writer side of ``manifest.json``: what a preprocess run records about its dataset.

* :func:`params_record` and :func:`inputs_record`: the run's settings as the manifest stores
  them; ``params`` is also part of the journal's fingerprint (:mod:`.journal`).
* :func:`shard_prefix`: the dataset name the shard files are called by.
* :func:`settings_changes`: how a run's settings differ from a finished dataset's, so that
  replacing one needs ``--force``.
* :func:`build_manifest`: the manifest of a finished run, from its journal; and
  :func:`remove_stale`: the run's own older shards that the new manifest no longer lists.

Separate from :mod:`.manifest`, which is the format itself and its reader (also imported by
the train stage), and from :mod:`.run`, which decides when each of these happens.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from pipeline import __version__
from pipeline.config import PreprocessConfig
from pipeline.console import UserError
from pipeline.preprocess import manifest as mf
from pipeline.preprocess.journal import JOURNAL
from pipeline.preprocess.output import LocalOut, RemoteOut
from pipeline.preprocess.producer import ShardProducer
from pipeline.preprocess.sources import Inputs
from pipeline.preprocess.subimages import SampleParams


def build_manifest(run: ShardProducer) -> dict[str, Any]:
    """The manifest of a finished run, from its journal (every image must have an outcome)."""
    splits: dict[str, Any] = {}
    skipped = []
    for split in mf.SPLITS:
        tasks = run.inputs.tasks[split]
        outcomes = run.journal.images[split]
        missing = [t.source for t in tasks if t.index not in outcomes]
        if missing:
            raise UserError(f"{run.out / JOURNAL}: resume state lacks {missing[0]}; delete that file and rerun")
        images = sum(1 for t in tasks if outcomes[t.index]["samples"] > 0)
        for t in tasks:
            o = outcomes[t.index]
            if o["error"] or o["skipped"]:
                skipped.append({"file": t.path, "error": o["error"] or o["skipped"]})
        shards = [
            {k: rec[k] for k in ("name", "samples", "bytes", "sha256")}
            for _, rec in sorted(run.journal.shards[split].items())
        ]
        sizes = [outcomes[t.index].get("min_hr") for t in tasks if outcomes[t.index]["samples"] > 0]
        sizes = [hw for hw in sizes if hw]
        min_hr = [min(h for h, _ in sizes), min(w for _, w in sizes)] if sizes else None
        splits[split] = {
            "images": images, "samples": sum(s["samples"] for s in shards), "min_hr": min_hr, "shards": shards,
        }
    return {
        "format": mf.FORMAT,
        "format_version": mf.FORMAT_VERSION,
        "dataset": run.inputs.dataset,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "package_version": __version__,
        "params": params_record(run.params, run.cfg, run.prefix),
        "inputs": inputs_record(run.inputs, run.cfg),
        "splits": splits,
        "skipped": skipped,
    }


def params_record(params: SampleParams, cfg: PreprocessConfig, prefix: str) -> dict[str, Any]:
    """The manifest's ``params`` (also fingerprinted): everything that shapes the shards."""
    return {**params.as_dict(), "shard_samples": cfg.shard_samples, "name": prefix}


def shard_prefix(cfg: PreprocessConfig, inputs: Inputs) -> str:
    """``--name`` or the dataset's folder name, sanitized for shard file names."""
    given = cfg.name if cfg.name else inputs.dataset
    prefix = mf.sanitize_prefix(given)
    if not prefix:
        what = f"--name {cfg.name!r}" if cfg.name else f"dataset name {inputs.dataset!r}"
        raise UserError(f"{what}: no letters or digits to name the shards with; give --name (e.g. --name photos)")
    return prefix


def remove_stale(dest: LocalOut | RemoteOut, manifest: dict[str, Any], ours: set[str]) -> int:
    """Delete our own shard files that the new manifest does not list (older parameters).

    "Our own" means a shard-shaped name with this run's prefix or one an earlier manifest or
    journal here listed: another dataset's shards that happen to share the folder are kept."""
    listed = {s["name"] for split in mf.SPLITS for s in manifest["splits"][split]["shards"]}
    prefix = manifest["params"]["name"]
    removed = 0
    for name in dest.names():
        m = mf.SHARD_RE.match(name)
        if m and name not in listed and (m.group(1) == prefix or name in ours):
            dest.delete(name)
            removed += 1
    return removed


def inputs_record(inputs: Inputs, cfg: PreprocessConfig) -> dict[str, Any]:
    """The manifest's ``inputs``: the folders, and the holdout that split them."""
    record: dict[str, Any] = dict(inputs.roots)
    if cfg.holdout:
        record["holdout"] = cfg.holdout
    return record


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def settings_changes(dest: LocalOut | RemoteOut, params: dict[str, Any], inputs: dict[str, Any]) -> list[str]:
    """How this run's settings differ from those of the finished dataset in `dest` ([] when
    there is none, or it was made with the same settings)."""
    try:
        old = dest.read_manifest()
    except UserError:  # nothing finished here (or an unreadable manifest, replaced anyway)
        return []
    new = json.loads(json.dumps({"params": params, "inputs": inputs}))  # lists, as stored
    changes = []
    for section in ("params", "inputs"):
        before = old.get(section) if isinstance(old.get(section), dict) else {}
        if section == "params":  # what older manifests meant by leaving a field out
            before = {"encoding": "png", "name": mf.LEGACY_PREFIX, **before}
        after = new[section]
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                changes.append(f"{key} {_show(before.get(key))} -> {_show(after.get(key))}")
    return changes
