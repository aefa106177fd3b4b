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

import hashlib
import os
import posixpath
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from geoseg.errors import InputError, OutputError, first_line

__all__ = [
    "NETWORK_DEFAULTS",
    "check_writable_prefix",
    "exists",
    "gdal_path",
    "identity",
    "is_remote",
    "join",
    "list_matching",
    "network_options",
    "redact",
    "redact_text",
    "remote_name",
    "remote_stem",
    "upload",
]

_SCHEMES = ("http://", "https://", "s3://", "gs://", "az://")

#: GDAL network settings geoseg applies unless the environment sets them.
NETWORK_DEFAULTS: dict[str, str] = {
    "GDAL_HTTP_TIMEOUT": "30",  # seconds per request: a stalled server fails, never hangs
    "GDAL_HTTP_CONNECTTIMEOUT": "10",
    "GDAL_HTTP_MAX_RETRY": "3",  # on 429, 5xx and dropped connections
    "GDAL_HTTP_RETRY_DELAY": "1",  # seconds, doubled each retry by GDAL
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no listing of the scene's "folder"
    "CPL_VSIL_CURL_USE_HEAD": "YES",
    # what GDAL read of an object is forgotten when the file is closed: a long-lived process
    # (a Dask worker) reads tonight's object, not what it cached of last night's
    "CPL_VSIL_CURL_NON_CACHED": "/vsis3/:/vsigs/:/vsiaz/:/vsicurl/",
}


def is_remote(name: str | os.PathLike[str]) -> bool:
    """Whether ``name`` is a URL or a GDAL virtual file system path rather than a local file."""
    text = os.fspath(name)
    return text.lower().startswith(_SCHEMES) or text.startswith("/vsi")


def remote_key(name: str) -> str:
    """The path part of a URL (no query string), or ``name`` itself for a /vsi path."""
    return urlsplit(name).path if "://" in name else name


def remote_name(name: str) -> str:
    """The file name of a remote scene (its URL's last path element)."""
    return posixpath.basename(remote_key(name).rstrip("/"))


def remote_stem(name: str) -> str:
    """The file name of a remote scene without its last extension, as for local files."""
    base = remote_name(name)
    stem, _ = posixpath.splitext(base)
    return stem or base


def redact(name: str) -> str:
    """``name`` without a URL's query string, fragment and user info (pre-signed URLs and
    API tokens carry keys there); what geoseg shows or records of any URL."""
    if "://" not in name:
        return name
    try:
        parts = urlsplit(name)
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
    except ValueError:  # not a well-formed URL (a bad port): cut what could hold a secret
        scheme, rest = name.split("://", 1)
        host, slash, path = re.split(r"[?#]", rest, maxsplit=1)[0].partition("/")
        return f"{scheme}://{host.rsplit('@', 1)[-1]}{slash}{path}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def network_options() -> dict[str, Any]:
    """:data:`NETWORK_DEFAULTS` less those the environment sets itself; and for an
    S3-compatible store named by ``AWS_ENDPOINT_URL`` (the AWS tools' variable), GDAL's own
    ``AWS_S3_ENDPOINT``, ``AWS_HTTPS`` and path-style addressing, unless those are set."""
    options: dict[str, Any] = {k: v for k, v in NETWORK_DEFAULTS.items() if k not in os.environ}
    endpoint = _aws_endpoint_url()
    if endpoint and "AWS_S3_ENDPOINT" not in os.environ:
        parts = urlsplit(endpoint)
        options["AWS_S3_ENDPOINT"] = parts.netloc + parts.path.rstrip("/")
        options.setdefault("AWS_HTTPS", "NO" if parts.scheme == "http" else "YES")
        if "AWS_VIRTUAL_HOSTING" not in os.environ:
            options["AWS_VIRTUAL_HOSTING"] = "FALSE"
    return options


_VSI = {
    "s3": "/vsis3/",
    "gs": "/vsigs/",
    "az": "/vsiaz/",
    "http": "/vsicurl/",
    "https": "/vsicurl/",
}


def gdal_path(name: str) -> str:
    """The GDAL path that opens ``name``: ``s3://b/k`` → ``/vsis3/b/k``, ``https://…`` →
    ``/vsicurl/https://…``; local paths and ``/vsi`` paths as they are."""
    if "://" not in name:
        return name
    scheme, rest = name.split("://", 1)
    prefix = _VSI.get(scheme.lower())
    if prefix is None:
        return name
    return prefix + (name if prefix == "/vsicurl/" else rest)


def _aws_endpoint_url() -> str | None:
    """The S3 endpoint the AWS tools' variables name (``AWS_ENDPOINT_URL_S3``, else
    ``AWS_ENDPOINT_URL``), or None."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _store(name: str) -> tuple[Any, str]:
    """(obstore store, key) for an object URL; the store reads credentials and endpoints from
    the environment as the AWS, Google and Azure tools do."""
    from obstore.store import from_url

    parts = urlsplit(name)
    scheme = parts.scheme.lower()
    options: dict[str, Any] = {"timeout": f"{NETWORK_DEFAULTS['GDAL_HTTP_TIMEOUT']}s"}
    config: dict[str, Any] = {}
    if scheme == "s3":
        endpoint = _aws_endpoint_url()
        if not endpoint and os.environ.get("AWS_S3_ENDPOINT"):  # GDAL's own variables
            https = os.environ.get("AWS_HTTPS", "YES").upper() != "NO"
            endpoint = ("https://" if https else "http://") + os.environ["AWS_S3_ENDPOINT"]
        if endpoint:
            config["endpoint"] = endpoint
            options["allow_http"] = endpoint.startswith("http://")
    elif scheme in ("http", "https"):
        options["allow_http"] = scheme == "http"
    base, key = f"{scheme}://{parts.netloc}/", parts.path.lstrip("/")
    kwargs: dict[str, Any] = {"client_options": options}
    if config:
        kwargs["config"] = config
    return from_url(base, **kwargs), key


def identity(name: str) -> tuple[int, int]:
    """(size in bytes, version) of a remote object: the version is a number made from its
    ETag, else its Last-Modified time, so that the ledger can tell when it changed. Raises
    :class:`InputError` (one line, the URL redacted) when it cannot be reached."""
    try:
        meta = _head(name)
    except Exception as exc:  # obstore's errors: not found, permission, network, timeout
        raise InputError(f"{redact(name)}: cannot be reached ({_first_line(exc)})") from exc
    tag = str(meta.get("e_tag") or meta.get("last_modified") or "")
    version = int(hashlib.sha256(tag.encode()).hexdigest()[:15], 16)
    return int(meta["size"]), version


def _head(name: str) -> dict[str, Any]:
    """size, e_tag and last_modified of an object: an HTTP HEAD request for http(s) URLs
    (obstore's HTTP store asks with WebDAV's PROPFIND, which plain servers refuse), obstore's
    head for object stores."""
    if name.lower().startswith(("http://", "https://")):
        import urllib.request

        timeout = float(os.environ.get("GDAL_HTTP_TIMEOUT", NETWORK_DEFAULTS["GDAL_HTTP_TIMEOUT"]))
        request = urllib.request.Request(name, method="HEAD")
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            headers = answer.headers
            return {
                "size": int(headers.get("Content-Length") or 0),
                "e_tag": headers.get("ETag"),
                "last_modified": headers.get("Last-Modified"),
            }
    import obstore

    store, key = _store(name)
    return dict(obstore.head(store, key))


def list_matching(pattern: str) -> list[str]:
    """Object URLs matching ``pattern``, a URL with glob characters (``*``, ``?``, ``[``) in
    its key: the store is listed from the key's part before the first of them, and keys are
    matched as a local glob matches paths (:func:`glob_regex`: ``*`` stays within one "folder",
    ``**`` crosses them)."""
    import obstore

    store, key = _store(pattern)
    cut = min((i for i, ch in enumerate(key) if ch in "*?["), default=len(key))
    prefix = key[:cut]
    base = pattern[: len(pattern) - len(key)]
    try:
        listed = [o["path"] for batch in obstore.list(store, prefix=prefix) for o in batch]
    except Exception as exc:
        raise InputError(f"{redact(pattern)}: cannot list ({_first_line(exc)})") from exc
    regex = glob_regex(key)
    return sorted(base + k for k in listed if regex.fullmatch(k))


def glob_regex(pattern: str, capture: bool = False) -> re.Pattern[str]:
    """A regular expression for the glob ``pattern`` over ``/``-separated keys, with the
    meaning :func:`glob.glob` gives it with ``recursive=True``: ``*``, ``?`` and ``[…]`` never
    match ``/``; ``**/`` matches any number of folders (none too), a final ``**`` anything.
    With ``capture``, each wildcard is a group, so that two globs' matches can be paired by
    what their wildcards matched."""
    out: list[str] = []

    def add(part: str) -> None:
        out.append(f"({part})" if capture else part)

    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if pattern.startswith("**", i) and (i == 0 or pattern[i - 1] == "/"):
            if pattern.startswith("**/", i):
                add("(?:[^/]*/)*")
                i += 3
                continue
            if i + 2 == n:
                add(".*")
                i += 2
                continue
        if ch == "*":
            add("[^/]*")
        elif ch == "?":
            add("[^/]")
        elif ch == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end]
            negate = body.startswith("!")
            body = body[1:] if negate else body
            body = body.replace("\\", "\\\\").replace("^", "\\^")
            add(f"[^/{body}]" if negate else f"(?!/)[{body}]")
            i = end + 1
            continue
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def join(prefix: str, *names: str) -> str:
    """``prefix`` (a URL of a "folder") joined with ``names`` by ``/``."""
    return "/".join([prefix.rstrip("/"), *names])


def check_writable_prefix(prefix: str) -> None:
    """Prove that objects can be written under ``prefix`` (write and delete a probe), or raise
    :class:`OutputError` in one line: wrong credentials, no such bucket, unreachable."""
    import obstore

    probe = join(prefix, f".geoseg-probe-{os.getpid()}")
    try:
        store, key = _store(probe)
        obstore.put(store, key, b"")
        obstore.delete(store, key)
    except Exception as exc:
        raise OutputError(f"{redact(prefix)}: cannot write there ({_first_line(exc)})") from exc


def upload(local: os.PathLike[str], url: str) -> None:
    """Copy the complete local file ``local`` to ``url``. Object stores publish an object
    only when its upload completes (multipart uploads too), so no reader ever sees part of
    it under its final key."""
    import obstore

    try:
        store, key = _store(url)
        obstore.put(store, key, Path(local))
    except Exception as exc:
        raise OutputError(f"{redact(url)}: upload failed ({_first_line(exc)})") from exc


def exists(url: str) -> bool:
    """Whether the object ``url`` exists (False too when it cannot be reached)."""
    try:
        _head(url)
    except Exception:
        return False
    return True


def _first_line(exc: BaseException) -> str:
    """:func:`geoseg.errors.first_line` of ``exc`` with URLs' query strings removed."""
    return redact_text(first_line(exc))


#: a URL inside a message (the characters that end it: blanks, quotes, brackets)
_URL_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>()\[\]]+")
#: a request path with a query string, as HTTP libraries write it ("url: /search?token=…")
_PATH_QUERY = re.compile(r"(?<![\w:/])(/[^\s?'\"<>()]*)\?(?=[^\s'\"<>()]*=)[^\s'\"<>()]*")


def _redact_match(m: re.Match[str]) -> str:
    """A URL found in a text, redacted; punctuation that ends the sentence kept."""
    url = m.group(0)
    core = url.rstrip(":,;.")
    return redact(core) + url[len(core) :]


def redact_text(text: str) -> str:
    """``text`` (a message, a log line) with every URL in it :func:`redact`-ed, and the query
    string of every request path (``/search?token=…``) removed."""
    text = _URL_IN_TEXT.sub(_redact_match, text)
    return _PATH_QUERY.sub(r"\1", text)
