"""Every shipped configs/*.json names registered methods and valid hyperparameters (a typo in a reproduction
config would otherwise surface only when someone runs the long benchmark)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from liftkit.bench import RUN_KEYS
from liftkit.methods import get
from liftkit.methods.base import build_config, parse_hparam

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json"))


def test_there_are_configs() -> None:
    assert len(CONFIGS) > 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_methods_and_settings_are_valid(path: Path) -> None:
    config = json.loads(path.read_text())
    labels = config["methods"]
    assert len(set(labels)) == len(labels)
    per_run: dict[str, dict[str, object]] = {label: {} for label in labels}
    for key, value in config.get("set", {}).items():
        label, _, name = key.partition(".")
        assert label in per_run, f"{path.name}: {key} names a run that is not in methods"
        if name in RUN_KEYS:
            continue
        cls = get(label.split("@", 1)[0])
        text = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
        per_run[label][name] = parse_hparam(cls.Config, name, text)
    for label, hparams in per_run.items():
        name = label.split("@", 1)[0]
        build_config(get(name).Config, name, hparams)  # raises ValueError on a bad value
