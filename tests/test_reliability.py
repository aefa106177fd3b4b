"""Regressions of the reliability review: what is printed (no secrets, no dead folders, no
"None"), what a run trusts on disk, and the smaller failure paths of the CLI."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from geoseg.cli import cli
from geoseg.io.remote import redact, redact_text
from geoseg.pipeline import Ledger
from tests.conftest import write_tif
from tests.http_support import serve
from tests.pipeline_support import REPO, make_model, make_scene, write_pipeline


def test_runs_show_of_a_scene_of_unknown_size_says_so(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        run = ledger.start_run("p", "p.yml", "c", "m", "model", "local", False)
        row = ledger.start_scene(
            run, "p", "/gone.tif", None, None, "c", "m", "input cannot be read"
        )
        ledger.finish_scene(row, "failed", {}, "/gone.tif: no such file")
        ledger.finish_run(run, "failed")
    res = CliRunner().invoke(cli, ["runs", "--ledger", str(path), "show", str(run)])
    assert res.exit_code == 0, res.output
    assert "None" not in res.output and "size unknown" in res.output


# -- no secret printed ----------------------------------------------------------------------

SECRET = "X-Amz-Signature=s3cr3t&X-Amz-Credential=k3y"


def _clean(res: Any) -> str:
    """All a command printed (stdout, stderr), checked to hold no part of a secret."""
    text = res.output + (res.stderr if res.stderr_bytes is not None else "")
    for secret in ("s3cr3t", "k3y", "t0k3n"):
        assert secret not in text, text
    return text


def test_redact_text_cuts_every_query_string_and_user_info() -> None:
    assert redact_text("a https://u:p@h:8/a.tif?sig=1&b=2, b") == "a https://h:8/a.tif, b"
    assert redact_text("/vsicurl/https://h/a.tif?sig=1: gone") == "/vsicurl/https://h/a.tif: gone"
    assert redact_text("(s3://b/k.tif?versionId=3)") == "(s3://b/k.tif)"
    # urllib3's retry warning and final error name the request path with its query
    assert redact_text("broken by 'X()': /search?token=t0k3n") == "broken by 'X()': /search"
    assert redact_text("exceeded with url: /?token=t0k3n (Caused") == "exceeded with url: / (Caused"
    assert redact_text("what? /tmp/a.tif") == "what? /tmp/a.tif"
    assert redact("http://u:p@h:bad/x?t=1") == "http://h:bad/x"


@pytest.fixture
def www(tmp_path: Path) -> Path:
    """Scenes a.tif and b/a.tif (the same stem) under www/, and the tiny model."""
    root = tmp_path / "www"
    (root / "b").mkdir(parents=True)
    make_scene(root / "a.tif", 0, 0, 64)
    make_scene(root / "b" / "a.tif", 70, 0, 64)
    make_model(tmp_path / "model")
    return root


def test_predict_summary_and_vectorize_lines_show_no_signature(tmp_path: Path, www: Path) -> None:
    with serve(www) as server:
        url = f"{server.url}/a.tif?{SECRET}"
        args = ["predict", url, "-m", str(tmp_path / "model"), "-o", str(tmp_path / "o")]
        for verbose in ([], ["-v"]):
            res = CliRunner().invoke(cli, [*verbose, *args, "--device", "cpu", "--vectorize"])
            assert res.exit_code == 0, res.output
            text = _clean(res)
            assert "vectorize chunks" in text and f"{server.url}/a.tif" in text, text


def test_same_stem_refusals_show_no_signature(tmp_path: Path, www: Path) -> None:
    with serve(www) as server:
        urls = [f"{server.url}/a.tif?{SECRET}", f"{server.url}/b/a.tif?{SECRET}"]
        model = str(tmp_path / "model")
        res = CliRunner().invoke(cli, ["predict", *urls, "-m", model, "-o", str(tmp_path / "o")])
        assert res.exit_code == 2 and "would both write" in _clean(res), res.output
        job = write_pipeline(tmp_path / "p.yml", inputs={"paths": urls})
        for dry in ([], ["--dry-run"]):
            res = CliRunner().invoke(cli, ["run", str(job), *dry])
            assert res.exit_code == 2 and "would write the same" in _clean(res), res.output


def test_run_dry_run_and_summary_show_no_signature(tmp_path: Path, www: Path) -> None:
    with serve(www) as server:
        urls = [f"{server.url}/a.tif?{SECRET}", f"{server.url}/gone.tif?{SECRET}"]
        job = write_pipeline(tmp_path / "p.yml", inputs={"paths": urls})
        res = CliRunner().invoke(cli, ["run", str(job), "--dry-run"])
        assert res.exit_code == 0 and f"run   {server.url}/a.tif  (" in _clean(res), res.output
        res = CliRunner().invoke(cli, ["run", str(job)])
        assert res.exit_code == 1, res.output
        assert f"FAILED {server.url}/gone.tif: " in _clean(res), res.output


def test_stac_asset_hrefs_with_a_signed_query_show_no_signature(tmp_path: Path, www: Path) -> None:
    import pystac

    with serve(www) as server:
        item = pystac.Item("signed", None, None, datetime(2026, 1, 1, tzinfo=UTC), {})
        href = f"{server.url}/gone.tif?{SECRET}"
        item.add_asset("image", pystac.Asset(href, media_type=pystac.MediaType.COG))
        (www / "items.json").write_text(json.dumps(pystac.ItemCollection([item]).to_dict()))
        stac = {"source": f"{server.url}/items.json", "asset": "image"}
        job = write_pipeline(tmp_path / "p.yml", inputs={"stac": stac})
        for dry in (["--dry-run"], []):
            res = CliRunner().invoke(cli, ["run", str(job), *dry])
            assert f"{server.url}/gone.tif" in _clean(res), res.output


def test_stac_api_search_with_a_token_shows_it_nowhere(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port where nothing listens: every request is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    make_model(tmp_path / "model")
    search = {"collections": ["aerial"], "max_items": 5}
    source = f"http://127.0.0.1:{port}/?token=t0k3n"
    job = write_pipeline(
        tmp_path / "p.yml", inputs={"stac": {"source": source, "asset": "image", "search": search}}
    )
    res = CliRunner().invoke(cli, ["run", str(job), "--dry-run"])
    assert res.exit_code == 2, res.output
    text = _clean(res)
    assert "Retrying" in text and f"STAC http://127.0.0.1:{port}/: cannot search it" in text, text


def test_library_log_lines_of_a_prediction_show_no_signature(
    tmp_path: Path, www: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A program that uses geoseg as a library and logs its records its own way (no CLI
    filter between) sees no signature either."""
    from geoseg.engine.cluster import open_client
    from geoseg.engine.options import PredictOptions
    from geoseg.engine.scene import predict_scene
    from geoseg.io.raster import open_scene
    from geoseg.models.bundle import load_bundle
    from geoseg.vectorize.options import VectorizeOptions

    options = PredictOptions(device="cpu", precision="fp32")
    with serve(www) as server, caplog.at_level(logging.DEBUG, logger="geoseg"):
        scene = open_scene(f"{server.url}/a.tif?{SECRET}")
        bundle = load_bundle(tmp_path / "model")
        with open_client(options) as client:
            out = predict_scene(
                scene,
                bundle,
                tmp_path / "o",
                options,
                client,
                vectorize=VectorizeOptions(workers=1),
            )
    assert out.vectors is not None
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{server.url}/a.tif" in text and "vectorize chunks" in text, text
    for secret in ("s3cr3t", "k3y"):
        assert secret not in text, text


# -- stale outputs ---------------------------------------------------------------------------


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file()}


def _predict(scene: str, model: Path, out: Path, outputs: str) -> Any:
    args = ["predict", scene, "-m", str(model), "-o", str(out), "--device", "cpu"]
    return CliRunner().invoke(cli, [*args, "--outputs", outputs])


def _model_tag(path: Path) -> str:
    import rasterio

    with rasterio.open(path) as src:
        return str(src.tags()["GEOSEG_MODEL"])


def test_predict_removes_what_an_earlier_run_wrote_and_this_one_does_not(
    tmp_path: Path, www: Path
) -> None:
    out = tmp_path / "o"
    first, second = make_model(tmp_path / "m1", seed=1), make_model(tmp_path / "m2", seed=2)
    scene = str(www / "a.tif")
    res = _predict(scene, first, out, "probs,mask,vectors,quicklook")
    assert res.exit_code == 0, res.output
    earlier = _files(out)
    assert {"a.probs.tif", "a.mask.tif", "a.quicklook.png", "a.buildings.geojson"} <= earlier
    # what is not this scene's output, or not geoseg's, stays
    others = {"a.b.buildings.geojson", "a.notes.txt", "ab.buildings.geojson"}
    for name in others:
        (out / name).write_text("{}")
    (out / "a.b.probs.tif").write_bytes((out / "a.probs.tif").read_bytes())
    others.add("a.b.probs.tif")
    res = _predict(scene, second, out, "mask")
    assert res.exit_code == 0, res.output
    assert _files(out) == {"a.mask.tif"} | others, res.output
    assert _model_tag(out / "a.mask.tif") != _model_tag(out / "a.b.probs.tif")
    gone = sorted(earlier - {"a.mask.tif"})
    assert f"removed {len(gone)} output(s) of an earlier run" in res.output, res.output
    assert ", ".join(gone) in res.output, res.output


def test_a_probability_raster_that_geoseg_did_not_write_is_never_removed(
    tmp_path: Path, www: Path
) -> None:
    out = tmp_path / "o"
    out.mkdir()
    mine = write_tif(out / "a.probs.tif", np.zeros((1, 8, 8), np.uint8))
    res = _predict(str(www / "a.tif"), tmp_path / "model", out, "mask")
    assert res.exit_code == 0, res.output
    assert mine.exists() and "earlier run" not in res.output, res.output


def test_a_pipeline_removes_the_layers_of_an_earlier_run_and_records_it(tmp_path: Path) -> None:
    (tmp_path / "scenes").mkdir()
    make_scene(tmp_path / "scenes" / "s.tif", 0, 0, 64)
    make_model(tmp_path / "model")
    outputs = {"dir": "out", "vectors": True, "quicklook_px": 64}
    job = write_pipeline(tmp_path / "p.yml", outputs=outputs)
    res = CliRunner().invoke(cli, ["run", str(job)])
    assert res.exit_code == 0, res.output
    folder = tmp_path / "out" / "s"
    assert "s.buildings.geojson" in _files(folder) and "s.probs.tif" in _files(folder)
    job = write_pipeline(
        tmp_path / "p.yml", outputs={**outputs, "vectors": False, "rasters": ["mask"]}
    )
    res = CliRunner().invoke(cli, ["run", str(job)])
    assert res.exit_code == 0, res.output
    assert _files(folder) == {"s.mask.tif", "s.quicklook.png"}, res.output
    with Ledger(tmp_path / "state" / "ledger.sqlite") as ledger:
        row = ledger.last_done("tiny", str(tmp_path / "scenes" / "s.tif"))
    assert row is not None
    assert "s.buildings.geojson" in row.outputs["removed_stale"], row.outputs


# -- a second Ctrl-C -------------------------------------------------------------------------

SLOW_STOP = """
import os, signal, sys, time
from geoseg.cli import cli, main

@cli.command("slowstop")
def slowstop() -> None:
    try:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
        time.sleep(60)
    except KeyboardInterrupt:
        try:  # Ctrl-C again, in a clean-up that swallows it as closing a Dask cluster does
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(60)
        except KeyboardInterrupt:
            pass
        print("clean-up finished")
        raise

sys.argv = ["geoseg", "slowstop"]
main()
"""


def test_a_second_ctrl_c_during_the_clean_up_stops_at_once() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SLOW_STOP], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 130, proc.stderr
    assert "clean-up finished" not in proc.stdout
    assert proc.stderr.strip() == "geoseg: interrupted again: stopped at once", proc.stderr


def test_two_ctrl_c_during_a_prediction_exit_quietly(tmp_path: Path, make_bundle: Any) -> None:
    rng = np.random.default_rng(0)
    scene = write_tif(tmp_path / "big.tif", rng.integers(0, 255, (3, 768, 768), dtype=np.uint8))
    cmd = [sys.executable, "-m", "geoseg", "predict", str(scene), "-m", str(make_bundle().path)]
    cmd += ["-o", str(tmp_path / "o"), "--device", "cpu", "--chunk", "64"]  # 144 chunks
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    seen = b""
    while b"chunks" not in seen:  # the prediction is under way
        line = proc.stderr.readline()
        assert line, seen
        seen += line
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)  # a bound against a hang, not a timing
    text = (seen + err).decode()
    assert proc.returncode == 130, text
    assert "ClosedClientError" not in text and "Traceback" not in text, text
    assert not list((tmp_path / "o").glob("*.tif")), text
