"""Scenes that are not local files: URLs and GDAL virtual file system paths.

A scene may be named by ``https://`` or ``http://`` URL, by ``s3://``, ``gs://`` or ``az://``
object URL, or by a GDAL ``/vsi…/`` path. Nothing is downloaded: rasterio opens them through
GDAL's virtual file systems (``/vsicurl/``, ``/vsis3/``, ``/vsigs/``, ``/vsiaz/``), and each
chunk task reads its own window with HTTP range requests, on whichever worker runs it.

Network settings (:data:`NETWORK_DEFAULTS`), each overridable by the environment variable of
the same name: a timeout for every request, bounded retries on transient errors (429 and 5xx
answers, dropped connections), and no directory listing when a file is opened. Credentials
come from GDAL's usual sources (``AWS_*`` variables and profiles, ``AWS_S3_ENDPOINT`` for
S3-compatible stores, ``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_*``); geoseg never
reads or logs them, and :func:`redact` removes query strings (signatures) from URLs in
messages.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["NETWORK_DEFAULTS", "is_remote", "network_options", "redact", "remote_stem"]

_SCHEMES = ("http://", "https://", "s3://", "gs://", "az://")

#: GDAL network settings geoseg applies unless the environment sets them.
NETWORK_DEFAULTS: dict[str, str] = {
    "GDAL_HTTP_TIMEOUT": "30",  # seconds per request: a stalled server fails, never hangs
    "GDAL_HTTP_CONNECTTIMEOUT": "10",
    "GDAL_HTTP_MAX_RETRY": "3",  # on 429, 5xx and dropped connections
    "GDAL_HTTP_RETRY_DELAY": "1",  # seconds, doubled each retry by GDAL
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no listing of the scene's "folder"
    "CPL_VSIL_CURL_USE_HEAD": "YES",
}


def is_remote(name: str | os.PathLike[str]) -> bool:
    """Whether ``name`` is a URL or a GDAL virtual file system path rather than a local file."""
    text = os.fspath(name)
    return text.lower().startswith(_SCHEMES) or text.startswith("/vsi")


def remote_stem(name: str) -> str:
    """The file name of a remote scene without its last extension, as for local files."""
    path = urlsplit(name).path if "://" in name else name
    base = posixpath.basename(path.rstrip("/"))
    stem, _ = posixpath.splitext(base)
    return stem or base


def redact(name: str) -> str:
    """``name`` without a URL's query string and user info (pre-signed URLs carry keys)."""
    if "://" not in name:
        return name
    parts = urlsplit(name)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def network_options() -> dict[str, Any]:
    """:data:`NETWORK_DEFAULTS` less those the environment sets itself."""
    return {k: v for k, v in NETWORK_DEFAULTS.items() if k not in os.environ}
