"""The GPU recipe scripts (bench/gpu/): what can be checked without a GPU.

run_gpu.py (the one-command first tier) runs its whole plan on the CPU in --dry-run and must
write the JSON-lines contract; its stage plan must fit one device command (9.5 minutes), and a
stage stopped at its cap must keep the lines of the stages before it. prepare_wheels.sh packs
wheels into one tar cut into carry folders; run.sh stash/join on the GPU machine put them back
together (checking the sha256). Here both run on small local wheels, with parts of 1 MiB, and
the unpacked wheels must be byte-identical to the originals; a missing or damaged part must stop
`join` with a message. The other stages are checked in --dry-run.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "bench" / "gpu"


def _sh(script, *args, env=None, check=True):
    res = subprocess.run(["bash", str(GPU / script), *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=120)
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


def _fake_wheels(folder: Path) -> dict:
    """Three wheel-shaped zips, one of ~2.5 MiB of incompressible bytes (so it spans parts)."""
    folder.mkdir()
    rng = __import__("random").Random(0)
    digests = {}
    for name, size in (("alpha-1.0-py3-none-any.whl", 2_600_000),
                       ("beta-2.0-py3-none-any.whl", 300_000), ("gamma-0.1-py3-none-any.whl", 10)):
        with zipfile.ZipFile(folder / name, "w", zipfile.ZIP_STORED) as z:
            z.writestr("payload.bin", bytes(rng.getrandbits(8) for _ in range(size)))
        digests[name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    return digests


def test_scripts_parse():
    for script in ("prepare_wheels.sh", "run.sh"):
        subprocess.run(["bash", "-n", str(GPU / script)], check=True)


def test_wheel_list_pins_every_package_once():
    lines = [ln.split("#")[0].strip() for ln in (GPU / "wheels.txt").read_text().splitlines()]
    pins = [ln for ln in lines if ln]
    assert all("==" in p for p in pins), pins  # --no-deps install: exact versions only
    names = [p.split("==")[0].lower() for p in pins]
    assert len(names) == len(set(names))
    assert {"xformers", "nvidia-dali-cuda130", "mlxtend", "six"} <= set(names)


def test_prepare_stash_join_round_trip(tmp_path):
    digests = _fake_wheels(tmp_path / "src")
    carry, work = tmp_path / "carry", tmp_path / "work"
    env = {"IBOT_GPU_CARRY": str(carry), "IBOT_GPU_WORK": str(work), "IBOT_GPU_PART_MB": "1"}
    _sh("prepare_wheels.sh", "--from", str(tmp_path / "src"), env=env)
    parts = sorted(carry.glob("p*"))
    assert len(parts) == 3  # 2.9 MB of stored zips in 1 MiB parts
    for p in parts:  # one part per carry folder, each with the manifest
        assert len(list(p.glob("wheels.tar.*"))) == 1 and (p / "MANIFEST").is_file()
        assert sum(f.stat().st_size for f in p.iterdir()) <= 1_100_000

    # the device calls: one folder carried per call, stashed; join refuses until all are there
    for k, p in enumerate(parts):
        one = tmp_path / f"call{k}"
        shutil.copytree(p, one / p.name)
        _sh("run.sh", "stash", env={**env, "IBOT_GPU_CARRY": str(one)})
        if k < len(parts) - 1:
            res = _sh("run.sh", "join", env=env, check=False)
            assert res.returncode != 0 and f"{k + 1} of 3 parts stashed" in res.stderr
    _sh("run.sh", "join", env=env)
    got = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in (work / "wheels").glob("*.whl")}
    assert got == digests
    assert "already done" in _sh("run.sh", "join", env=env).stdout


def test_join_rejects_a_damaged_part(tmp_path):
    _fake_wheels(tmp_path / "src")
    carry, work = tmp_path / "carry", tmp_path / "work"
    env = {"IBOT_GPU_CARRY": str(carry), "IBOT_GPU_WORK": str(work), "IBOT_GPU_PART_MB": "1"}
    _sh("prepare_wheels.sh", "--from", str(tmp_path / "src"), env=env)
    _sh("run.sh", "stash", env=env)
    part = sorted((work / "parts").glob("wheels.tar.*"))[1]
    data = bytearray(part.read_bytes())
    data[100] ^= 1
    part.write_bytes(bytes(data))
    res = _sh("run.sh", "join", env=env, check=False)
    assert res.returncode != 0 and "sha256" in res.stderr
    assert not (work / "wheels").exists()


def test_dry_run_lists_the_stages(tmp_path):
    out = _sh("run.sh", "--dry-run", "tier1", "stash", "install", "env", "tests", "tier2",
              "bench-kernels", "bench-step", "bench-data", env={"OUT": str(tmp_path)}).stdout
    for needle in ("--target", "IBOT_FAST_REQUIRE_EXT=1", "-m gpu tests",
                   "bench/bench_loss.py -m gpu", "bench/bench_step.py -m gpu",
                   "bench/bench_data.py -m gpu", str(tmp_path / "bench-step.json"),
                   "bench/gpu/run_gpu.py", "setup.py build_ext --inplace", "cpp_lib.json",
                   "tests/test_dali.py"):
        assert needle in out, needle
    assert "pip install -q --no-index --no-deps --no-build-isolation -e" not in out
    res = _sh("run.sh", "nonsense", check=False)
    assert res.returncode == 2 and "unknown stage" in res.stderr
    assert "python3 -m pip download" in _sh("prepare_wheels.sh", "--dry-run").stdout


def _fake_xformers_wheel(folder: Path, torch_version: str, cuda: int) -> Path:
    folder.mkdir(parents=True)
    wheel = folder / "xformers-0.0.35-cp39-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("xformers/cpp_lib.json",
                   json.dumps({"version": {"torch": torch_version, "cuda": cuda}}))
    return wheel


def test_check_xformers_names_the_build_of_a_mismatched_wheel(tmp_path):
    """A wheel built for torch 2.10 + CUDA 12.8 is reported (and install leaves it out)."""
    _fake_xformers_wheel(tmp_path / "wheels", "2.10.0+cu128", 1208)
    res = _sh("run.sh", "check-xformers", env={"IBOT_GPU_WORK": str(tmp_path)}, check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "built for torch 2.10.0+cu128 with CUDA 12.8" in res.stdout


# ---------------------------------------------------------------- run_gpu.py, the first tier
RUN_GPU = GPU / "run_gpu.py"


def _run_gpu(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(RUN_GPU), *args], capture_output=True, text=True,
                         env=env, timeout=timeout, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_gpu_plan_fits_one_device_command():
    plan = json.loads(_run_gpu("--plan").stdout)
    estimates = [s["estimated_s"] for s in plan["stages"]]
    assert sum(estimates) == plan["estimated_total_s"] <= plan["budget_s"] <= 9.5 * 60
    names = [s["stage"] for s in plan["stages"]]
    assert names == ["env", "kernels", "step", "tests", "mask_ext", "vit_base"]


def test_gpu_dry_run_writes_the_json_lines_contract(tmp_path):
    """The whole plan on the CPU (tiny shapes; the torch stages in child processes, as on the
    GPU). vit_base is capped below its start-up time: its cases must come back as `timeout`
    while every earlier line stays. ~20 s on 2 idle cores: the only run of the GPU script in CI."""
    _run_gpu("--dry-run", "--out", str(tmp_path), "--isolate", "true", "--cap", "vit_base=0.2")
    lines = [json.loads(ln) for ln in (tmp_path / "results.jsonl").read_text().splitlines()]
    plan = json.loads(_run_gpu("--plan").stdout)
    want = [(s["stage"], c) for s in plan["stages"] for c in s["cases"]]
    assert [(ln["stage"], ln["case"]) for ln in lines] == want
    for ln in lines:
        assert {"stage", "case", "status", "figures", "unmeasured", "wall_s", "time",
                "dry_run"} <= ln.keys(), ln
        assert ln["dry_run"] is True and isinstance(ln["figures"], dict)
        assert isinstance(ln["unmeasured"], list)
    status = {(ln["stage"], ln["case"]): ln["status"] for ln in lines}
    by_stage = {}
    for (stage, _), st in status.items():
        by_stage.setdefault(stage, set()).add(st)
    assert by_stage["env"] == by_stage["kernels"] == by_stage["step"] == {"ok"}, lines
    assert by_stage["tests"] == by_stage["mask_ext"] == {"planned"}
    assert by_stage["vit_base"] == {"timeout"}
    step = {ln["case"]: ln for ln in lines if ln["stage"] == "step"}
    for ln in step.values():
        assert ln["figures"]["ms"] > 0 and ln["figures"]["step_gflop_counted"] > 0
        assert "peak_mem_GiB" in ln["unmeasured"]  # no GPU here: named, not faked
    kernel = {ln["case"]: ln["figures"] for ln in lines if ln["stage"] == "kernels"}
    assert kernel["soft_ce_linear-bf16-patch"]["loss_rel_err"] < 1e-2
    assert kernel["ema-fp32"]["max_abs_err"] < 1e-5

    # and the results files made from it
    dest = tmp_path / "results"
    subprocess.run([sys.executable, str(GPU / "to_results.py"), str(tmp_path / "results.jsonl"),
                    "--dest", str(dest)], check=True, capture_output=True, timeout=60)
    (md,) = dest.glob("gpu-dryrun-*.md")
    (js,) = dest.glob("gpu-dryrun-*.json")
    text = md.read_text()
    assert "CPU dry run" in text and "| vit_small-fast | ok |" in text
    assert len(json.loads(js.read_text())["results"]) == len(lines)
