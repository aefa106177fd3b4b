"""Scenes from STAC: an Item, an ItemCollection or a Catalog (file or URL), or a STAC API
search, with the key of the asset to read. Parsing is pystac's and searching pystac-client's.

Each item gives one scene: the absolute href of its asset (a local path, a URL or an object
URL, read as any other scene) and the item's id, which the outputs record in their tags
(``GEOSEG_STAC_ITEM``) and the ledger in the scene's row. A catalogue is walked link by link:
an item link that cannot be read gives a scene that fails alone (with the reason), and a
catalogue that links back to one of its ancestors is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from geoseg.errors import ConfigError, first_line
from geoseg.io.remote import is_remote, redact, redact_text, remote_stem

__all__ = ["StacScene", "stac_scenes"]


@dataclass(frozen=True)
class StacScene:
    """One item's asset: where to read it, and the item's id; or, with ``error``, an item
    link that cannot be read (``href`` is the link's, ``item_id`` its file name)."""

    href: str
    item_id: str
    error: str | None = None


def stac_scenes(
    source: str, asset: str, search: dict[str, Any] | None = None, max_items: int = 1000
) -> list[StacScene]:
    """The asset ``asset`` of every item that ``source`` holds (Item, ItemCollection,
    Catalog or Collection, followed recursively) or, with ``search`` (collections, bbox,
    datetime, query, ids…), of every item a search of the STAC API at ``source`` returns, at
    most ``max_items``. Raises :class:`ConfigError` in one line for what cannot be read or
    has no such asset. An item link of a catalogue that cannot be read is returned with its
    ``error`` instead: that scene fails, the others run."""
    broken: list[StacScene] = []
    try:
        if search is not None:
            items = _search(source, search, max_items)
        else:
            items, broken = _read(source)
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
    return out + broken


def _read(source: str) -> tuple[list[Any], list[StacScene]]:
    """The items ``source`` holds, and the item links of a catalogue that cannot be read."""
    import pystac

    data = pystac.StacIO.default().read_json(source)
    kind = data.get("type")
    if kind == "FeatureCollection":
        collection = pystac.ItemCollection.from_dict(data, preserve_dict=False)
        for item in collection.items:
            if item.get_self_href() is None:  # relative asset hrefs resolve against the file
                item.set_self_href(source)
        return list(collection.items), []
    obj = pystac.read_dict(data, href=source)
    if isinstance(obj, pystac.Item):
        return [obj], []
    if isinstance(obj, pystac.Catalog):  # also a Collection
        walk = _Walk(source)
        walk.catalog(obj, [source])
        return walk.items, walk.broken
    raise ConfigError(f"STAC {redact(source)}: not an Item, ItemCollection or Catalog")


class _Walk:
    """The items under a catalogue, each link followed once; a cycle is an error."""

    def __init__(self, source: str) -> None:
        import pystac

        self.source = source
        self.io = pystac.StacIO.default()
        self.seen: set[str] = {source}
        self.items: list[Any] = []
        self.broken: list[StacScene] = []

    def catalog(self, catalog: Any, ancestors: list[str]) -> None:
        """Collect the items of ``catalog`` (read from ``ancestors[-1]``) and its children."""
        import pystac

        here = ancestors[-1]
        for link in catalog.get_links(pystac.RelType.ITEM):
            href = link.get_absolute_href() or link.href
            if href not in self.seen:
                self.seen.add(href)
                self.item(href, here)
        for link in catalog.get_links(pystac.RelType.CHILD):
            href = link.get_absolute_href() or link.href
            if href in ancestors:
                raise ConfigError(
                    f"STAC {redact(self.source)}: the catalogue has a cycle: {redact(here)} "
                    f"links to {redact(href)} as a child, which contains it"
                )
            if href in self.seen:  # reached by two paths: its items are taken once
                continue
            self.seen.add(href)
            child = pystac.read_dict(self.io.read_json(href), href=href)
            self.catalog(child, [*ancestors, href])

    def item(self, href: str, parent: str) -> None:
        """Read the item at ``href``, or record why it cannot be read."""
        import pystac

        try:
            item = pystac.read_dict(self.io.read_json(href), href=href)
            if not isinstance(item, pystac.Item):
                raise ValueError(f"an item link to a {type(item).__name__}")
        except Exception as exc:  # not found, not JSON, not STAC: this item alone fails
            why = redact_text(first_line(exc))
            name = remote_stem(href) if is_remote(href) else PurePath(href).stem
            error = (
                f"STAC item {redact(href)} (linked from {redact(parent)}) cannot be read ({why})"
            )
            self.broken.append(StacScene(href, name, error))
            return
        self.items.append(item)


def _search(source: str, search: dict[str, Any], max_items: int) -> list[Any]:
    from pystac_client import Client

    client = Client.open(source)
    return list(client.search(**search, max_items=max_items).items())
