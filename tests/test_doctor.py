"""``python -m memops doctor``: environment, kernel choice, chunk plan, self-test against float64, speed probe."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from memops import doctor

ARGS = ["--tokens", "64", "--hidden", "32", "--vocab", "256", "--seconds", "0.5"]


def _args(*argv):
    p = argparse.ArgumentParser()
    doctor.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_doctor_runs_on_cpu(tmp_path, capsys, dtype):
    threads = torch.get_num_threads()
    path = tmp_path / "doctor.json"
    assert doctor.main(_args(*ARGS, "--dtype", dtype, "--json", str(path))) == 0
    assert torch.get_num_threads() == threads
    out = capsys.readouterr().out
    result = json.loads(path.read_text())
    assert result["device"] == "cpu" and result["dtype"] == dtype
    assert result["environment"]["torch"] == torch.__version__
    from memops.ops import torch_private

    assert result["environment"]["registration_path"] == torch_private.PATH
    assert f"op registration: {torch_private.PATH} path" in out
    assert result["kernels"]["heads"]["cross_entropy, log-probs, GRPO"] == "torch"
    plan = result["chunk_plan"]["plans"]["torch heads"]
    assert plan["chunks"] * plan["rows_per_chunk"] >= 64
    checks = {r["check"]: r for r in result["self_test"]}
    for family in ("cross_entropy", "cross_entropy softcap=30", "class_weighted", "focal", "grpo", "distill"):
        row = checks[f"{family} (torch heads)"]
        assert row["status"] == "OK", row
        assert set(row["error"]) == {"loss", "grad_input", "grad_weight"}
    assert checks["weight gradient over 8 chunks"]["status"] == "OK"
    for family in doctor.CAPTURED:
        assert checks[f"CUDA-graph capture of a {family} step, replayed on new data"]["status"] == "n/a"
    assert checks['torch.compile(mode="reduce-overhead") training step']["status"] == "n/a"
    assert [r["method"] for r in result["speed"]] == ["three matmuls", "unfused", "memops"]
    assert all(r["ms"] > 0 for r in result["speed"])
    assert result["verdict"].startswith("OK") and "verdict: OK" in out and "| grpo (torch heads) |" in out


def test_doctor_fails_a_check_that_misses_its_bound(monkeypatch, capsys):
    """With a zero bound the self-test rows fail (their errors are not exactly 0), and the exit status says so."""
    monkeypatch.setattr(doctor, "FACTOR", 0.0)
    monkeypatch.setattr(doctor, "FLOOR", {k: 0.0 for k in doctor.FLOOR})
    assert doctor.main(_args(*ARGS[:-2], "--seconds", "0")) == 1
    out = capsys.readouterr().out
    assert "verdict: FAIL" in out and "| FAIL |" in out


def test_doctor_rejects_bad_arguments():
    with pytest.raises(SystemExit, match="--device"):
        doctor.run(_args("--device", "tpu"))
    with pytest.raises(SystemExit, match="--tokens"):
        doctor.run(_args("--tokens", "-3", "--seconds", "0"))


@pytest.mark.parametrize("family", doctor.CAPTURED)
def test_capture_checks_dry_run_on_cpu(family):
    """The CUDA-graph checks' own code on CPU: the captured step re-run in place of a replay, on new data, must
    match eager (a step that kept stale gradients or inputs would not)."""
    row = doctor._capture_step(family, "cpu", "float32", dry_run=True)
    assert row["status"] == "OK", row
    assert 0 <= row["error"] <= row["bound"]


def test_reduce_overhead_check_dry_run_on_cpu():
    torch._dynamo.reset()
    row = doctor._reduce_overhead_step("cpu", "float32", dry_run=True)
    torch._dynamo.reset()
    assert row["status"] == "OK", row


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch_invariance_check(dtype):
    row = doctor.batch_invariance_check("cpu", dtype)
    assert row["status"] == "OK" and row["why"].startswith("0 of 24"), row


def test_batch_invariance_check_fails_when_rows_change(monkeypatch):
    """The check can fail: with the mode's fixed chunk rows switched off, fp32 rows change with the batch."""
    from memops import config

    monkeypatch.setattr(config, "invariant_rows", lambda device: None)
    row = doctor.batch_invariance_check("cpu", "float32")
    assert row["status"] == "FAIL", row
