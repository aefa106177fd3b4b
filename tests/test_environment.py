"""environment.yml and pyproject.toml name the same dependencies."""

from __future__ import annotations

import re
import tomllib

import yaml

from tests.conftest import REPO

# conda-forge names that differ from PyPI names
CONDA_TO_PYPI = {"pytorch": "torch"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_matches_pyproject() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pypi = {_name(r) for r in pyproject["project"]["dependencies"]}
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    conda = {
        CONDA_TO_PYPI.get(_name(d), _name(d))
        for d in env["dependencies"]
        if isinstance(d, str) and _name(d) not in ("python", "pip")
    }
    assert conda == pypi, (
        f"only in environment.yml: {conda - pypi}; only in pyproject: {pypi - conda}"
    )
    assert "conda-forge" in env["channels"]
