"""Planning a pipeline run: which scenes the inputs match, the names their outputs get, and
for each whether it runs or is skipped and why (from the ledger); ``--dry-run`` shows this
plan without running, locking or writing anything.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from geoseg.errors import ConfigError
from geoseg.io.remote import exists, is_remote, redact, remote_stem
from geoseg.models.bundle import Bundle, load_bundle
from geoseg.pipeline.config import PipelineConfig
from geoseg.pipeline.identity import file_identity, output_identity
from geoseg.pipeline.ledger import Ledger, SceneRow, default_ledger_path

__all__ = [
    "PlannedScene",
    "dry_run",
    "ledger_key",
    "ledger_path_for",
    "plan_run",
    "scene_stem",
    "scene_stems",
]

Action = Literal["run", "skip"]


@dataclass(frozen=True)
class PlannedScene:
    """A scene of the batch, whether it will run, and why; size in bytes, mtime in ns (for a
    remote scene, its version: see :func:`file_identity`)."""

    path: Path | str
    stem: str
    size: int | None
    mtime_ns: int | None
    action: Action
    reason: str


def ledger_key(path: Path | str) -> str:
    """How the ledger names a scene: its path, or its URL without query string or user info
    (a pre-signed URL's signature is neither kept in the ledger nor part of the identity)."""
    return redact(path) if isinstance(path, str) else str(path)


def scene_stem(path: Path | str) -> str:
    """The name a scene's outputs get: its file name without the last extension."""
    return remote_stem(path) if isinstance(path, str) else path.stem


def scene_stems(paths: list[Path | str], stac_items: dict[str, str]) -> list[str]:
    """The name of each scene's output folder: :func:`scene_stem`, or for a STAC item's asset
    whose file name another scene shares (``item1/visual.tif``, ``item2/visual.tif``, the usual
    layout of a catalogue) the item's id, with characters other than letters, digits, '.',
    '_' and '-' replaced by '_'."""
    plain = [scene_stem(p) for p in paths]
    counts = Counter(plain)
    return [
        re.sub(r"[^A-Za-z0-9._-]", "_", stac_items[str(p)])
        if counts[stem] > 1 and str(p) in stac_items
        else stem
        for p, stem in zip(paths, plain, strict=True)
    ]


def _outputs_on_disk(row: SceneRow) -> tuple[list[str], list[str]]:
    """(missing, changed): the outputs of ``row`` that are gone, and those whose identity
    differs from the one recorded when the row's run wrote them (another pipeline sharing
    ``outputs.dir``, or any other process, replaced them). Rows of runs that recorded no
    identities are only checked for missing files."""
    files = row.outputs.get("files", {})
    recorded = row.outputs.get("identity", {})
    missing, changed = [], []
    for name, p in sorted(files.items()):
        if recorded.get(name) is None:
            if not (exists(p) if is_remote(p) else Path(p).exists()):
                missing.append(name)
            continue
        now = output_identity(p)
        if now is None:
            missing.append(name)
        elif list(now) != list(recorded[name]):
            changed.append(name)
    return missing, changed


def _decide(
    path: Path | str,
    size: int | None,
    mtime: int | None,
    prev: SceneRow | None,
    config_hash: str,
    model_hash: str,
    force: bool,
) -> tuple[Action, str]:
    if size is None:
        return "run", "input cannot be read (will fail)"
    if force:
        return "run", "--force"
    if prev is None:
        return "run", "new: not done before by this pipeline"
    if (prev.size, prev.mtime_ns) != (size, mtime):
        return "run", "input changed (size, modification time or ETag differs)"
    if prev.model_hash != model_hash:
        return "run", f"model changed (was {prev.model_hash[:12]})"
    if prev.config_hash != config_hash:
        return "run", f"pipeline settings changed (was {prev.config_hash[:12]})"
    missing, changed = _outputs_on_disk(prev)
    if missing:
        return "run", f"outputs missing: {', '.join(missing)}"
    if changed:
        return "run", (
            f"outputs replaced since run {prev.run_id} wrote them (another pipeline sharing "
            f"the output folder?): {', '.join(changed)}"
        )
    return "skip", f"up to date (done in run {prev.run_id})"


def plan_run(
    config: PipelineConfig, bundle: Bundle, ledger: Ledger | None, force: bool = False
) -> list[PlannedScene]:
    """Every scene the inputs match, each with what to do and why. :class:`ConfigError` for
    an input filter the model cannot take, before any scene."""
    bundle.with_input_filter(config.predict.input_filter)
    paths = config.scene_paths()
    stems = scene_stems(paths, config.stac_items())
    _check_unique_stems(paths, stems)
    broken = config.stac_errors()
    config_hash = config.config_hash(bundle.spec)
    planned = []
    for path, stem in zip(paths, stems, strict=True):
        if str(path) in broken:
            planned.append(PlannedScene(path, stem, None, None, "run", "STAC item cannot be read"))
            continue
        size, mtime = file_identity(path)
        prev = ledger.last_done(config.name, ledger_key(path)) if ledger is not None else None
        action, reason = _decide(path, size, mtime, prev, config_hash, bundle.sha256, force)
        planned.append(PlannedScene(path, stem, size, mtime, action, reason))
    return planned


def _check_unique_stems(paths: list[Path | str], stems: list[str]) -> None:
    seen: dict[str, Path | str] = {}
    for p, stem in zip(paths, stems, strict=True):
        if stem in seen:
            raise ConfigError(
                f"scenes {ledger_key(seen[stem])} and {ledger_key(p)} would write the same "
                f"outputs ({stem}/); rename one or split them into two pipelines"
            )
        seen[stem] = p


def ledger_path_for(config: PipelineConfig, override: str | os.PathLike[str] | None) -> Path:
    if override is not None:
        return Path(override)
    return config.resolve(config.ledger) if config.ledger else default_ledger_path()


def dry_run(
    config: PipelineConfig,
    *,
    force: bool = False,
    ledger_path: str | os.PathLike[str] | None = None,
) -> list[PlannedScene]:
    """What :func:`run_pipeline` would do, without running, locking or writing anything."""
    bundle = load_bundle(config.model_path)
    path = ledger_path_for(config, ledger_path)
    if not path.exists():
        return plan_run(config, bundle, None, force)
    with Ledger(path) as ledger:
        return plan_run(config, bundle, ledger, force)
