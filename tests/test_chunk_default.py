"""The default chunk on a GPU: chosen from the halo and the device's memory, so that the halo
costs at most 15 % more model pixels where memory allows; the bundle's chunk on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from geoseg.engine import plan as engine_plan
from geoseg.engine.options import PredictOptions
from geoseg.engine.plan import MAX_REDUNDANCY, default_chunk, redundancy, scene_grid
from geoseg.io.raster import open_scene
from geoseg.models.bundle import ModelSpec

GIB = 2**30


def spec(chunk: int = 512, halo: int = 32, **kw: Any) -> ModelSpec:
    return ModelSpec(encoder="resnet34", chunk=chunk, halo=halo, **kw)


@pytest.mark.parametrize(
    "halo, expect",
    [(0, 512), (16, 512), (32, 1024), (64, 2048), (128, 3584), (288, 8192)],
)
def test_smallest_tile_multiple_within_the_redundancy_target(halo: int, expect: int) -> None:
    """With memory to spare: the smallest multiple of 512 px (from the bundle's chunk up) whose
    halo costs at most 15 %; 512 px already does for halos up to 16 px."""
    chunk = default_chunk(spec(halo=halo), halo, 1, 141 * GIB, 50_000)
    assert chunk == expect
    assert redundancy(chunk, halo) <= MAX_REDUNDANCY
    assert chunk == 512 or redundancy(chunk - 512, halo) > MAX_REDUNDANCY


def test_memory_caps_the_chunk_and_the_redundancy_is_then_reported_above_target() -> None:
    """A 288 px halo on a smaller GPU: the largest chunk whose forward pass fits half the
    memory (the estimate grows with the square of the window, and with the batch)."""
    s = spec(halo=288)
    on_80 = default_chunk(s, 288, 1, 80 * GIB, 50_000)
    on_24 = default_chunk(s, 288, 1, 24 * GIB, 50_000)
    batched = default_chunk(s, 288, 4, 80 * GIB, 50_000)
    assert 512 < on_24 < on_80 < 8192 and batched < on_80
    for chunk, memory, batch in ((on_80, 80, 1), (on_24, 24, 1), (batched, 80, 4)):
        side = chunk + 2 * 288
        need = engine_plan.FORWARD_PEAK_FACTOR * engine_plan.forward_bytes_lower_bound(
            s, batch, side, side
        )
        assert need <= engine_plan.GPU_MEMORY_SHARE * memory * GIB
        bigger = side + 512
        assert (
            engine_plan.FORWARD_PEAK_FACTOR
            * engine_plan.forward_bytes_lower_bound(s, batch, bigger, bigger)
            > engine_plan.GPU_MEMORY_SHARE * memory * GIB
        )
        assert redundancy(chunk, 288) > MAX_REDUNDANCY
    assert default_chunk(s, 288, 1, 1 * GIB, 50_000) == 512  # never below the bundle's


def test_no_larger_than_the_scene_needs() -> None:
    assert default_chunk(spec(halo=64), 64, 1, 141 * GIB, 1500) == 1536
    assert default_chunk(spec(halo=64), 64, 1, 141 * GIB, 300) == 512


def test_cpu_keeps_the_bundles_chunk_gpu_chooses_an_option_wins(
    tmp_path: Path, rgb_scene: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU the bundle's chunk (same outputs and memory as before); on a GPU the chunk
    from the halo and the device's total memory; an explicit --chunk always; a remote
    cluster's workers are not this machine: the bundle's chunk."""
    scene = open_scene(rgb_scene(4000, 3000))
    s = spec(halo=64)
    assert scene_grid(scene, s, PredictOptions(device="cpu")).chunk == 512
    monkeypatch.setattr(engine_plan, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(engine_plan, "gpu_memory_bytes", lambda device: 80 * GIB)
    grid = scene_grid(scene, s, PredictOptions(device="cuda"))
    assert grid.chunk == 2048 and redundancy(grid.chunk, 64) < MAX_REDUNDANCY  # interior chunks
    assert scene_grid(scene, s, PredictOptions(device="cuda", chunk=1024)).chunk == 1024
    remote = PredictOptions(device="cuda", scheduler="tcp://127.0.0.1:1")
    assert scene_grid(scene, s, remote).chunk == 512
    monkeypatch.setattr(engine_plan, "gpu_memory_bytes", lambda device: None)
    assert scene_grid(scene, s, PredictOptions(device="cuda")).chunk == 512
