"""The README's promises each name tests that prove them, and those tests exist."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMISES = ("bounded", "seamless", "safe", "exact vectors", "idempotent", "remote windowed reads")


def promised_tests() -> dict[str, list[str]]:
    """``promise: test ids`` from the README's list under its top section."""
    text = (REPO / "README.md").read_text()
    start = text.index("Each promise and the tests that fail when it breaks")
    block = text[start : text.index("\n\n", text.index("\n- ", start))]
    found: dict[str, list[str]] = {}
    for item in re.split(r"\n- ", block)[1:]:
        name, _, rest = item.partition(":")
        found[name.strip()] = re.findall(r"`(tests/[\w/]+\.py::\w+)`", rest)
    return found


def test_every_promise_names_tests_that_exist() -> None:
    found = promised_tests()
    assert set(found) == set(PROMISES), found
    for promise, ids in found.items():
        assert ids, f"{promise}: no test named"
        for test_id in ids:
            path, name = test_id.split("::")
            module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
            assert callable(getattr(module, name, None)), f"{promise}: {test_id} does not exist"
