"""Training curves of a run as one PNG: loss terms, the teacher's k-NN accuracy, learning rate /
weight decay and the teacher temperatures, against the iteration.

Reads ``steps.jsonl`` (one record every ``--log_freq`` steps); ``args.json`` for the temperatures
and for ln K, the [CLS] loss of a head whose outputs are uniform (the collapse the demo must stay
away from); ``knn.jsonl`` (``--knn_every``) for the teacher's k-NN top-1 at the end of each
evaluated epoch, and ``knn.json`` (``--knn_eval``) for the random-init network's, drawn as a
dashed level to beat. The temperatures are per-epoch schedules, recomputed here with the loss's
own ``teacher_temp_schedule`` so runs logged before this plot existed get them too.
"""
from __future__ import annotations

import json
import math
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


def knn_curve(output_dir: str, recs: list[dict]) -> dict | None:
    """The teacher's k-NN top-1 per evaluated epoch, placed at that epoch's last logged
    iteration: {"it": [...], "top1": {k: [...]}, "random": {k: top1}}; None without knn.jsonl
    records. ``random`` holds the random-init network of ``knn.json`` when the run wrote one."""
    path = os.path.join(output_dir, "knn.jsonl")
    if not os.path.isfile(path):
        return None
    evals = _read_jsonl(path)
    last_it: dict[int, int] = {}
    for r in recs:
        last_it[r["epoch"]] = max(r["it"], last_it.get(r["epoch"], r["it"]))
    evals = [e for e in evals if e["epoch"] in last_it and e.get("knn")]
    if not evals:
        return None
    ks = [k for k in ("10", "20") if k in evals[0]["knn"]] or list(evals[0]["knn"])
    curve = {"it": [last_it[e["epoch"]] for e in evals],
             "top1": {k: [e["knn"][k]["top1"] for e in evals] for k in ks}, "random": {}}
    final = os.path.join(output_dir, "knn.json")
    if os.path.isfile(final):
        with open(final) as f:
            random_init = json.load(f).get("results", {}).get("random init", {})
        curve["random"] = {k: random_init[k]["top1"] for k in ks if k in random_init}
    return curve


def plot_training_curves(output_dir: str, filename: str = "loss_curve.png") -> str | None:
    """Write ``output_dir/filename``; returns its path, or None when there is nothing to plot."""
    path = os.path.join(output_dir, "steps.jsonl")
    if not os.path.isfile(path):
        return None
    recs = _read_jsonl(path)
    if not recs:
        return None
    temps, out_dim = None, None
    args_path = os.path.join(output_dir, "args.json")
    if os.path.isfile(args_path):
        with open(args_path) as f:
            run_args = json.load(f)
        temps = teacher_temperatures(run_args)
        out_dim = run_args.get("out_dim")
    knn = knn_curve(output_dir, recs)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [r["it"] for r in recs]
    panels = 2 + bool(temps) + bool(knn)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), dpi=120)
    panel_axes = list(axes)
    axes = list(axes)
    ax = axes.pop(0)
    for key in ("loss", "cls", "patch"):
        if key in recs[0]:
            ax.plot(it, [r[key] for r in recs], label=key)
    if out_dim and "cls" in recs[0]:
        ax.axhline(math.log(out_dim), color="C1", ls=":", lw=1,
                   label=f"ln K = {math.log(out_dim):.2f} (uniform [CLS])")
    ax.set(xlabel="iteration", ylabel="loss", title="iBOT loss")
    ax.legend(fontsize="small")
    loss_ax = ax
    if knn:
        ax = axes.pop(0)
        for i, (k, top1) in enumerate(knn["top1"].items()):
            ax.plot(knn["it"], top1, marker="o", color=f"C{i}", label=f"teacher, k={k}")
            if k in knn["random"]:
                ax.axhline(knn["random"][k], color=f"C{i}", ls="--", lw=1,
                           label=f"random init, k={k}")
        ax.set(xlabel="iteration (end of epoch)", ylabel="k-NN top-1 (%)",
               title="teacher k-NN on the held-out split", xlim=loss_ax.get_xlim())
        ax.legend(fontsize="small")
    ax = axes.pop(0)
    ax.plot(it, [r["lr"] for r in recs], color="C3", label="lr")
    ax.set(xlabel="iteration", ylabel="learning rate", title="learning rate / weight decay")
    if "wd" in recs[0]:
        ax2 = ax.twinx()
        ax2.plot(it, [r["wd"] for r in recs], color="C4", ls="--", label="weight decay")
        ax2.set_ylabel("weight decay")
        ax.legend(handles=ax.get_lines() + ax2.get_lines(), loc="best")
    if temps:
        ax = axes.pop(0)
        cls_t, patch_t = temps
        ep = [min(r["epoch"], len(cls_t) - 1) for r in recs]
        ax.plot(it, [cls_t[e] for e in ep], label="[CLS] teacher", drawstyle="steps-post")
        ax.plot(it, [patch_t[e] for e in ep], label="patch teacher", ls="--",
                drawstyle="steps-post")
        ax.set(xlabel="iteration", ylabel="temperature", title="teacher temperature")
        ax.legend()
    for ax in panel_axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = os.path.join(output_dir, filename)
    fig.savefig(out)
    plt.close(fig)
    return out
