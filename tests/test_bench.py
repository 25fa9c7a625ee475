"""``python -m memops bench`` end to end on tiny shapes: table, JSON, plot, sweeps, skips, OOM, errors."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memops import bench
from memops.bench import report
from memops.bench.methods import grpo_data, unavailable

FIELDS = {
    "method",
    "status",
    "time_s",
    "times_s",
    "peak_extra_bytes",
    "loss",
    "err_loss",
    "err_grad_input",
    "err_grad_weight",
    "x_eager",
    "x_compile",
    "x_eager_mem",
    "x_floor",
}


def _run(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "memops", "bench", *args], capture_output=True, text=True, timeout=timeout
    )


def _row(stdout: str, method: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith(f"| {method} |"))


def _assert_errors_below(stdout: str, methods, bound: float = 1e-5) -> None:
    """Each method's three error columns (loss, input and weight gradients) are under ``bound``."""
    for m in methods:
        errs = [float(c) for c in _row(stdout, m).strip("|").split("|")[-3:]]
        assert max(errs) < bound, m


def test_bench_tiny_end_to_end(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = _run(
        "--tokens", "64", "--hidden", "16", "--vocab", "101", "--reps", "2", "--json", str(out), "--plot", str(png)
    )
    assert proc.returncode == 0, proc.stderr
    for m in ("eager", "compile", "chunked", "torch_lce", "memops", "floor"):
        assert f"| {m} |" in proc.stdout
    assert "| liger | skipped: CUDA only |" in proc.stdout
    cce = unavailable("cce", "cross_entropy", "cpu") is None  # runs when installed
    # progress: the reference + each runnable method's warm-up and 2 steps
    assert f"{1 + (6 + cce) * 3}/{1 + (6 + cce) * 3} " in proc.stderr
    assert "Lower is better in every column" in proc.stdout and "max absolute difference from a float64" in proc.stdout
    data = json.loads(out.read_text())
    assert data["config"]["tokens"] == 64 and data["config"]["loss"] == "cross_entropy"
    assert data["config"]["ignored"] == 0.1 and "10% of targets ignored" in proc.stdout
    assert data["torch"] and data["device_name"] == "cpu" and data["threads"] >= 1
    (run,) = data["runs"]
    assert (run["tokens"], run["hidden"], run["vocab"]) == (64, 16, 101)
    rows = {r["method"]: r for r in run["rows"]}
    assert list(rows) == ["eager", "compile", "chunked", "torch_lce", "memops", "floor", "cce", "liger", "trl"]
    assert rows["liger"]["status"] == "skipped"
    assert rows["trl"]["status"] == "skipped"  # --loss distill or grpo only
    assert rows["cce"]["status"] == ("ok" if cce else "skipped")
    for m in ("eager", "compile", "chunked", "torch_lce", "memops") + (("cce",) if cce else ()):
        r = rows[m]
        assert set(r) == FIELDS, set(r) ^ FIELDS
        assert r["status"] == "ok" and r["time_s"] > 0 and len(r["times_s"]) == 2
        assert r["peak_extra_bytes"] is not None and r["peak_extra_bytes"] >= 0
        assert max(r["err_loss"], r["err_grad_input"], r["err_grad_weight"]) < 1e-5
    assert rows["eager"]["x_eager"] == 1.0 and rows["compile"]["x_compile"] == 1.0
    # the floor: three matmuls, no loss, no error columns
    assert set(rows["floor"]) == FIELDS - {"err_loss", "err_grad_input", "err_grad_weight"}
    assert rows["floor"]["x_floor"] == 1.0 and rows["memops"]["x_floor"] > 0
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_sweep_softcap_and_transform(tmp_path):
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    proc = _run(
        "--tokens",
        "32",
        "--hidden",
        "8",
        "--vocab",
        "50",
        "--reps",
        "1",
        "--loss",
        "focal",
        "--softcap",
        "5",
        "--methods",
        "eager,chunked,memops,cce,torch_lce",
        "--sweep",
        "tokens",
        "--sweep-values",
        "16,40",
        "--ignored",
        "0",
        "--json",
        str(out),
        "--plot",
        str(png),
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        "(focal softcap=5, 0% of targets ignored)" in proc.stdout
        and "## N=16 " in proc.stdout
        and "## N=40 " in proc.stdout
    )
    assert "| cce | skipped: cross-entropy only |" in proc.stdout
    assert "| torch_lce | skipped: cross-entropy only |" in proc.stdout
    data = json.loads(out.read_text())
    assert [r["tokens"] for r in data["runs"]] == [16, 40] and data["config"]["sweep"] == "tokens"
    for run in data["runs"]:
        for r in run["rows"]:
            if r["method"] not in ("cce", "torch_lce"):
                assert r["status"] == "ok"
                assert max(r["err_loss"], r["err_grad_input"], r["err_grad_weight"]) < 1e-5
    assert png.stat().st_size > 1000


def test_bench_oom_is_reported_and_the_run_goes_on(tmp_path):
    # eager needs ~3 x 256 MiB of logits here; memops' chunk budget is 112 MiB
    out = tmp_path / "oom.json"
    proc = _run(
        "--tokens",
        "4096",
        "--hidden",
        "32",
        "--vocab",
        "16384",
        "--reps",
        "1",
        "--methods",
        "eager,memops",
        "--memory-cap-mib",
        "200",
        "--no-check",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "| eager | OOM at 4096 tokens |" in proc.stdout
    rows = {r["method"]: r for r in json.loads(out.read_text())["runs"][0]["rows"]}
    assert rows["eager"]["status"] == "oom" and "allocate" in rows["eager"]["message"]
    assert rows["memops"]["status"] == "ok" and rows["memops"]["peak_extra_bytes"] < 200 * 2**20


@pytest.mark.parametrize(
    "args,message",
    [
        (["--methods", "eager,bogus"], "unknown ['bogus']"),
        (["--tokens", "0"], "--tokens must be >= 1"),
        (["--loss", "nope"], "unknown transform 'nope'"),
        (["--softcap", "0"], "--softcap must be > 0"),
        (["--sweep-values", "1,2"], "--sweep-values needs --sweep"),
        (["--sweep", "vocab", "--sweep-values", "a,b"], "--sweep-values must be comma-separated integers"),
        (["--memory-cap-mib", "-1"], "--memory-cap-mib must be > 0"),
        (["--ignored", "1.5"], "--ignored must be a fraction in [0, 1]"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--preset", "gpt5"], "invalid choice"),
    ],
)
def test_bench_argument_errors(args, message):
    if args == ["--device", "cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    proc = _run(*args)
    assert proc.returncode != 0
    assert message in proc.stderr


def _parse(*argv):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(list(argv))


def test_presets_and_default_sweep():
    args = _parse("--preset", "gemma2-2b")
    assert bench._resolve(args) == [{"tokens": 2048, "hidden": 2304, "vocab": 256000}] and args.softcap == 30.0
    args = _parse("--preset", "llama3-8b", "--vocab", "1000", "--sweep", "tokens", "--tokens", "1024")
    shapes = bench._resolve(args)
    assert [s["tokens"] for s in shapes] == [128, 256, 512, 1024] and args.softcap is None
    assert all(s["hidden"] == 4096 and s["vocab"] == 1000 for s in shapes)
    assert bench._resolve(_parse())[0] == bench.DEFAULT


def test_overhead_preset(tmp_path, capsys):
    """``--preset overhead``: N=8 D=16 V=128 unless given, µs per forward+backward call, one row per method."""
    import torch

    from memops.bench import overhead

    assert bench._resolve(_parse("--preset", "overhead")) == [{"tokens": 8, "hidden": 16, "vocab": 128}]
    assert bench._resolve(_parse("--preset", "overhead", "--tokens", "32"))[0]["tokens"] == 32
    threads = torch.get_num_threads()
    try:
        rows = overhead.measure(methods=("eager", "memops", "liger"), calls=3, reps=1)
        args = _parse("--preset", "overhead", "--methods", "eager,memops", "--json", str(tmp_path / "o.json"))
        assert bench.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    assert [r["method"] for r in rows] == ["eager", "memops", "liger"] and "skipped" in rows[2]
    assert rows[0]["vs_eager"] == 1.0 and rows[1]["us"] > 0 and rows[1]["vs_eager"] > 0
    saved = json.loads((tmp_path / "o.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["eager", "memops"] and saved["config"]["tokens"] == 8
    assert "| memops |" in capsys.readouterr().out


def test_a_cut_run_keeps_the_rows_it_measured(tmp_path, monkeypatch, capsys):
    """Each row is printed and the JSON rewritten as it is measured: a run stopped after its first row still
    leaves that row on disk (``complete: false``)."""
    real = bench._run_shape

    def cut_after_first_row(args, shape, methods, skipped, progress, tmp, done):
        def stop(row, so_far):
            done(row, so_far)
            raise KeyboardInterrupt

        return real(args, shape, methods, skipped, progress, tmp, stop)

    monkeypatch.setattr(bench, "_run_shape", cut_after_first_row)
    path = tmp_path / "cut.json"
    args = _parse("--tokens", "16", "--hidden", "8", "--vocab", "64", "--methods", "eager,memops", "--reps", "1",
                  "--no-check", "--json", str(path))  # fmt: skip
    started = []
    real_worker = bench.Worker

    def tracked(*a, **kw):
        started.append(real_worker(*a, **kw))
        return started[-1]

    monkeypatch.setattr(bench, "Worker", tracked)
    with pytest.raises(KeyboardInterrupt):
        bench.main(args)
    assert started and all(wk.proc.poll() is not None for wk in started)  # no worker left running
    data = json.loads(path.read_text())
    assert data["complete"] is False and [r["method"] for r in data["runs"][0]["rows"]] == ["eager"]
    assert data["runs"][0]["rows"][0]["status"] == "ok"
    assert "row N=16 D=8 V=64: eager ok" in capsys.readouterr().out


def test_format_table_reports_failed_oom_and_skipped_methods():
    table = report.format_table(
        [
            {"method": "eager", "status": "ok", "time_s": 2.0, "peak_extra_bytes": 4 << 20},
            {"method": "memops", "status": "ok", "time_s": 1.0, "peak_extra_bytes": 1 << 20},
            {"method": "compile", "status": "failed", "error": "RuntimeError: boom"},
            {"method": "chunked", "status": "oom", "error": "OOM at 8 tokens"},
            {"method": "cce", "status": "skipped", "error": "not installed"},
        ]
    )
    assert "| memops | 1.000 | 0.500 | n/a | n/a | 1.0 | 0.250 |" in table
    assert "| compile | failed: RuntimeError: boom |" in table
    assert "| chunked | OOM at 8 tokens |" in table
    assert "| cce | skipped: not installed |" in table


def test_bench_grpo_step():
    proc = _run(
        "--loss",
        "grpo",
        "--batch",
        "4",
        "--tokens",
        "32",
        "--hidden",
        "8",
        "--vocab",
        "50",
        "--reps",
        "1",
        "--methods",
        "eager,chunked,memops,liger",
    )
    assert proc.returncode == 0, proc.stderr
    assert "(grpo, 10% of completion tokens masked, beta=0.04)" in proc.stdout
    assert "| liger | skipped: cross-entropy only |" in proc.stdout
    _assert_errors_below(proc.stdout, ("eager", "chunked", "memops"))
    bad = _run("--loss", "grpo", "--batch", "3", "--tokens", "32")
    assert bad.returncode != 0 and "divisible by --batch (3)" in bad.stderr
    bad = _run("--loss", "grpo", "--beta", "nan")
    assert bad.returncode != 0 and "--beta must be finite" in bad.stderr


def test_bench_grpo_without_kl():
    # beta = 0: no reference log-probs, as in TRL; every method still matches the float64 reference
    proc = _run(
        "--loss",
        "grpo",
        "--beta",
        "0",
        "--batch",
        "4",
        "--tokens",
        "32",
        "--hidden",
        "8",
        "--vocab",
        "50",
        "--reps",
        "1",
        "--methods",
        "eager,memops",
    )
    assert proc.returncode == 0, proc.stderr
    assert "(grpo, 10% of completion tokens masked, beta=0)" in proc.stdout
    _assert_errors_below(proc.stdout, ("eager", "memops"))


@pytest.mark.parametrize("masked,zeros", [(0.0, 0), (0.25, 20), (1.0, 80)])
def test_grpo_data_masks_the_asked_fraction(masked, zeros):
    mask = grpo_data(80, 50, 4, "cpu", masked)[0]
    assert mask.shape == (4, 20) and int((mask == 0).sum()) == zeros and bool(((mask == 0) | (mask == 1)).all())


def test_timed_steps_get_glibc_steady_state_malloc():
    # memory is measured under MALLOC_MMAP_THRESHOLD_=65536; timed steps run with the threshold glibc's
    # dynamic rule reaches in a long-running process (mallopt succeeded)
    from memops.bench.worker import steady_state_malloc

    assert steady_state_malloc()


def test_torch_lce_has_no_softcap():
    assert unavailable("torch_lce", "cross_entropy", "cpu", softcap=30.0) == "no soft-capping option"
    assert unavailable("torch_lce", "cross_entropy", "cpu") is None  # torch 2.13 ships it
    assert unavailable("floor", "grpo", "cpu") is None  # the three matmuls are the same for any loss


def test_bench_distill_with_trls_kernel(tmp_path):
    out = tmp_path / "distill.json"
    proc = _run(
        "--loss", "distill", "--tokens", "24", "--hidden", "8", "--vocab", "40", "--reps", "1",
        "--methods", "eager,memops,trl,floor,cce", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "(distill, 10% of targets ignored, beta=0.5)" in proc.stdout
    assert "| floor | skipped: three-matmul floor of a single projection |" in proc.stdout
    rows = {r["method"]: r for r in json.loads(out.read_text())["runs"][0]["rows"]}
    for method in ("eager", "memops", "trl"):
        assert rows[method]["status"] == "ok" and rows[method]["err_loss"] < 1e-5


def test_gpu_bench_script_dry_run_on_cpu(tmp_path):
    """scripts/gpu_bench.sh on CPU (the Triton heads under the interpreter, tiny shapes): one archive under
    $OUT holds every step's table, log and complete JSON; the doctor's self-test passes with both head sets;
    the target step measures memops' Triton and torch heads next to the three matmuls and torch.compile; in
    the checked small run both heads' gradients are within 2x the unfused bf16 code's error against float64
    and their losses agree to fp32 rounding (they read the same bf16 logits)."""
    import tarfile

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_bench.sh"
    out = tmp_path / "out"
    env = dict(
        os.environ,
        OUT=str(out),
        PYTHON=sys.executable,
        MEMOPS_BENCH_DEVICE="cpu",
        MEMOPS_BENCH_TOKENS="16",
        MEMOPS_BENCH_SMALL="--tokens 16 --hidden 8 --vocab 64",
        MEMOPS_BENCH_ARGS="--hidden 8 --vocab 64",
        MEMOPS_BENCH_TP="2",  # the multi-GPU step, over 2 gloo ranks here
    )
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [p.name for p in out.iterdir()] == ["gpu-bench.tar.gz"]
    with tarfile.open(out / "gpu-bench.tar.gz") as tar:
        tar.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    got = tmp_path / "gpu-bench"
    doctor = json.loads((got / "doctor.json").read_text())
    assert doctor["verdict"].startswith("OK"), doctor["verdict"]
    checks = {r["check"]: r["status"] for r in doctor["self_test"]}
    for family in ("cross_entropy", "cross_entropy softcap=30", "grpo"):
        assert checks[f"{family} (triton heads, interpreted)"] == "OK" and checks[f"{family} (torch heads)"] == "OK"
    steps = ("target-llama3-8b-bf16", "errors-small-bf16", "grpo-llama3-8b-bf16", "gemma2-2b-bf16")
    for name in steps:
        data = json.loads((got / f"{name}.json").read_text())
        assert data["complete"] and (got / f"{name}.md").read_text().count("| memops_triton |") == 1
        rows = {r["method"]: r for r in data["runs"][0]["rows"]}
        heads = [rows[m] for m in ("memops_torch", "memops_triton")]
        for r in heads:
            assert r["status"] == "ok" and r["time_s"] > 0, (name, r)
        if name == "errors-small-bf16":
            for r in heads:
                for err in ("err_grad_input", "err_grad_weight"):
                    assert r[err] <= 2 * rows["eager"][err] + 1e-6, (name, r["method"], err, r, rows["eager"])
            assert abs(heads[0]["err_loss"] - heads[1]["err_loss"]) < 1e-5, (name, heads)
        else:
            assert all(r.get("err_loss") is None for r in heads)  # no float64 reference at the big shapes
    target = {r["method"]: r for r in json.loads((got / "target-llama3-8b-bf16.json").read_text())["runs"][0]["rows"]}
    assert target["floor"]["status"] == target["compile"]["status"] == "ok"
    assert {r["method"] for r in json.loads((got / "overhead.json").read_text())["rows"]} >= {"eager", "memops"}
    kept = {r["method"]: r for r in json.loads((got / "sampling-mask-qwen-bf16.json").read_text())["runs"][0]["rows"]}
    methods = ("memops", "memops_batch_invariant", "compile", "eager")
    assert all(kept[m]["status"] == "ok" and kept[m]["time_s"] > 0 for m in methods), kept
    mtp = {r["method"]: r for r in json.loads((got / "mtp3-llama3-8b-bf16.json").read_text())["runs"][0]["rows"]}
    assert all(mtp[m]["status"] == "ok" for m in ("memops", "memops_per_depth", "compile", "eager")), mtp
    for name in ("verl-1937x3584x152064-bf16", "verl-8192x4096x102400-bf16"):  # verl is not installed here
        verl = {r["method"]: r for r in json.loads((got / f"{name}.json").read_text())["runs"][0]["rows"]}
        assert verl["memops"]["status"] == verl["compile"]["status"] == "ok", verl
    assert "row N=16 D=8 V=64: memops_triton ok" in proc.stdout  # each row printed as it is measured
    for loss in ("cross_entropy", "logprobs"):
        tp = json.loads((got / f"tp2-{loss}-bf16.json").read_text())
        methods = ["memops_tp", "memops_sp", "memops_sp_serial", "gathered", "single"]
        if loss == "logprobs":  # verl's Megatron way: Megatron's sequence-parallel gather, input_grad="partial"
            methods.insert(3, "memops_gather_partial")
        assert [r["method"] for r in tp["rows"]] == methods
        assert all(r["ms"] > 0 for r in tp["rows"]) and len(tp["ranks"]) == 2


def test_bench_logprobs_with_a_sampling_mask():
    """``--loss logprobs`` and ``--loss grpo`` with ``--kept K``: memops' log-probs over the kept set against the
    unfused baselines' masked ``log_softmax``, within the unfused code's error of the float64 reference."""
    shape = ("--tokens", "64", "--hidden", "16", "--vocab", "300", "--reps", "1", "--kept", "7")
    for loss in ("logprobs", "grpo"):
        proc = _run("--loss", loss, *shape, "--methods", "eager,chunked,memops,floor")
        assert proc.returncode == 0, proc.stderr
        assert "a sampling mask of 7 kept ids per token" in proc.stdout
        eager = _row(proc.stdout, "eager").split("|")
        memops_row = _row(proc.stdout, "memops").split("|")
        for col in (-4, -3, -2):  # err loss, grad_input, grad_weight
            assert float(memops_row[col]) <= 4 * float(eager[col]) + 1e-6, (loss, memops_row, eager)
    bad = _run("--loss", "cross_entropy", "--kept", "3")
    assert bad.returncode != 0 and "--kept" in bad.stderr


def test_bench_seed_harness_preset_has_a_bias_and_bf16():
    """``--preset seed-harness`` (bf16, a trained bias; shrunk here): every method that takes a bias runs it
    within the unfused bf16 code's error of the float64 reference (all compute the same bias gradient); CCE,
    which has no bias option, is skipped saying so."""
    shape = ("--tokens", "128", "--hidden", "16", "--vocab", "300", "--reps", "1")
    proc = _run("--preset", "seed-harness", *shape, "--methods", "eager,compile,memops,torch_lce,floor,cce")
    assert proc.returncode == 0, proc.stderr
    assert "bfloat16" in proc.stdout and "with bias" in proc.stdout
    assert "| cce | skipped: no bias option" in proc.stdout
    eager = _row(proc.stdout, "eager").split("|")
    memops_row = _row(proc.stdout, "memops").split("|")
    for col in (-4, -3, -2):  # err loss, grad_input, grad_weight
        assert float(memops_row[col]) <= 1.5 * float(eager[col]) + 1e-6, (memops_row, eager)


def test_bench_tensor_parallel_mode():
    """``--tp 2``: vocabulary-parallel CE over two gloo ranks, every method timed and its per-rank peak memory
    measured; memops' is below the gathered logits' (which hold the [N, V] logits on every rank)."""
    proc = _run("--tp", "2", "--tokens", "256", "--hidden", "32", "--vocab", "4000", "--reps", "1")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("|")[1].strip(): line.split("|") for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"memops_tp", "memops_sp", "gathered", "single"}
    assert float(rows["memops_tp"][4]) < float(rows["gathered"][4]), proc.stdout


def test_describe_gives_one_line_even_for_an_empty_message():
    from memops.bench.worker import describe

    assert describe(RuntimeError("out of memory\nmore detail")) == "RuntimeError: out of memory"
    assert describe(RuntimeError()) == "RuntimeError: "
    assert describe(ValueError("x" * 300), 10) == "ValueError: " + "x" * 10


def test_bench_class_weighted_cross_entropy():
    """``--loss class_weighted``: class weights and label smoothing 0.1, every method that runs it within
    fp32 rounding of the float64 reference (torch_lce runs it unfused)."""
    shape = ("--tokens", "48", "--hidden", "8", "--vocab", "50", "--reps", "1")
    proc = _run("--loss", "class_weighted", *shape, "--methods", "eager,torch_lce,memops,chunked")
    assert proc.returncode == 0, proc.stderr
    assert "| chunked | skipped: class-weighted cross-entropy" in proc.stdout
    _assert_errors_below(proc.stdout, ("eager", "torch_lce", "memops"))
