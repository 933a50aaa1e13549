"""``liftkit report``: the results record generated from real bench outputs."""

from __future__ import annotations

import json
import shutil

import pytest

from liftkit.cli import main
from liftkit.report import collect, method_family, render_report


@pytest.fixture(scope="module")
def bench_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "digits-small"
    argv = ["bench", "--methods", "adam,lpom-sync", "--dataset", "digits", "--model", "64-16-10",
            "--epochs", "1", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    return out


def _bench(tmp_path, bench_output) -> None:
    shutil.copytree(bench_output, tmp_path / "results" / "digits-small")


def test_bench_records_its_command_and_date(tmp_path, bench_output):
    _bench(tmp_path, bench_output)
    results = json.loads((tmp_path / "results" / "digits-small" / "results.json").read_text())
    record = results["record"]
    assert record["command"].startswith("liftkit bench --methods adam,lpom-sync --dataset digits")
    assert "--out" not in record["command"] and "digits-small" not in record["command"]
    assert len(record["date"]) == 10 and record["date"][4] == "-"


def test_report_puts_each_method_beside_its_baselines(tmp_path, bench_output):
    _bench(tmp_path, bench_output)
    results_path = tmp_path / "results" / "digits-small" / "results.json"
    results = json.loads(results_path.read_text())
    results["record"]["paper"] = {"lpom-sync": {"value": "99.9%", "source": "a paper, Table 1"}}
    results_path.write_text(json.dumps(results))

    assert main(["report", str(tmp_path / "results")]) == 0
    text = (tmp_path / "results.md").read_text()
    lpom, adam = results["runs"][1], results["runs"][0]
    assert "## LPOM" in text and "## Adam" not in text  # a baseline has no table of its own
    row = next(line for line in text.splitlines() if line.startswith("| `lpom-sync`"))
    assert f"{100 * lpom['test_accuracy']:.2f}%" in row
    assert f"adam: {100 * adam['test_accuracy']:.2f}%" in row
    ratio = lpom["seconds_per_epoch"] / adam["seconds_per_epoch"]
    assert f"({ratio:.2f}x)" in row
    assert "99.9% (a paper, Table 1)" in row
    assert results["record"]["command"] in row and results["record"]["date"] in row
    assert str(tmp_path) not in text


def test_report_is_regenerated_identically(tmp_path, bench_output):
    _bench(tmp_path, bench_output)
    first = render_report(collect(tmp_path / "results"))
    assert render_report(collect(tmp_path / "results")) == first


def test_variants_share_their_method_table():
    assert method_family("lpom-async") == "lpom"
    assert method_family("am") == "tiam"
    assert method_family("fenchel") == "fenchel"


def test_report_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "results" / "broken"
    bad.mkdir(parents=True)
    (bad / "results.json").write_text("{ truncated")
    assert main(["report", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err.strip()
    assert "broken/results.json is not valid JSON" in err and "\n" not in err
    assert not (tmp_path / "results.md").exists()


def test_profiled_benches_are_listed_apart(tmp_path, bench_output):
    _bench(tmp_path, bench_output)
    results_path = tmp_path / "results" / "digits-small" / "results.json"
    results = json.loads(results_path.read_text())
    for run in results["runs"]:
        run["profile"] = {"blocks": []}
    results_path.write_text(json.dumps(results))
    text = render_report(collect(tmp_path / "results"))
    assert "## Profiles" in text and "(results/digits-small/results.md)" in text
    assert "| `lpom-sync`" not in text  # its timings include the profiler's cost: no row in the tables
