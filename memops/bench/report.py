"""Tables, ratios and plots of ``python -m memops bench`` results."""

from __future__ import annotations

COLUMNS = [
    "method",
    "time s",
    "x eager",
    "x compile",
    "x floor",
    "peak extra MiB",
    "x eager mem",
    "err loss",
    "err grad_input",
    "err grad_weight",
]
ERRORS = ("err_loss", "err_grad_input", "err_grad_weight")
LEGEND = (
    "Lower is better in every column. time s: median seconds of one forward+backward step; "
    "x eager, x compile, x floor: time ratio to the eager / compile / floor row; "
    "peak extra MiB: peak memory above the inputs and the returned gradients; x eager mem: its ratio to eager's; "
    "err: max absolute difference from a float64 unfused reference (- = not checked). "
    "floor = the three projection matmuls alone, no loss: what the matmuls of a step cost by themselves."
)


def _ratio(a, b):
    return None if (a is None or not b) else a / b


def add_ratios(rows: list[dict]) -> list[dict]:
    """Time and memory ratios to the eager, compile and floor rows of the same shape (None where missing)."""
    by = {r["method"]: r for r in rows if r.get("status") == "ok"}
    eager, comp, floor = by.get("eager", {}), by.get("compile", {}), by.get("floor", {})
    for r in rows:
        if r.get("status") == "ok":
            r["x_eager"] = _ratio(r["time_s"], eager.get("time_s"))
            r["x_compile"] = _ratio(r["time_s"], comp.get("time_s"))
            r["x_floor"] = _ratio(r["time_s"], floor.get("time_s"))
            r["x_eager_mem"] = _ratio(r["peak_extra_bytes"], eager.get("peak_extra_bytes"))
    return rows


def _f(v, fmt):
    return "n/a" if v is None else format(v, fmt)


def format_table(rows: list[dict]) -> str:
    """A Markdown table, one row per method; skipped, failed and OOM methods say so in their row."""
    rows = add_ratios([dict(r) for r in rows])
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        status = r.get("status", "ok")
        if status != "ok":
            what = r["error"] if status in ("oom", "skipped") else f"failed: {r['error']}"
            if status == "skipped":
                what = f"skipped: {r['error']}"
            lines.append(f"| {r['method']} | {what} |" + " |" * (len(COLUMNS) - 2))
            continue
        peak = r.get("peak_extra_bytes")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["method"],
                    f"{r['time_s']:.3f}",
                    _f(r["x_eager"], ".3f"),
                    _f(r["x_compile"], ".3f"),
                    _f(r["x_floor"], ".3f"),
                    "n/a" if peak is None else f"{peak / 2**20:,.1f}",
                    _f(r["x_eager_mem"], ".3f"),
                    *[_f(r.get(k), ".2e") if k in r else "-" for k in ERRORS],
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def plot(runs: list[dict], sweep: str | None, path: str, title: str) -> None:
    """PNG: time and peak extra memory per method, against the swept size (bars for a single shape)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = []
    for run in runs:
        for r in run["rows"]:
            if r.get("status") == "ok" and r["method"] not in methods:
                methods.append(r["method"])
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    if sweep:
        for m in methods:
            pts = [(run[sweep], r) for run in runs for r in run["rows"] if r["method"] == m]
            ok = [(s, r) for s, r in pts if r.get("status") == "ok"]
            if ok:
                ax_t.plot([s for s, _ in ok], [r["time_s"] for _, r in ok], marker="o", label=m)
                ax_m.plot(
                    [s for s, _ in ok], [(r["peak_extra_bytes"] or 0) / 2**20 for _, r in ok], marker="o", label=m
                )
            oom = [s for s, r in pts if r.get("status") == "oom"]
            if oom:
                ax_m.scatter(oom, [ax_m.get_ylim()[1]] * len(oom), marker="x", color="red")
        for ax in (ax_t, ax_m):
            ax.set_xscale("log", base=2)
            ax.set_xlabel(sweep)
            ax.grid(True, alpha=0.3)
        ax_t.set_yscale("log")
    else:
        rows = [r for r in runs[0]["rows"] if r.get("status") == "ok"]
        names = [r["method"] for r in rows]
        ax_t.bar(names, [r["time_s"] for r in rows], color="tab:blue")
        ax_m.bar(names, [(r["peak_extra_bytes"] or 0) / 2**20 for r in rows], color="tab:orange")
    ax_t.set_ylabel("forward+backward time (s)")
    ax_m.set_ylabel("peak extra memory (MiB)")
    if sweep and methods:
        ax_m.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
