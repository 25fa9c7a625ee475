"""The benchmark entry point, end to end on a tiny shape."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from memops import bench


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "memops", "bench", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_bench_tiny_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run("--tokens", "64", "--hidden", "16", "--vocab", "101", "--reps", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "| memops |" in proc.stdout and "| eager |" in proc.stdout and "| compile |" in proc.stdout
    data = json.loads(out.read_text())
    assert data["config"]["tokens"] == 64 and data["config"]["loss"] == "cross_entropy"
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"eager", "compile", "memops"}
    for r in rows.values():
        assert r["time_s"] > 0 and len(r["times_s"]) == 2
        assert r["peak_extra_bytes"] is not None
        assert r["err_loss"] < 1e-5 and r["err_grad_input"] < 1e-5 and r["err_grad_weight"] < 1e-5


def test_bench_transform_loss():
    proc = _run("--tokens", "32", "--hidden", "8", "--vocab", "50", "--reps", "1", "--loss", "focal",
                "--methods", "eager,memops")
    assert proc.returncode == 0, proc.stderr
    assert "(focal)" in proc.stdout
    memops_row = next(line for line in proc.stdout.splitlines() if line.startswith("| memops |"))
    errs = [float(c) for c in memops_row.strip("|").split("|")[-3:]]
    assert max(errs) < 1e-5


@pytest.mark.parametrize("args,message", [
    (["--methods", "eager,bogus"], "unknown ['bogus']"),
    (["--tokens", "0"], "--tokens must be >= 1"),
    (["--loss", "nope"], "unknown transform 'nope'"),
])
def test_bench_argument_errors(args, message):
    proc = _run(*args)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_format_table_reports_failed_method():
    table = bench.format_table([
        {"method": "eager", "time_s": 2.0, "peak_extra_bytes": 4 << 20},
        {"method": "memops", "time_s": 1.0, "peak_extra_bytes": 1 << 20},
        {"method": "compile", "error": "RuntimeError: boom"},
    ])
    assert "| memops | 1.000 | 0.500 |" in table
    assert "failed: RuntimeError: boom" in table
