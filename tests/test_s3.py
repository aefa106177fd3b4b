"""Scenes in an S3-compatible store: a real moto server on the loopback interface, read by
GDAL (``/vsis3/``, window by window) and listed and checked by obstore. ``predict`` gives the
local file's outputs; a pipeline over a bucket glob runs, skips on a rerun, and reruns only
the object that changed (its ETag)."""

from __future__ import annotations

import logging
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from geoseg.cli import cli
from geoseg.pipeline import load_pipeline, run_pipeline
from tests.conftest import write_tif
from tests.pipeline_support import assert_same_rasters, make_model, make_scene, write_pipeline

moto_server = pytest.importorskip("moto.server")

ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture
def bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket on a moto S3 server; the environment points the AWS tools and GDAL at it
    as a user would (AWS_ENDPOINT_URL and keys)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's request log
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for k, v in {**ENV, "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_S3_ENDPOINT", "AWS_HTTPS", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    name = f"bkt-{uuid.uuid4().hex[:8]}"  # moto's state is the process's: a bucket per test
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{name}", method="PUT")).close()
    try:
        yield name
    finally:
        server.stop()


def put(bucket: str, key: str, path: Path) -> str:
    import obstore

    from geoseg.io.remote import _store

    store, _ = _store(f"s3://{bucket}/")
    obstore.put(store, key, path.read_bytes())
    return f"s3://{bucket}/{key}"


def _scenes_in(bucket: str, prefix: str, name: str, tmp_path: Path, step: int) -> None:
    """Two 64 px scenes <name>0.tif, <name>1.tif in tmp_path/scenes and under the bucket's
    prefix, and the tiny model in tmp_path/model: a pipeline's inputs, local and remote."""
    (tmp_path / "scenes").mkdir()
    for i in range(2):
        local = make_scene(tmp_path / "scenes" / f"{name}{i}.tif", step * i, 0, 64)
        put(bucket, f"{prefix}/{name}{i}.tif", local)
    make_model(tmp_path / "model")


def test_predict_from_s3_gives_the_local_outputs(
    tmp_path: Path, bucket: str, make_bundle: Any
) -> None:
    rng = np.random.default_rng(9)
    base = rng.integers(0, 255, (3, 30, 30)).astype(np.uint8)
    local = write_tif(tmp_path / "a.tif", np.kron(base, np.ones((8, 8), np.uint8))[:, :230, :210])
    url = put(bucket, "scenes/a.tif", local)
    model = str(make_bundle().path)
    for name, src in (("remote", url), ("local", str(local))):
        res = CliRunner().invoke(
            cli, ["predict", src, "-m", model, "-o", str(tmp_path / name), "--device", "cpu"]
        )
        assert res.exit_code == 0, res.output
    assert_same_rasters(tmp_path / "remote", tmp_path / "local", ["a.probs.tif", "a.mask.tif"])


def test_pipeline_over_a_bucket_glob_runs_skips_and_reruns_what_changed(
    tmp_path: Path, bucket: str
) -> None:
    _scenes_in(bucket, "drop", "s", tmp_path, step=80)
    put(bucket, "drop/notes.txt", tmp_path / "scenes" / "s0.tif")  # not matched by *.tif
    job = write_pipeline(tmp_path / "p.yml", inputs={"paths": [f"s3://{bucket}/drop/*.tif"]})

    first = run_pipeline(load_pipeline(job))
    assert [(r.stem, r.status) for r in first.results] == [("s0", "done"), ("s1", "done")]
    assert str(first.results[0].path) == f"s3://{bucket}/drop/s0.tif"
    with rasterio.open(tmp_path / "out" / "s0" / "s0.mask.tif") as src:
        assert src.shape == (64, 64)

    second = run_pipeline(load_pipeline(job))
    assert [r.status for r in second.results] == ["skipped", "skipped"]

    # same size, other pixels: only the ETag tells
    put(bucket, "drop/s1.tif", make_scene(tmp_path / "other.tif", 300, 300, 64))
    third = run_pipeline(load_pipeline(job))
    assert [r.status for r in third.results] == ["skipped", "done"]
    assert "ETag" in third.results[1].reason

    # a glob that matches nothing is the usual error, with the URL
    empty = write_pipeline(tmp_path / "e.yml", inputs={"paths": [f"s3://{bucket}/none/*.tif"]})
    res = CliRunner().invoke(cli, ["run", str(empty)])
    assert res.exit_code == 2 and f"s3://{bucket}/none/*.tif" in res.output, res.output


def test_an_unreachable_store_is_one_line(
    tmp_path: Path, make_bundle: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in {**ENV, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}.items():  # refused
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "0")
    model = str(make_bundle().path)
    res = CliRunner().invoke(cli, ["predict", "s3://bkt/a.tif", "-m", model, "-o", str(tmp_path)])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("geoseg: error: s3://bkt/a.tif: cannot be read")


def _get(url: str) -> bytes:
    import obstore

    from geoseg.io.remote import _store

    store, key = _store(url)
    return bytes(obstore.get(store, key).bytes())


def test_predict_s3_to_s3_uploads_whole_outputs(
    tmp_path: Path, bucket: str, make_bundle: Any
) -> None:
    rng = np.random.default_rng(4)
    local = write_tif(tmp_path / "b.tif", rng.integers(0, 255, (3, 120, 100), dtype=np.uint8))
    url = put(bucket, "in/b.tif", local)
    model = str(make_bundle().path)
    args = ["predict", url, "-m", model, "--device", "cpu", "--outputs", "mask,probs,vectors"]
    res = CliRunner().invoke(cli, [*args, "-o", f"s3://{bucket}/results/"])
    assert res.exit_code == 0, res.output
    assert f"b: uploaded 4 file(s) to s3://{bucket}/results/" in res.output
    res = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "local")])
    assert res.exit_code == 0, res.output
    for name in ("b.probs.tif", "b.mask.tif", "b.buildings.geojson", "b.roads.geojson"):
        got = _get(f"s3://{bucket}/results/{name}")
        if name.endswith(".tif"):
            (tmp_path / name).write_bytes(got)
            with rasterio.open(tmp_path / name) as a, rasterio.open(tmp_path / "local" / name) as b:
                assert np.array_equal(a.read(), b.read()) and a.tags() == b.tags()
        else:
            assert got == (tmp_path / "local" / name).read_bytes()

    # geoseg vectorize reads a remote prediction as it reads the local file (a mask also
    # finds its sibling probabilities there, for confidences)
    for source in ("b.probs.tif", "b.mask.tif"):
        for where, src in (("remote", f"s3://{bucket}/results/{source}"), ("here", "")):
            src = src or str(tmp_path / "local" / source)
            res = CliRunner().invoke(cli, ["vectorize", src, "-o", str(tmp_path / where)])
            assert res.exit_code == 0, res.output
        for name in ("b.buildings.geojson", "b.roads.geojson"):
            got = (tmp_path / "remote" / name).read_bytes()
            assert got == (tmp_path / "here" / name).read_bytes(), (source, name)

    res = CliRunner().invoke(cli, [*args, "-o", "s3://no-such-bucket/x/"])
    assert res.exit_code == 2, res.output
    assert res.output.strip().startswith("geoseg: error: s3://no-such-bucket/x/: cannot write")
    assert len(res.output.strip().splitlines()) == 1, res.output


def test_pipeline_from_s3_to_s3_records_urls_and_reruns_lost_objects(
    tmp_path: Path, bucket: str
) -> None:
    import obstore

    from geoseg.io.remote import _store

    _scenes_in(bucket, "in", "t", tmp_path, step=90)
    job = write_pipeline(
        tmp_path / "p.yml",
        inputs={"paths": [f"s3://{bucket}/in/*.tif"]},
        outputs={"dir": f"s3://{bucket}/out", "vectors": True, "quicklook_px": 64},
    )
    first = run_pipeline(load_pipeline(job))
    assert [r.status for r in first.results] == ["done", "done"]
    assert first.out_dir == f"s3://{bucket}/out"
    outputs = first.results[0].outputs
    assert outputs["mask"] == f"s3://{bucket}/out/t0/t0.mask.tif"
    assert set(outputs) == {"probs", "mask", "buildings.geojson", "roads.geojson", "quicklook"}
    store, _ = _store(f"s3://{bucket}/")
    keys = sorted(o["path"] for batch in obstore.list(store, prefix="out/") for o in batch)
    assert "out/report.html" in keys  # the run's report beside the scenes' outputs
    keys.remove("out/report.html")
    assert len(keys) == 10 and all(k.startswith(("out/t0/t0.", "out/t1/t1.")) for k in keys)
    assert not (tmp_path / "out").exists()  # nothing local

    # the same pipeline on the local files writes the same rasters
    local = write_pipeline(tmp_path / "l.yml", name="local", outputs={"dir": "local"})
    assert run_pipeline(load_pipeline(local)).ok
    for name in ("t0.probs.tif", "t0.mask.tif"):
        (tmp_path / "got").mkdir(exist_ok=True)
        (tmp_path / "got" / name).write_bytes(_get(f"s3://{bucket}/out/t0/{name}"))
    assert_same_rasters(tmp_path / "got", tmp_path / "local" / "t0", ["t0.probs.tif"])
    assert_same_rasters(tmp_path / "got", tmp_path / "local" / "t0", ["t0.mask.tif"])

    assert [r.status for r in run_pipeline(load_pipeline(job)).results] == ["skipped"] * 2
    obstore.delete(store, "out/t1/t1.mask.tif")
    third = run_pipeline(load_pipeline(job))
    assert [r.status for r in third.results] == ["skipped", "done"]
    assert "outputs missing: mask" in third.results[1].reason


def test_wrong_credentials_are_one_line(
    tmp_path: Path, bucket: str, make_bundle: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moto import settings

    rng = np.random.default_rng(6)
    local = write_tif(tmp_path / "c.tif", rng.integers(0, 255, (3, 64, 64), dtype=np.uint8))
    url = put(bucket, "in/c.tif", local)
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # check keys from now on
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "0")
    model = str(make_bundle().path)
    for args, needle in (
        ([url, "-o", str(tmp_path / "o")], f"{url}: cannot be read"),
        ([str(local), "-o", f"s3://{bucket}/out/"], f"s3://{bucket}/out/: cannot write there"),
    ):
        res = CliRunner().invoke(cli, ["predict", *args, "-m", model, "--device", "cpu"])
        assert res.exit_code == 2, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"geoseg: error: {needle}"), res.output
        assert "testing" not in res.output  # the secret is never shown


def test_a_star_glob_stays_in_its_folder_as_a_local_glob_does(tmp_path: Path, bucket: str) -> None:
    from geoseg.io.remote import list_matching

    scene = make_scene(tmp_path / "s.tif", 0, 0, 64)
    for key in ("g3/a.tif", "g3/b.txt", "g3/deep/nested.tif", "g3/deep/er/most.tif"):
        put(bucket, key, scene)
    base = f"s3://{bucket}/g3"
    assert list_matching(f"{base}/*.tif") == [f"{base}/a.tif"]
    assert list_matching(f"{base}/*/*.tif") == [f"{base}/deep/nested.tif"]
    assert list_matching(f"{base}/**/*.tif") == [
        f"{base}/a.tif",
        f"{base}/deep/er/most.tif",
        f"{base}/deep/nested.tif",
    ]
    assert list_matching(f"{base}/[ab].t[xy]t") == [f"{base}/b.txt"]


def test_predict_to_s3_names_the_objects_not_a_deleted_local_folder(
    tmp_path: Path, bucket: str, make_bundle: Any
) -> None:
    rng = np.random.default_rng(4)
    local = write_tif(tmp_path / "b.tif", rng.integers(0, 255, (3, 64, 64), dtype=np.uint8))
    model = str(make_bundle().path)
    outputs = "mask,vectors,quicklook"
    args = [str(local), "-m", model, "--device", "cpu", "--outputs", outputs]
    res = CliRunner().invoke(cli, ["predict", *args, "-o", f"s3://{bucket}/results/"])
    assert res.exit_code == 0, res.output
    assert "geoseg-out-" not in res.stdout, res.stdout
    prefix = f"s3://{bucket}/results"
    assert f"b: {prefix}/b.mask.tif (" in res.stdout, res.stdout
    assert f" features → {prefix}/b.buildings.geojson" in res.stdout, res.stdout
    assert f"b: {prefix}/b.quicklook.png" in res.stdout, res.stdout
