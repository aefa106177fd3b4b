"""Scenes from STAC: a static catalogue on disk, an ItemCollection over HTTP, and a STAC API
search answered by a recorded response; the outputs and the ledger record each item's id."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pystac
import pytest
import rasterio
from click.testing import CliRunner

from geoseg.cli import cli
from geoseg.pipeline import Ledger, load_pipeline, run_pipeline
from tests.http_support import serve
from tests.pipeline_support import make_model, make_scene, write_pipeline

WHEN = datetime(2026, 11, 30, tzinfo=UTC)


def _item(item_id: str, href: str) -> pystac.Item:
    item = pystac.Item(item_id, None, None, WHEN, {})
    item.add_asset("image", pystac.Asset(href, media_type=pystac.MediaType.COG))
    return item


@pytest.fixture
def stac_dir(tmp_path: Path) -> Path:
    """Two scenes and a static catalogue of two items whose 'image' assets are relative."""
    root = tmp_path / "stac"
    root.mkdir()
    for i in range(2):
        make_scene(root / f"scene{i}.tif", 70 * i, 0, 64)
    catalog = pystac.Catalog("demo", "two scenes")
    for i in range(2):
        catalog.add_item(_item(f"item-{i}", f"../scene{i}.tif"))
    catalog.normalize_hrefs(str(root))
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    make_model(tmp_path / "model")
    return root


def _ledger(job: Path) -> Ledger:
    return Ledger(job.parent / "state" / "ledger.sqlite")


def test_static_catalogue_runs_each_items_asset_and_records_its_id(
    tmp_path: Path, stac_dir: Path
) -> None:
    stac = {"source": "stac/catalog.json", "asset": "image"}
    job = write_pipeline(tmp_path / "p.yml", inputs={"stac": stac})
    summary = run_pipeline(load_pipeline(job))
    assert [(r.stem, r.status) for r in summary.results] == [("scene0", "done"), ("scene1", "done")]
    with rasterio.open(tmp_path / "out" / "scene1" / "scene1.mask.tif") as src:
        assert src.tags()["GEOSEG_STAC_ITEM"] == "item-1"
    with _ledger(job) as ledger:
        rows = ledger.scenes(summary.run_id)
    assert [r.outputs["stac_item"] for r in rows] == ["item-0", "item-1"]
    assert [r.status for r in run_pipeline(load_pipeline(job)).results] == ["skipped"] * 2

    missing = write_pipeline(
        tmp_path / "m.yml", inputs={"stac": {"source": "stac/catalog.json", "asset": "visual"}}
    )
    res = CliRunner().invoke(cli, ["run", str(missing)])
    assert res.exit_code == 2, res.output
    assert "has no asset 'visual' (its assets: image)" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_item_collection_and_api_search_over_http(tmp_path: Path, stac_dir: Path) -> None:
    with serve(stac_dir) as server:
        items = [_item(f"http-{i}", f"{server.url}/scene{i}.tif") for i in range(2)]
        collection = pystac.ItemCollection(items)
        (stac_dir / "items.json").write_text(json.dumps(collection.to_dict()))
        job = write_pipeline(
            tmp_path / "p.yml",
            inputs={"stac": {"source": f"{server.url}/items.json", "asset": "image"}},
        )
        summary = run_pipeline(load_pipeline(job))
        assert [r.status for r in summary.results] == ["done", "done"]
        assert str(summary.results[0].path) == f"{server.url}/scene0.tif"

        landing = {
            "type": "Catalog",
            "stac_version": "1.0.0",
            "id": "api",
            "description": "a recorded STAC API",
            "conformsTo": [
                "https://api.stacspec.org/v1.0.0/core",
                "https://api.stacspec.org/v1.0.0/item-search",
            ],
            "links": [
                {"rel": "self", "href": f"{server.url}/"},
                {"rel": "root", "href": f"{server.url}/"},
                {
                    "rel": "search",
                    "href": f"{server.url}/search",
                    "type": "application/geo+json",
                    "method": "POST",
                },
            ],
        }
        (stac_dir / "index.json").write_text(json.dumps(landing))
        found = {"type": "FeatureCollection", "features": [items[1].to_dict()]}
        (stac_dir / "search.post.json").write_text(json.dumps(found))
        search = {"collections": ["aerial"], "bbox": [15.0, 45.0, 15.1, 45.1], "max_items": 5}
        job = write_pipeline(
            tmp_path / "s.yml",
            name="searched",
            inputs={"stac": {"source": f"{server.url}/", "asset": "image", "search": search}},
        )
        summary = run_pipeline(load_pipeline(job))
        assert [(r.stem, r.status) for r in summary.results] == [("scene1", "done")]
        sent = json.loads(server.posted[-1])
        assert sent["collections"] == ["aerial"] and sent["bbox"] == [15.0, 45.0, 15.1, 45.1]


def _link(path: Path, rel: str, href: str) -> None:
    """Add a link to the STAC JSON file at ``path``."""
    data = json.loads(path.read_text())
    data["links"].append({"rel": rel, "href": href, "type": "application/json"})
    path.write_text(json.dumps(data))


def test_a_catalogue_with_a_cycle_is_one_clear_line(tmp_path: Path) -> None:
    root = tmp_path / "stac"
    make_scene(tmp_path / "scene0.tif", 0, 0, 64)
    catalog = pystac.Catalog("top", "a catalogue whose child links back to it")
    child = pystac.Catalog("sub", "child")
    catalog.add_child(child)
    child.add_item(_item("item-0", "../../scene0.tif"))
    catalog.normalize_hrefs(str(root))
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    _link(root / "sub" / "catalog.json", "child", "../catalog.json")
    make_model(tmp_path / "model")
    job = write_pipeline(
        tmp_path / "p.yml", inputs={"stac": {"source": "stac/catalog.json", "asset": "image"}}
    )
    res = CliRunner().invoke(cli, ["run", str(job), "--dry-run"])
    assert res.exit_code == 2, res.output
    assert "the catalogue has a cycle" in res.output and "recursion" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output


def test_a_broken_item_link_fails_that_item_alone(tmp_path: Path, stac_dir: Path) -> None:
    _link(stac_dir / "catalog.json", "item", "./gone/gone.json")
    (stac_dir / "bad").mkdir()
    (stac_dir / "bad" / "bad.json").write_text("{not json")
    _link(stac_dir / "catalog.json", "item", "./bad/bad.json")
    job = write_pipeline(
        tmp_path / "p.yml", inputs={"stac": {"source": "stac/catalog.json", "asset": "image"}}
    )
    summary = run_pipeline(load_pipeline(job))
    by_stem = {r.stem: r for r in summary.results}
    assert {s: r.status for s, r in by_stem.items()} == {
        "scene0": "done",
        "scene1": "done",
        "gone": "failed",
        "bad": "failed",
    }
    assert "gone.json (linked from" in (by_stem["gone"].error or "")
    assert "bad.json (linked from" in (by_stem["bad"].error or "")


def test_items_whose_assets_share_a_file_name_are_named_after_the_item(tmp_path: Path) -> None:
    root = tmp_path / "stac"
    catalog = pystac.Catalog("demo", "the usual layout: one folder per item")
    for i in range(2):
        (root / f"item{i}").mkdir(parents=True)
        make_scene(root / f"item{i}" / "visual.tif", 70 * i, 0, 64)
        catalog.add_item(_item(f"item{i}", f"../item{i}/visual.tif"))
    catalog.normalize_hrefs(str(root))
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    make_model(tmp_path / "model")
    job = write_pipeline(
        tmp_path / "p.yml", inputs={"stac": {"source": "stac/catalog.json", "asset": "image"}}
    )
    summary = run_pipeline(load_pipeline(job))
    assert [(r.stem, r.status) for r in summary.results] == [("item0", "done"), ("item1", "done")]
    for i in range(2):
        with rasterio.open(tmp_path / "out" / f"item{i}" / "visual.mask.tif") as src:
            assert src.tags()["GEOSEG_STAC_ITEM"] == f"item{i}"
