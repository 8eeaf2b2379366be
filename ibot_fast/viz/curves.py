"""Training curves of a run as one PNG: loss terms, learning rate / weight decay and the teacher
temperatures, against the iteration.

Reads ``steps.jsonl`` (one record every ``--log_freq`` steps) and, for the temperatures,
``args.json``: they are per-epoch schedules (reference-semantics.md §2.1), recomputed here with
the loss's own ``teacher_temp_schedule`` so runs logged before this plot existed get them too.
"""
from __future__ import annotations

import json
import os

from ibot_fast.schedules import teacher_temp_schedule


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def teacher_temperatures(args: dict) -> tuple[list[float], list[float]] | None:
    """Per-epoch ([CLS], patch) teacher temperatures of a run's args, None if they lack a key."""
    try:
        n, w = int(args["epochs"]), int(args["warmup_teacher_temp_epochs"])
        cls = teacher_temp_schedule(args["warmup_teacher_temp"], args["teacher_temp"], w, n)
        patch = teacher_temp_schedule(args["warmup_teacher_patch_temp"],
                                      args["teacher_patch_temp"], w, n,
                                      start_epoch=int(args.get("pred_start_epoch", 0)))
    except (KeyError, TypeError, ValueError):
        return None
    return cls.tolist(), patch.tolist()


def plot_training_curves(output_dir: str, filename: str = "loss_curve.png") -> str | None:
    """Write ``output_dir/filename``; returns its path, or None when there is nothing to plot."""
    path = os.path.join(output_dir, "steps.jsonl")
    if not os.path.isfile(path):
        return None
    recs = _read_jsonl(path)
    if not recs:
        return None
    temps = None
    args_path = os.path.join(output_dir, "args.json")
    if os.path.isfile(args_path):
        with open(args_path) as f:
            temps = teacher_temperatures(json.load(f))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [r["it"] for r in recs]
    panels = 3 if temps else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), dpi=120)
    ax = axes[0]
    for key in ("loss", "cls", "patch"):
        if key in recs[0]:
            ax.plot(it, [r[key] for r in recs], label=key)
    ax.set(xlabel="iteration", ylabel="loss", title="iBOT loss")
    ax.legend()
    ax = axes[1]
    ax.plot(it, [r["lr"] for r in recs], color="C3", label="lr")
    ax.set(xlabel="iteration", ylabel="learning rate", title="learning rate / weight decay")
    if "wd" in recs[0]:
        ax2 = ax.twinx()
        ax2.plot(it, [r["wd"] for r in recs], color="C4", ls="--", label="weight decay")
        ax2.set_ylabel("weight decay")
        ax.legend(handles=ax.get_lines() + ax2.get_lines(), loc="best")
    if temps:
        ax = axes[2]
        cls_t, patch_t = temps
        ep = [min(r["epoch"], len(cls_t) - 1) for r in recs]
        ax.plot(it, [cls_t[e] for e in ep], label="[CLS] teacher", drawstyle="steps-post")
        ax.plot(it, [patch_t[e] for e in ep], label="patch teacher", ls="--",
                drawstyle="steps-post")
        ax.set(xlabel="iteration", ylabel="temperature", title="teacher temperature")
        ax.legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = os.path.join(output_dir, filename)
    fig.savefig(out)
    plt.close(fig)
    return out
