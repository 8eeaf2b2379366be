#!/usr/bin/env python3
"""Turn a GPU run's ``results.jsonl`` (bench/gpu/run_gpu.py) into ``bench/results/`` files.

    python3 bench/gpu/to_results.py PATH/results.jsonl [--dest bench/results]

Writes ``gpu-<device>-<date>-<commit>.json`` (the environment and every line, as measured)
and a ``.md`` of the same name: the environment header, then one table per stage with each
case's status, its main figures and what it left unmeasured. A case that did not run (failed,
timeout, skipped, planned) is listed with its reason and no figures.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# figures shown in the Markdown tables, per stage (all of them stay in the JSON)
SHOWN = {
    "kernels": ("backend", "max_abs_err", "loss_rel_err", "grad_max_abs_err", "ms",
                "ms_fwd_bwd", "torch_ms_fwd_bwd", "GBps", "GBps_of_min_bytes",
                "fraction_of_copy_4300", "TFLOPs"),
    "step": ("ms", "img_s", "peak_mem_GiB", "step_gflop_counted", "achieved_TFLOPs",
             "mfu_counted", "mfu_useful"),
    "vit_base": ("ms", "img_s", "peak_mem_GiB", "step_gflop_counted", "mfu_counted",
                 "mfu_useful"),
    "tests": ("passed", "failures", "errors", "skipped"),
    "mask_ext": ("exit_code", "passed", "failures", "errors", "skipped"),
}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def load(path: Path) -> list:
    lines = []
    for ln in path.read_text().splitlines():
        try:
            lines.append(json.loads(ln))
        except ValueError:  # a line cut by a killed stage
            continue
    return lines


def render(lines: list) -> tuple[str, dict]:
    env = next((ln["figures"] for ln in lines if ln["stage"] == "env" and ln["figures"]), {})
    dry = any(ln.get("dry_run") for ln in lines)
    md = ["# GPU run" + (" (CPU dry run: no GPU figure below is a measurement)" if dry else ""),
          ""]
    for key in ("gpu", "nvidia_smi", "capability", "torch", "torch_cuda", "triton", "python",
                "commit", "date"):
        md.append(f"- {key}: {env.get(key, 'unmeasured')}")
    md.append("")
    for stage in dict.fromkeys(ln["stage"] for ln in lines):
        if stage == "env":
            continue
        rows = [ln for ln in lines if ln["stage"] == stage]
        shown = SHOWN.get(stage, ())
        cols = [c for c in shown if any(c in r["figures"] for r in rows)]
        header = ["case", "status", *cols, "unmeasured / note"]
        md += [f"## {stage}", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for r in rows:
            note = ", ".join(r.get("unmeasured", []))
            if r["status"] != "ok":
                note = (r.get("error") or r.get("reason") or note or "")[:200].replace("|", "/")
                note = note.replace("\n", " ")
            cells = [r["case"], r["status"], *(_fmt(r["figures"].get(c, "")) for c in cols), note]
            md.append("| " + " | ".join(cells) + " |")
        md.append("")
    md.append("Timing: CUDA events, 2 warm-up runs, median of 10 (bench/gpu/run_gpu.py). "
              "MFU against 989 TFLOP/s dense bf16; bandwidth against 4.3 TB/s measured copy.")
    return "\n".join(md) + "\n", env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="results.jsonl written by run_gpu.py")
    p.add_argument("--dest", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    lines = load(args.results)
    if not lines:
        print(f"to_results.py: no result lines in {args.results}", file=sys.stderr)
        return 2
    md, env = render(lines)
    prefix = "gpu-dryrun" if any(ln.get("dry_run") for ln in lines) else "gpu"
    name = (f"{prefix}-{_slug(env.get('gpu', 'unknown'))}-{env.get('date', 'undated')}-"
            f"{env.get('commit', 'unknown')}")
    args.dest.mkdir(parents=True, exist_ok=True)
    (args.dest / f"{name}.json").write_text(json.dumps({"env": env, "results": lines},
                                                       indent=1) + "\n")
    (args.dest / f"{name}.md").write_text(md)
    print(f"to_results.py: wrote {args.dest / name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
