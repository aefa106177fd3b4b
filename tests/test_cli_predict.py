"""``geoseg predict`` from the command line: real files, bad input, robustness corpus."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from geoseg.cli import cli
from tests.conftest import write_tif


def predict(*args: str) -> Any:
    return CliRunner().invoke(cli, ["predict", *args, "--device", "cpu"])


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    return write_tif(tmp_path / "scene.tif", rng.integers(0, 255, (3, 90, 70), dtype=np.uint8))


def test_predict_writes_both_outputs(tmp_path: Path, scene: Path, make_bundle: Any) -> None:
    res = predict(str(scene), "-m", str(make_bundle().path), "-o", str(tmp_path / "o"))
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "scene.mask.tif",
        "scene.probs.tif",
    ]


def _bad_inputs(tmp: Path, scene: Path) -> dict[str, tuple[list[str], str]]:
    text = tmp / "notes.tif"
    text.write_text("this is not a raster\n")
    truncated = tmp / "truncated.tif"
    rng = np.random.default_rng(0)
    write_tif(truncated, rng.integers(0, 255, (3, 256, 256), dtype=np.uint8))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    one_band = write_tif(tmp / "gray.tif", np.zeros((1, 50, 50), np.uint8))
    blocker = tmp / "blocker"
    blocker.write_text("a file where a directory should be")
    return {
        "missing": ([str(tmp / "absent.tif")], "absent.tif: no such file"),
        "text": ([str(text)], "notes.tif: not a readable raster"),
        "truncated": ([str(truncated)], "truncated.tif: is truncated or corrupt"),
        "bands": ([str(one_band)], "gray.tif: has 1 band(s) but the model reads bands [1, 2, 3]"),
        "unwritable": (
            [str(scene), "-o", str(blocker / "out")],
            "output directory is not writable",
        ),
    }


@pytest.mark.parametrize("case", ["missing", "text", "truncated", "bands", "unwritable"])
def test_bad_input_exits_2_with_clear_message(
    tmp_path: Path, scene: Path, make_bundle: Any, case: str
) -> None:
    args, message = _bad_inputs(tmp_path, scene)[case]
    out = tmp_path / "out"
    if "-o" not in args:
        args = [*args, "-o", str(out)]
    res = predict(*args, "-m", str(make_bundle().path))
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not out.exists() or list(out.iterdir()) == []


def test_missing_model_exits_2(tmp_path: Path, scene: Path) -> None:
    res = predict(str(scene), "-m", str(tmp_path / "nomodel"), "-o", str(tmp_path / "o"))
    assert res.exit_code == 2 and "model bundle not found" in res.output


def test_console_script_reports_errors_without_traceback(tmp_path: Path, make_bundle: Any) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "geoseg",
            "predict",
            str(tmp_path / "x.tif"),
            "-m",
            str(make_bundle().path),
            "-o",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("x.tif: no such file") and "Traceback" not in proc.stderr


ROBUST = [
    "RGB.byte.tif",
    "rgb_lzw.tif",
    "all-nodata.tif",
    "alpha.tif",
    "cog.tif",
    "cogeo.tif",
    "drone.tif",
    "m_4709963_se_14_1_20200831.tif",
    "ms1.tif",
    "rotated.tif",
    "sar_hh.tif",
    "shade.tif",
]
REFUSED = {"rotated.tif": "rotated or sheared geotransform", "sar_hh.tif": "complex data type"}


def _bundle_for(path: Path, make_bundle: Any) -> Any:
    """A random model whose input fits the file (its dtype, up to 3 non-alpha bands)."""
    with rasterio.open(path) as src:
        bands = [i for i, ci in enumerate(src.colorinterp, 1) if ci.name != "alpha"][:3]
        dtype = src.dtypes[0]
    if dtype not in ("uint8", "uint16", "float32", "float64"):
        dtype = "uint8"
    scale = {"uint8": 255.0, "uint16": 10000.0}.get(dtype, 1.0)
    return make_bundle(bands=bands, dtype=dtype, normalization={"scale": scale})


@pytest.mark.parametrize("name", ROBUST)
def test_robustness_corpus(tmp_path: Path, shared_data: Path, make_bundle: Any, name: str) -> None:
    path = shared_data / "robustness" / name
    out = tmp_path / "out"
    bundle = _bundle_for(path, make_bundle)
    res = predict(str(path), "-m", str(bundle.path), "-o", str(out), "--chunk", "256")
    assert "Traceback" not in res.output
    if name in REFUSED:
        assert res.exit_code == 2, res.output
        assert REFUSED[name] in res.output
        return
    assert res.exit_code == 0, res.output
    stem = name.removesuffix(".tif")
    with rasterio.open(path) as src, rasterio.open(out / f"{stem}.mask.tif") as dst:
        assert (dst.crs, dst.transform, dst.shape) == (src.crs, src.transform, src.shape)
        mask = dst.read(1)
        valid = src.dataset_mask() > 0
    if src.dtypes[0].startswith("float"):
        with rasterio.open(path) as src:
            valid &= np.isfinite(src.read()).all(axis=0)
    assert ((mask == 255) == ~valid).all(), "nodata in the output must follow the input's mask"
    if name == "all-nodata.tif":
        assert (mask == 255).all()


def test_striped_and_tiled_copies_give_identical_outputs(
    tmp_path: Path, shared_data: Path, make_bundle: Any
) -> None:
    bundle = make_bundle(seed=4)
    outputs = []
    for name in ("RGB.byte.tif", "rgb_lzw.tif"):
        src = tmp_path / name
        shutil.copy(shared_data / "robustness" / name, src)
        out = tmp_path / f"out-{name}"
        res = predict(str(src), "-m", str(bundle.path), "-o", str(out), "--chunk", "256")
        assert res.exit_code == 0, res.output
        stem = name.removesuffix(".tif")
        with (
            rasterio.open(out / f"{stem}.probs.tif") as a,
            rasterio.open(out / f"{stem}.mask.tif") as b,
        ):
            outputs.append((a.read(), a.dataset_mask(), b.read()))
    for x, y in zip(*outputs, strict=True):
        np.testing.assert_array_equal(x, y)


def test_predict_then_vectorize_in_one_command(tmp_path: Path, make_bundle: Any) -> None:
    import json

    rng = np.random.default_rng(1)
    scene = write_tif(tmp_path / "v.tif", rng.integers(0, 255, (3, 96, 80), dtype=np.uint8))
    res = predict(
        str(scene), "-m", str(make_bundle().path), "-o", str(tmp_path / "o"), "--vectorize"
    )
    assert res.exit_code == 0, res.output
    for layer in ("buildings", "roads"):
        doc = json.loads((tmp_path / "o" / f"v.{layer}.geojson").read_text())
        assert doc["type"] == "FeatureCollection" and "crs" not in doc


def test_two_scenes_with_one_name_are_refused_before_any_output(
    tmp_path: Path, scene: Path, make_bundle: Any
) -> None:
    """a/scene.tif and b/scene.tif would both write scene.* into --out: the first one's results
    would be lost, so nothing runs."""
    (tmp_path / "b").mkdir()
    rng = np.random.default_rng(1)
    other = write_tif(tmp_path / "b" / "scene.tif", rng.integers(0, 255, (3, 40, 30), np.uint8))
    out = tmp_path / "o"
    res = predict(str(scene), str(other), "-m", str(make_bundle().path), "-o", str(out))
    assert res.exit_code == 2, res.output
    assert "would both write scene.probs.tif" in res.output
    assert str(other) in res.output
    assert not out.exists() or not any(out.iterdir())


def test_a_halo_that_cannot_fit_is_refused_before_allocating(
    tmp_path: Path, scene: Path, make_bundle: Any
) -> None:
    """--halo 100000 asked for 112 GiB and crashed; now it is one line with the size needed."""
    from geoseg.engine.plan import forward_bytes_lower_bound
    from geoseg.models.bundle import ModelSpec

    res = predict(str(scene), "-m", str(make_bundle().path), "-o", str(tmp_path / "o"))
    assert res.exit_code == 0, res.output
    args = [str(scene), "-m", str(make_bundle().path), "-o", str(tmp_path / "h")]
    res = predict(*args, "--halo", "100000")
    assert res.exit_code == 2, res.output
    assert "needs at least" in res.output and "GiB" in res.output and "--halo" in res.output
    assert not (tmp_path / "h" / "scene.probs.tif").exists()
    spec = ModelSpec(encoder="resnet18")
    small = forward_bytes_lower_bound(spec, 1, 640, 640)
    assert 10 * 2**20 < small < 1024 * 2**20  # a resnet18 pass on 640² px: ~0.1-1 GiB
    assert forward_bytes_lower_bound(spec, 2, 640, 640) == 2 * small


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Any:
    """A 1 MiB tmpfs (needs root and mount rights; skipped elsewhere)."""
    import subprocess

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_one_line_naming_the_path(
    tmp_path: Path, make_bundle: Any, tiny_disk: Path
) -> None:
    rng = np.random.default_rng(3)
    big = write_tif(tmp_path / "big.tif", rng.integers(0, 255, (3, 640, 640), dtype=np.uint8))
    out = tiny_disk / "out"
    res = predict(str(big), "-m", str(make_bundle().path), "-o", str(out))
    assert res.exit_code == 2, res.output
    last = [line for line in res.output.splitlines() if line.strip()][-1]
    assert "no space left on device" in last.lower() and str(tiny_disk) in last
    assert "Traceback" not in res.output
    assert not list(out.glob("big.*.tif"))  # nothing half-written under a final name


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_outputs_choose_what_is_written(tmp_path: Path, make_bundle: Any) -> None:
    rng = np.random.default_rng(2)
    scene = write_tif(tmp_path / "v.tif", rng.integers(0, 255, (3, 96, 80), dtype=np.uint8))
    model = str(make_bundle().path)

    res = predict(str(scene), "-m", model, "-o", str(tmp_path / "a"), "--outputs", "mask,vectors")
    assert res.exit_code == 0, res.output
    assert _names(tmp_path / "a") == ["v.buildings.geojson", "v.mask.tif", "v.roads.geojson"]
    # vectors from the mask: the same geometries `geoseg vectorize` makes from that mask
    res = CliRunner().invoke(
        cli, ["vectorize", str(tmp_path / "a" / "v.mask.tif"), "-o", str(tmp_path / "ref")]
    )
    assert res.exit_code == 0, res.output
    for layer in ("buildings", "roads"):
        got = json.loads((tmp_path / "a" / f"v.{layer}.geojson").read_text())
        ref = json.loads((tmp_path / "ref" / f"v.{layer}.geojson").read_text())
        assert [f["geometry"] for f in got["features"]] == [f["geometry"] for f in ref["features"]]

    res = predict(str(scene), "-m", model, "-o", str(tmp_path / "b"), "--outputs", "vectors")
    assert res.exit_code == 0, res.output
    assert _names(tmp_path / "b") == ["v.buildings.geojson", "v.roads.geojson"]

    res = predict(
        str(scene), "-m", model, "-o", str(tmp_path / "c"), "--outputs", "probs,quicklook"
    )
    assert res.exit_code == 0, res.output
    assert _names(tmp_path / "c") == ["v.probs.tif", "v.quicklook.png"]

    res = predict(str(scene), "-m", model, "-o", str(tmp_path / "d"), "--outputs", "mask,pdf")
    assert res.exit_code == 2 and "unknown: pdf" in res.output
    assert not (tmp_path / "d").exists()


def test_compress_zstd_gives_valid_cogs_with_identical_pixels(
    tmp_path: Path, make_bundle: Any
) -> None:
    from rio_cogeo.cogeo import cog_validate

    rng = np.random.default_rng(3)
    scene = write_tif(tmp_path / "v.tif", rng.integers(0, 255, (3, 300, 260), dtype=np.uint8))
    model = str(make_bundle().path)
    for codec in ("deflate", "zstd", "lzw"):
        res = predict(str(scene), "-m", model, "-o", str(tmp_path / codec), "--compress", codec)
        assert res.exit_code == 0, res.output
    for name in ("v.probs.tif", "v.mask.tif"):
        ref = tmp_path / "deflate" / name
        for codec in ("zstd", "lzw"):
            path = tmp_path / codec / name
            assert cog_validate(str(path))[0]
            with rasterio.open(path) as got, rasterio.open(ref) as want:
                assert got.compression is not None and got.compression.name.lower() == codec
                assert got.descriptions == want.descriptions and got.tags() == want.tags()
                assert got.nodata == want.nodata and got.overviews(1) == want.overviews(1)
                assert np.array_equal(got.read(), want.read())
                assert np.array_equal(got.read_masks(), want.read_masks())
