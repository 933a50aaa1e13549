"""Each method's presets as its docs page states them (docs/methods/<method>.md, the "Presets" tables).

A presets table has the columns ``hyperparameter | tuned (default) | paper``; its heading may name the model
it applies to (``Presets for `lenet5` ``; otherwise an MLP 784-500-10 with ReLU). Each cell is checked
against the configuration the method resolves for that preset and model, so the docs and the code cannot
drift apart.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from liftkit.methods import get, parse_hparam
from liftkit.models import build_model

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods"
PAGES = {"proxprop": "proxprop", "fenchel": "fenchel", "sibp": "sibp", "lpom": "lpom", "tiam": "tiam"}
HEADING = re.compile(r"^#+ .*Presets(?: for `([^`]+)`)?(?: \(activation `([^`]+)`\))?")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def preset_tables(text: str) -> list[tuple[str, str, list[list[str]]]]:
    """(model spec, activation, rows) of every presets table on a page."""
    tables = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = HEADING.match(line)
        if not match:
            continue
        start = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("|"))
        head = _cells(lines[start])
        assert head[1].startswith("tuned") and head[2] == "paper", head
        rows = []
        for row in lines[start + 2:]:
            if not row.startswith("|"):
                break
            rows.append(_cells(row))
        tables.append((match.group(1) or "784-500-10", match.group(2) or "relu", rows))
    return tables


def _value(cls, key: str, text: str):
    return parse_hparam(cls.Config, key, text.strip("`"))


@pytest.mark.parametrize("page, name", sorted(PAGES.items()))
def test_presets_match_the_docs(page, name):
    cls = get(name)
    tables = preset_tables((DOCS / f"{page}.md").read_text(encoding="utf-8"))
    assert tables, f"docs/methods/{page}.md has no presets table"
    for spec, activation, rows in tables:
        assert rows
        for preset, column in (("tuned", 1), ("paper", 2)):
            model = build_model(spec, input_shape=(1, 28, 28), num_classes=10, activation=activation,
                                output_activation=cls.model_output_activation, dtype=torch.float64)
            method = cls(model, preset=preset)
            for row in rows:
                key = row[0].strip("`")
                got = method.hparams[key]
                got = tuple(got) if isinstance(got, list) else got
                assert got == _value(cls, key, row[column]), f"{page} {spec} {preset}: {key}"
