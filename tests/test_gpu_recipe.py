"""The GPU recipe scripts (bench/gpu/): what can be checked without a GPU.

prepare_wheels.sh packs wheels into one tar cut into carry folders; run.sh stash/join on the GPU
machine put them back together (checking the sha256). Here both run on small local wheels, with
parts of 1 MiB, and the unpacked wheels must be byte-identical to the originals; a missing or
damaged part must stop `join` with a message. The other stages are checked in --dry-run.
"""
import hashlib
import os
import shutil
import subprocess
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
    assert {"xformers", "nvidia-dali-cuda130", "mlxtend"} <= set(names)


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
    out = _sh("run.sh", "--dry-run", "stash", "install", "env", "tests", "bench-kernels",
              "bench-step", "bench-data", env={"OUT": str(tmp_path)}).stdout
    for needle in ("--target", "IBOT_FAST_REQUIRE_EXT=1", "-m gpu tests",
                   "bench/bench_loss.py -m gpu", "bench/bench_step.py -m gpu",
                   "bench/bench_data.py -m gpu", str(tmp_path / "bench-step.json")):
        assert needle in out, needle
    res = _sh("run.sh", "nonsense", check=False)
    assert res.returncode == 2 and "unknown stage" in res.stderr
    assert "python3 -m pip download" in _sh("prepare_wheels.sh", "--dry-run").stdout
