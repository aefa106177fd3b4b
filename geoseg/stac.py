"""Scenes from STAC: an Item, an ItemCollection or a Catalog (file or URL), or a STAC API
search, with the key of the asset to read. Parsing is pystac's and searching pystac-client's.

Each item gives one scene: the absolute href of its asset (a local path, a URL or an object
URL, read as any other scene) and the item's id, which the outputs record in their tags
(``GEOSEG_STAC_ITEM``) and the ledger in the scene's row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from geoseg.errors import ConfigError, first_line
from geoseg.remote import redact, redact_text

__all__ = ["StacScene", "stac_scenes"]


@dataclass(frozen=True)
class StacScene:
    """One item's asset: where to read it, and the item's id."""

    href: str
    item_id: str


def stac_scenes(
    source: str, asset: str, search: dict[str, Any] | None = None, max_items: int = 1000
) -> list[StacScene]:
    """The asset ``asset`` of every item that ``source`` holds (Item, ItemCollection,
    Catalog or Collection, followed recursively) or, with ``search`` (collections, bbox,
    datetime, query, ids…), of every item a search of the STAC API at ``source`` returns, at
    most ``max_items``. Raises :class:`ConfigError` in one line for what cannot be read or
    has no such asset."""
    try:
        items = _search(source, search, max_items) if search is not None else _read(source)
    except ConfigError:
        raise
    except Exception as exc:  # pystac's, pystac-client's, network and JSON errors
        what = "search" if search is not None else "read"
        raise ConfigError(
            f"STAC {redact(source)}: cannot {what} it ({redact_text(first_line(exc))})"
        ) from exc
    out = []
    for item in items:
        found = item.assets.get(asset)
        if found is None:
            keys = ", ".join(sorted(item.assets)) or "none"
            raise ConfigError(
                f"STAC item {item.id!r} ({redact(source)}) has no asset {asset!r} "
                f"(its assets: {keys})"
            )
        href = found.get_absolute_href() or found.href
        out.append(StacScene(href, item.id))
    return out


def _read(source: str) -> list[Any]:
    import pystac

    data = pystac.StacIO.default().read_json(source)
    kind = data.get("type")
    if kind == "FeatureCollection":
        collection = pystac.ItemCollection.from_dict(data, preserve_dict=False)
        for item in collection.items:
            if item.get_self_href() is None:  # relative asset hrefs resolve against the file
                item.set_self_href(source)
        return list(collection.items)
    obj = pystac.read_dict(data, href=source)
    if isinstance(obj, pystac.Item):
        return [obj]
    if isinstance(obj, pystac.Catalog):  # also a Collection
        return list(obj.get_items(recursive=True))
    raise ConfigError(f"STAC {redact(source)}: not an Item, ItemCollection or Catalog")


def _search(source: str, search: dict[str, Any], max_items: int) -> list[Any]:
    from pystac_client import Client

    client = Client.open(source)
    return list(client.search(**search, max_items=max_items).items())
