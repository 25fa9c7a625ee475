"""Every installed Hugging Face causal-LM (and image-text-to-text) type with memops' verdict on it:
``verified`` (the structural rule accepts its forward, ``hf_rule``, and its tiny instance passed the float64
equivalence test, ``hf_tested``), ``refused`` (the rule names the step that differs, or the equivalence test
found a difference) or ``unbuildable`` (no tiny instance could be built here: the reason).

``python -m memops models [--json]`` prints it; README's model table and ``docs/models.md`` are generated
from it (``scripts/update_hf_tested.py``; ``tests/test_hf_models.py`` keeps them equal).
"""

from __future__ import annotations

import json

# the families people look for, as README names them (entries of the sweep; absent ones are skipped)
HEADLINE = (
    ("Llama 3 / 3.2 Vision / 4", ("llama", "mllama", "mllama:image-text", "llama4_text", "llama4",
                                  "llama4:image-text")),
    ("Qwen 2.5 / 3 / 3.5 / Next / VL", ("qwen2", "qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe", "qwen3_next",
                                        "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5:image-text")),
    ("Gemma 2 / 3 / 4", ("gemma2", "gemma3_text", "gemma3", "gemma4_text", "gemma4", "gemma4_unified")),
    ("DeepSeek V2 / V3 / V3.2 / V4", ("deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4")),
    ("Mistral / Mixtral / Ministral 3", ("mistral", "mixtral", "ministral3")),
    ("GLM-4 / GLM-4-MoE / GLM-4V", ("glm4", "glm4_moe", "glm4v", "glm4v_moe", "glm46v")),
    ("GPT-OSS", ("gpt_oss",)),
    ("Phi-3 / Phi-4", ("phi3", "phimoe")),
    ("OLMo 2 / 3", ("olmo2", "olmo3")),
    ("Granite / Granite-MoE / Granite 4", ("granite", "granitemoe", "granitemoehybrid")),
    ("LFM2, EXAONE 4, ERNIE 4.5, Hunyuan, Seed-OSS", ("lfm2", "lfm2_moe", "exaone4", "ernie4_5",
                                                      "hunyuan_v1_dense", "seed_oss")),
    ("Falcon-H1, Nemotron-H, Kimi-Linear, MiniMax-M2, Mamba-2", ("falcon_h1", "nemotron_h", "kimi_linear",
                                                                 "minimax_m2", "mamba2")),
)  # fmt: skip


def model_types() -> list[str]:
    """Every model type transformers maps to a causal-LM or an image-text-to-text class."""
    from transformers.models.auto import modeling_auto

    names = set(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    return sorted(names | set(modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES))


def entries() -> list[str]:
    """What the sweep tests: every model type, plus ``"<type>:image-text"`` for each type whose
    image-text-to-text class is not its causal-LM class (``hf_tiny.model_class``)."""
    from transformers.models.auto import modeling_auto

    from .rule import IMAGE_TEXT

    causal = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    image_text = modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    extra = [t + IMAGE_TEXT for t in image_text if t in causal and causal[t] != image_text[t]]
    return sorted(model_types() + extra)


def verdict(entry: str) -> dict:
    """``{"model_type", "class", "status", "reason"}`` for one entry (:func:`entries`): the rule read live from
    the installed class, the test's outcome from ``hf_tested``."""
    from . import rule as hf_rule
    from . import tested as hf_tested
    from . import tiny as hf_tiny

    row = {"model_type": entry.removesuffix(hf_tiny.IMAGE_TEXT), "class": None, "status": "refused", "reason": ""}
    try:
        cls = hf_tiny.model_class(entry)
    except Exception as exc:  # noqa: BLE001  (a class that does not import here)
        row["reason"] = f"its class does not import here: {type(exc).__name__}: {exc}"
        return row
    row["class"] = cls.__name__
    try:
        hf_rule.read(cls)
    except hf_rule.Refused as exc:
        row["reason"] = f"{exc.step}: {exc.why}"
        return row
    if cls.__name__ in hf_tested.TESTED:
        row["status"], row["reason"] = "verified", "standard loss path; float64 equivalence test passed"
        return row
    status, reason = hf_tested.NOT_TESTED.get(entry, ("refused", "standard loss path, but not tested yet"))
    row["status"], row["reason"] = status, reason
    return row


def table() -> list[dict]:
    return [verdict(e) for e in entries()]


def counts(rows: list[dict]) -> dict:
    from transformers.models.auto import modeling_auto

    clm = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    causal = [r for r in rows if r["model_type"] in clm and r["class"] in (clm[r["model_type"]], None)]
    out = {"causal_lm": len(causal), "image_text": len(rows) - len(causal)}
    for status in ("verified", "refused", "unbuildable"):
        out[status] = len([r for r in rows if r["status"] == status])
        out[f"{status}_causal_lm"] = len([r for r in causal if r["status"] == status])
    return out


def readme_table(rows: list[dict] | None = None) -> str:
    """README's short table: the counts and the families people look for."""
    import transformers

    rows = table() if rows is None else rows
    by_type = dict(zip(entries(), rows))
    c = counts(rows)
    lines = [
        f"transformers {transformers.__version__}: **{c['verified_causal_lm']} of {c['causal_lm']} causal-LM types "
        f"verified** ({c['verified']} of {len(rows)} classes with the image-text-to-text ones); the rest are refused "
        f"({c['refused']}) or cannot be built small here ({c['unbuildable']}). Full list: `docs/models.md` "
        "(`python -m memops models`).",
        "",
        "| family | verified types |",
        "|---|---|",
    ]
    for name, types in HEADLINE:
        present = [t for t in types if t in by_type]
        ok = [t for t in present if by_type[t]["status"] == "verified"]
        cell = ", ".join(f"`{t}`" for t in ok) or "-"
        missing = [t for t in present if t not in ok]
        if missing:
            cell += " (not: " + ", ".join(f"`{t}` {by_type[t]['status']}" for t in missing) + ")"
        lines.append(f"| {name} | {cell} |")
    return "\n".join(lines)


def docs_table(rows: list[dict] | None = None) -> str:
    """``docs/models.md``'s full list."""
    rows = table() if rows is None else rows
    lines = ["| model type | class | status | reason |", "|---|---|---|---|"]
    for r in rows:
        reason = r["reason"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{r['model_type']}` | `{r['class']}` | {r['status']} | {reason[:300]} |")
    return "\n".join(lines)


def main(args) -> int:
    rows = table()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    for r in rows:
        print(f"{r['model_type']:32} {str(r['class']):48} {r['status']:12} {r['reason'][:160]}")
    c = counts(rows)
    print(f"# {c['verified_causal_lm']} of {c['causal_lm']} causal-LM types verified")
    print(f"# {c['verified']} of {len(rows)} classes with the image-text-to-text ones")
    return 0
