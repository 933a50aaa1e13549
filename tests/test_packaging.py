"""The single-sourced version, the packaged configs, and the release files (the wheel itself: make dist)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import liftkit
from liftkit.cli import _resolve_config, main, shipped_configs

ROOT = Path(__file__).resolve().parents[1]


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"liftkit {liftkit.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]\d+|rc\d+|\.dev\d+|\.post\d+)?", liftkit.__version__)


def test_pyproject_reads_the_version_from_the_package():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "liftkit.__version__"}


def test_every_repository_config_is_shipped_in_the_package():
    repo = sorted(p.stem for p in (ROOT / "configs").glob("*.json"))
    assert sorted(shipped_configs()) == repo
    assert "demo" in repo


@pytest.mark.parametrize("name", ["demo", "demo.json"])
def test_a_bare_config_name_resolves_to_the_shipped_file(name):
    path = Path(_resolve_config(name))
    assert path.name == "demo.json" and path.read_text() == (ROOT / "configs" / "demo.json").read_text()


def test_a_config_path_is_used_as_given(tmp_path):
    own = tmp_path / "demo.json"
    own.write_text("{}")
    assert _resolve_config(str(own)) == str(own)


def test_an_unknown_config_name_is_a_one_line_error(capsys):
    assert main(["bench", "--config", "no-such-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a file nor a shipped config; shipped: demo" in err


def test_release_files_exist():
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog and f"## [{liftkit.__version__}]" in changelog
    citation = (ROOT / "CITATION.cff").read_text()
    assert "cff-version: 1.2.0" in citation and citation.count("- type: ") >= 5
