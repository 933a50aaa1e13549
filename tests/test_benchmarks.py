"""Every script in benchmarks/ answers ``--help`` (a rename or a broken import in a script fails here), and the
shared helpers do what the scripts rely on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name != "common.py")


def test_the_expected_scripts_are_there() -> None:
    assert SCRIPTS == [
        "dist_measure.py", "dist_step_measure.py", "fenchel_ab.py", "fenchel_cost.py", "lpom_ae_figure.py",
        "lpom_ae_layer_probe.py",
        "lpom_cost_model.py", "lpom_parallel_timing.py", "lpom_val_probe.py", "plain_loop.py",
        "proxprop_stability.py", "proxprop_timing.py", "tiam_cost.py",
    ]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_answers_help(script: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                            env=env, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


@pytest.fixture()
def common(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import common as module

    return module


def test_parse_sets_groups_by_label_and_rejects_bad_items(common: ModuleType) -> None:
    assert common.parse_sets(["a.lr=0.1", "a.x=2", "b.solver=cg3"]) == {"a": {"lr": "0.1", "x": "2"},
                                                                         "b": {"solver": "cg3"}}
    with pytest.raises(SystemExit, match="LABEL.KEY=VALUE"):
        common.parse_sets(["lr=0.1"])


def test_inclusive_timer_keeps_nested_time_in_the_parent(common: ModuleType) -> None:
    timer = common.InclusiveBlockTimer()
    with timer("w_block[0]"):
        with timer("gram"):
            pass
        with timer("gram"):
            pass
    assert timer.calls == {"w_block[0]": 1, "gram": 2, "w_block[0]/gram": 2}
    assert timer.seconds["w_block[0]"] >= timer.seconds["w_block[0]/gram"] >= 0.0
