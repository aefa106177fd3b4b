"""Pipeline files: strict validation with field names and lines, globs, hashes, shipped files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from geoseg.cli import cli
from geoseg.errors import ConfigError
from geoseg.pipeline.config import load_pipeline, load_pipelines, parse_pipeline
from tests.pipeline_support import make_model

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
schema_version: 1
name: roads-a
inputs:
  paths: ["scenes/*.tif"]
model: model
outputs:
  dir: out
"""


def local(scenes: list[Path | str]) -> list[Path]:
    """``scene_paths()`` of local files: every one a Path (remote scenes stay strings)."""
    paths = []
    for scene in scenes:
        assert isinstance(scene, Path), scene
        paths.append(scene)
    return paths


def test_minimal_file_gets_defaults(tmp_path: Path) -> None:
    c = parse_pipeline(GOOD, str(tmp_path / "p.yml"))
    assert c.compute.kind == "local" and c.compute.scenes_in_flight == 2
    assert c.predict.device == "auto" and c.predict.chunk is None
    assert c.schedule is None
    assert c.model_path == tmp_path / "model"
    assert c.out_dir == tmp_path / "out"


def test_unknown_field_names_field_and_line(tmp_path: Path) -> None:
    text = GOOD + "predict:\n  device: cpu\n  chunck: 512\n"
    with pytest.raises(ConfigError) as e:
        parse_pipeline(text, "p.yml")
    msg = str(e.value)
    assert "p.yml" in msg and "predict.chunck: unknown field" in msg and "line 10" in msg


def test_wrong_type_names_field_and_line() -> None:
    text = GOOD + "compute:\n  kind: local\n  workers: many\n"
    with pytest.raises(ConfigError) as e:
        parse_pipeline(text, "p.yml")
    assert "compute.workers" in str(e.value) and "line 10" in str(e.value)


def test_missing_field_is_named() -> None:
    with pytest.raises(ConfigError, match="model: required field is missing"):
        parse_pipeline(GOOD.replace("model: model\n", ""), "p.yml")


def test_invalid_yaml_gives_line() -> None:
    with pytest.raises(ConfigError, match=r"invalid YAML: line 4, column"):
        parse_pipeline("schema_version: 1\nname: x\ninputs: [a\n  b: c\n", "p.yml")


def test_future_schema_version_is_refused() -> None:
    with pytest.raises(ConfigError, match="schema_version 2 is not supported"):
        parse_pipeline(GOOD.replace("schema_version: 1", "schema_version: 2"), "p.yml")


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ("schedule:\n  cron: '61 * * * *'\n", "not a valid five-field cron"),
        ("schedule:\n  cron: '0 2 * * *'\n  timezone: Mars/Olympus\n", "unknown time zone"),
        ("compute:\n  kind: dask\n", "compute.scheduler: required field is missing"),
        ("compute:\n  kind: cloud\n", "compute"),
        ("predict:\n  device: tpu\n", "device must be auto, cpu, cuda"),
    ],
)
def test_bad_values(section: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_pipeline(GOOD + section, "p.yml")


def test_vectorize_section_is_the_vectorizer_options() -> None:
    text = GOOD + "vectorize:\n  min_area_m2: 5\n  thresold: 0.4\n"
    with pytest.raises(ConfigError, match=r"line 10: vectorize.thresold: unknown field"):
        parse_pipeline(text, "p.yml")
    text = GOOD.replace("  dir: out\n", "  dir: out\n  formats: [gpkg]\n")
    c = parse_pipeline(text + "vectorize:\n  regularize: true\n", "p.yml")
    opts = c.vectorize_options()
    assert opts.formats == ("geojson", "gpkg") and opts.regularize
    both = text + "vectorize:\n  formats: [fgb]\n"
    with pytest.raises(ConfigError, match="formats in outputs or in vectorize, not in both"):
        parse_pipeline(both, "p.yml")


def test_bad_name() -> None:
    with pytest.raises(ConfigError, match="name may hold"):
        parse_pipeline(GOOD.replace("roads-a", "roads a/b"), "p.yml")


def test_globs_lists_and_excludes(tmp_path: Path) -> None:
    (tmp_path / "scenes" / "sub").mkdir(parents=True)
    for name in ("a.tif", "b.tif", "b_preview.tif", "sub/c.tif"):
        (tmp_path / "scenes" / name).write_bytes(b"x")
    (tmp_path / "list.txt").write_text("# one per line\nscenes/sub/c.tif\nscenes/a.tif\n")
    text = GOOD.replace(
        'paths: ["scenes/*.tif"]',
        'paths: ["scenes/**/*.tif"]\n  list_file: list.txt\n  exclude: ["*_preview.tif"]',
    )
    c = parse_pipeline(text, str(tmp_path / "p.yml"))
    names = [p.relative_to(tmp_path / "scenes").as_posix() for p in local(c.scene_paths())]
    assert names == ["a.tif", "b.tif", "sub/c.tif"]


def test_glob_matching_nothing(tmp_path: Path) -> None:
    c = parse_pipeline(GOOD, str(tmp_path / "p.yml"))
    with pytest.raises(ConfigError, match=r"inputs.paths: 'scenes/\*.tif' matches no file"):
        c.scene_paths()
    empty_ok = GOOD.replace('["scenes/*.tif"]', '["scenes/*.tif"]\n  allow_empty: true')
    assert parse_pipeline(empty_ok, str(tmp_path / "p.yml")).scene_paths() == []


def test_config_hash_tracks_output_settings_only(tmp_path: Path) -> None:
    base = parse_pipeline(GOOD, "p.yml").config_hash()
    other_compute = GOOD + "compute:\n  kind: dask\n  scheduler: tcp://h:8786\n"
    other_schedule = GOOD + "schedule:\n  cron: '0 2 * * *'\n"
    other_inputs = GOOD.replace("scenes/*.tif", "more/*.tif")
    for text in (other_compute, other_schedule, other_inputs):
        assert parse_pipeline(text, "p.yml").config_hash() == base
    assert parse_pipeline(GOOD + "predict:\n  halo: 16\n", "p.yml").config_hash() != base


def test_shipped_pipelines_are_valid() -> None:
    configs = {c.name: c for c in load_pipelines(REPO / "pipelines")}
    assert {"demo", "nightly-buildings"} <= set(configs)
    demo = configs["demo"]
    assert [p.name for p in local(demo.scene_paths())] == ["banepa_rgb.tif"]
    assert demo.model_path == REPO / "data_samples" / "model"
    nightly = configs["nightly-buildings"]
    assert nightly.schedule is not None and nightly.schedule.timezone == "Europe/Paris"
    assert nightly.compute.kind == "dask"


def test_duplicate_names_in_folder(tmp_path: Path) -> None:
    (tmp_path / "a.yml").write_text(GOOD)
    (tmp_path / "b.yml").write_text(GOOD)
    with pytest.raises(ConfigError, match="also used by"):
        load_pipelines(tmp_path)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="no such pipeline file"):
        load_pipeline("/nonexistent/p.yml")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("name: [\n", "invalid YAML"),
        (GOOD + "colour: red\n", "colour: unknown field"),
        (GOOD, "model bundle not found"),
    ],
)
def test_cli_exit_2(tmp_path: Path, text: str, needle: str) -> None:
    (tmp_path / "scenes").mkdir()
    (tmp_path / "scenes" / "a.tif").write_bytes(b"x")
    (tmp_path / "p.yml").write_text(text)
    res = CliRunner().invoke(cli, ["run", str(tmp_path / "p.yml")])
    assert res.exit_code == 2, res.output
    assert needle in res.output


def test_cli_glob_matching_nothing_exit_2(tmp_path: Path) -> None:
    make_model(tmp_path / "model")
    (tmp_path / "p.yml").write_text(GOOD)
    res = CliRunner().invoke(cli, ["run", str(tmp_path / "p.yml")])
    assert res.exit_code == 2, res.output
    assert "matches no file" in res.output


def test_a_key_given_twice_is_an_error_with_its_line(tmp_path: Path) -> None:
    text = GOOD.replace("name:", "name: first\nname:", 1)
    with pytest.raises(ConfigError, match=r"line 3.*duplicate key 'name' \(first on line 2\)"):
        parse_pipeline(text, "p.yml")


def test_compress_is_hashed_only_when_set(tmp_path: Path) -> None:
    def config(**outputs: object) -> str:
        path = tmp_path / "p.yml"
        doc = {"schema_version": 1, "name": "c", "inputs": {"paths": ["*.tif"]}, "model": "m"}
        doc["outputs"] = {"dir": "out", **outputs}
        path.write_text(yaml.safe_dump(doc))
        return load_pipeline(path).config_hash()

    assert config() == config(compress="deflate") != config(compress="zstd")


def test_probabilities_are_written_only_when_kept_or_vectorized(tmp_path: Path) -> None:
    from geoseg.pipeline.runner import predict_options

    def rasters(**outputs: object) -> tuple[str, ...]:
        path = tmp_path / "p.yml"
        doc = {"schema_version": 1, "name": "c", "inputs": {"paths": ["*.tif"]}, "model": "m"}
        doc["outputs"] = {"dir": "out", **outputs}
        path.write_text(yaml.safe_dump(doc))
        return predict_options(load_pipeline(path)).rasters

    assert rasters() == ("probs", "mask")
    assert rasters(rasters=["mask"]) == ("probs", "mask")  # the vectors are made from them
    assert rasters(rasters=["mask"], vectors=False) == ("mask",)
