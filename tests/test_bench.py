"""Every benchmark in its quick mode, as a smoke test: a broken benchmark fails `make test`.

A quick run's numbers are not measurements (small counts, this machine busy with the suite): the reports go to a
temporary folder (BENCH_OUTPUT), never to bench/, and the runs use the stand-in the suite converted already
(BENCH_MODEL_BASE) and the photos it made (CLOTHING_DATASET). Notebook 03's quick mode runs in test_experiments.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

# (script, its quick-mode arguments, the report it writes)
BENCHMARKS = [
    ("bench_model_server.py", ["--quick", "--models", "standin", "--images="], "model_server"),
    ("bench_gateway.py", ["--quick", "--skip-install-size"], "gateway"),
    ("bench_load.py", ["--quick"], "load"),
    ("bench_wire.py", ["--quick"], "wire"),
]


def run_bench(script: str, args: list[str], env: dict) -> None:
    command = [sys.executable, str(ROOT / "bench" / script), *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, (
        f"{script} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )


@pytest.mark.timeout(2400)
def test_every_benchmark_runs_in_quick_mode_and_the_report_gathers_them(model_base, photo_folder, tmp_path):
    env = {
        **os.environ,
        "BENCH_OUTPUT": str(tmp_path),
        "BENCH_MODEL_BASE": str(model_base),
        "CLOTHING_DATASET": str(photo_folder),
    }
    kept = _reports_in_bench()
    for script, args, stem in BENCHMARKS:
        run_bench(script, args, env)
        document = json.loads((tmp_path / f"{stem}.json").read_text())
        assert document["targets"], f"{script} recorded no targets"
        assert (tmp_path / f"{stem}.md").read_text().startswith("# "), script
        failures = failed_requests(document)
        assert not failures, f"{script}: requests failed: {failures}"
    run_bench("report.py", [], env)
    report = json.loads((tmp_path / "report.json").read_text())
    assert {stem for _, _, stem in BENCHMARKS} <= {stem for stem, part in report["parts"].items() if part}
    assert len(report["targets"]) == sum(
        len(json.loads((tmp_path / f"{stem}.json").read_text())["targets"]) for _, _, stem in BENCHMARKS
    )
    assert kept == _reports_in_bench(), "a quick run wrote into bench/"


# The counts a benchmark keeps of requests that got no right answer. A shed request (503 overloaded) is an answer:
# the load benchmark's overload rows exist to cause them, and it counts them apart (shed_share, errors by kind).
FAILURE_COUNTS = ("errors", "other_errors", "no_answer")


def failed_requests(document, where: str = "") -> dict[str, int]:
    """Every failure count above zero in a benchmark's JSON, by where it is (the gateway benchmark stops at its
    first failed request instead, so a failure there fails the run)."""
    found = {}
    if isinstance(document, dict):
        for key, value in document.items():
            if key in FAILURE_COUNTS and isinstance(value, int) and not isinstance(value, bool) and value > 0:
                found[f"{where}/{key}"] = value
            found.update(failed_requests(value, f"{where}/{key}"))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            found.update(failed_requests(value, f"{where}[{index}]"))
    return found


def test_the_failure_check_finds_a_failed_request_in_each_benchmarks_report():
    """failed_requests on reports shaped as the benchmarks write them: a failure anywhere is found, sheds are not."""
    row = {"sent": 9, "shed_share": 0.5, "no_answer": 0, "other_errors": 0, "errors": {"503 overloaded": 4}}
    load = {"rows": [row]}
    assert failed_requests(load) == {}
    assert failed_requests({"rows": [row | {"no_answer": 1}]}) == {"/rows[0]/no_answer": 1}
    assert failed_requests({"rows": [row | {"other_errors": 2}]}) == {"/rows[0]/other_errors": 2}
    server = {"results": {"standin": {"with_batching": [{"errors": 0}, {"errors": 3, "first_error": "UNAVAILABLE"}]}}}
    assert failed_requests(server) == {"/results/standin/with_batching[1]/errors": 3}
    wire = {"paths": {"float32": {"errors": 1}, "uint8": {"errors": 0}}}
    assert failed_requests(wire) == {"/paths/float32/errors": 1}


def _reports_in_bench() -> dict[str, int]:
    """bench/'s reports as they are (name -> modification time): what a learner's own runs left there."""
    return {path.name: path.stat().st_mtime_ns for path in (ROOT / "bench").glob("*.json")}


def test_the_litert_conversion_probe_times_every_conversion_in_quick_mode(tmp_path):
    """bench_litert_conversions.py --quick (the small stand-in): TensorFlow and each of the five conversions timed,
    the batch-fixed one at batch 1 only. It sets no target, so it stays out of the report."""
    run_bench("bench_litert_conversions.py", ["--quick"], {**os.environ, "BENCH_OUTPUT": str(tmp_path)})
    rows = json.loads((tmp_path / "litert_conversions.json").read_text())["rows"]
    assert [row["runtime"].split(",")[0] for row in rows] == ["TensorFlow"] + ["LiteRT"] * 5
    assert [sorted(row["ms"]) for row in rows] == [["1", "8"]] * 3 + [["1"]] + [["1", "8"]] * 2
    assert all(value > 0 for row in rows for value in row["ms"].values())
    assert (tmp_path / "litert_conversions.md").read_text().startswith("# ")
