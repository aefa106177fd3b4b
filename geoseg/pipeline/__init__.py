"""Batch pipelines: YAML configs, the idempotent runner, the run ledger, locks and scheduling."""

from __future__ import annotations

from geoseg.pipeline.config import PipelineConfig, load_pipeline, load_pipelines
from geoseg.pipeline.ledger import Ledger
from geoseg.pipeline.lock import PipelineLock, PipelineLocked
from geoseg.pipeline.planning import PlannedScene, dry_run
from geoseg.pipeline.runner import RunSummary, SceneResult, run_pipeline

__all__ = [
    "Ledger",
    "PipelineConfig",
    "PipelineLock",
    "PipelineLocked",
    "PlannedScene",
    "RunSummary",
    "SceneResult",
    "dry_run",
    "load_pipeline",
    "load_pipelines",
    "run_pipeline",
]
