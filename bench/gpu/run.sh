#!/usr/bin/env bash
# GPU side of the recipe, run on a GPU machine in the repo root:
#
#   bash bench/gpu/run.sh [--dry-run] STAGE [STAGE ...]
#
# The first tier needs no wheels and is one command: `tier1` (= python3 bench/gpu/run_gpu.py,
# results appended to $OUT/results.jsonl case by case). Everything else is the optional second
# tier, for the packages a GPU machine lacks (xformers, DALI and what they need), carried as
# wheel parts over several calls. Stages (bench/gpu/README.md has the device calls):
#   tier1          bench/gpu/run_gpu.py: env, kernels, train step, gpu tests, CUDA mask
#                  extension, ViT-B, within IBOT_GPU_BUDGET_S (570 s)
#   stash          copy the carried wheel part(s) (.gpu_carry/p*) to $IBOT_GPU_WORK/parts, which
#                  stays while the machine is warm
#   join           once every part is there: join them, check the sha256, unpack the wheels
#   check-xformers say whether each joined xformers wheel was built for this torch + CUDA
#                  (exit code 1 when one was not)
#   install        join (if not done); check that the xformers wheel was built for this torch and
#                  CUDA (it is left out, with a message, when not); pip install the wheels
#                  (--no-deps) into $IBOT_GPU_WORK/site; build the mask extension in place
#                  (IBOT_FAST_REQUIRE_EXT=1: a failed CUDA build stops here). Nothing is
#                  installed from the tree: it runs from PYTHONPATH
#   env            GPU, driver, versions, commit and date -> $OUT/env.txt (for results headers)
#   tests          pytest -m gpu tests/           -> $OUT/gpu-tests.log, gpu-tests.xml
#   tier2          the tests that need the wheels (DALI, xformers) -> $OUT/tier2-tests.*
#   bench-kernels  bench_loss.py (-m gpu) and bench_masking.py -> $OUT/bench-*.json
#   bench-step     bench_step.py -m gpu           -> $OUT/bench-step.json
#   bench-data     bench_data.py, DALI GPU cases  -> $OUT/bench-data.json
# Each pytest stage runs under its own time limit (IBOT_GPU_STAGE_S, default 540 s) so that a
# device call (10 min at most) still returns its output; pytest-benchmark writes its JSON only
# when a stage ends, so the bench-* stages are for calls of their own. Results go to $OUT, the
# device tool's output folder ($ROOT/.gpu_out when unset).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
WORK=${IBOT_GPU_WORK:-/tmp/ibot_gpu}
CARRY=${IBOT_GPU_CARRY:-$ROOT/.gpu_carry}
OUT=${OUT:-$ROOT/.gpu_out}
STAGE_S=${IBOT_GPU_STAGE_S:-540}
PY=${PYTHON:-python3}
DRY=0
STAGES=()
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    tier1|stash|join|check-xformers|install|env|tests|tier2|bench-kernels|bench-step|bench-data) STAGES+=("$a") ;;
    *) echo "run.sh: unknown stage $a (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#STAGES[@]} -gt 0 ] || { echo "run.sh: name at least one stage (see --help)" >&2; exit 2; }

# what an earlier `install` left for this warm machine: the wheels' site folder on PYTHONPATH
[ -f "$WORK/env.sh" ] && . "$WORK/env.sh"
export PYTHONUNBUFFERED=1

run() {  # run "$@" (or print it with --dry-run)
  if [ "$DRY" = 1 ]; then echo "+ $*"; else "$@"; fi
}

pytest_stage() {  # NAME ARGS...: pytest under the stage limit, log kept in $OUT
  local name=$1; shift
  run mkdir -p "$OUT"
  if [ "$DRY" = 1 ]; then echo "+ timeout $STAGE_S $PY -m pytest $* | tee $OUT/$name.log"; return; fi
  set +e
  timeout "$STAGE_S" "$PY" -m pytest -p no:cacheprovider "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  set -e
  echo "run.sh: $name finished with exit code $rc"
  return 0  # a failing test is a result to bring back, not a reason to skip later stages
}

stage_stash() {
  if [ "$DRY" = 1 ]; then echo "+ cp $CARRY/p*/{wheels.tar.*,MANIFEST} $WORK/parts/"; return; fi
  shopt -s nullglob
  local parts=("$CARRY"/p*/wheels.tar.*)
  [ ${#parts[@]} -gt 0 ] || { echo "run.sh stash: no carried parts under $CARRY" >&2; exit 1; }
  mkdir -p "$WORK/parts"
  for f in "${parts[@]}"; do cp "$f" "$WORK/parts/"; done
  for m in "$CARRY"/p*/MANIFEST; do cp "$m" "$WORK/parts/MANIFEST"; break; done
  echo "run.sh stash: $(ls "$WORK/parts" | grep -c wheels.tar) part(s) in $WORK/parts"
}

stage_join() {
  if [ "$DRY" = 1 ]; then
    echo "+ cat $WORK/parts/wheels.tar.* (all MANIFEST parts) | check sha256 | tar -x -C $WORK/wheels"
    return
  fi
  if [ -f "$WORK/wheels/.joined" ]; then echo "run.sh join: already done"; return; fi
  local manifest="$WORK/parts/MANIFEST"
  [ -f "$manifest" ] || { echo "run.sh join: no $manifest: stash the carried parts first" >&2; exit 1; }
  local want_sha n have
  want_sha=$(awk '$1 == "sha256" {print $2}' "$manifest")
  n=$(awk '$1 == "parts" {print $2}' "$manifest")
  have=$(ls "$WORK/parts" | grep -c '^wheels\.tar\.' || true)
  if [ "$have" != "$n" ]; then
    echo "run.sh join: $have of $n parts stashed; carry the others (bash bench/gpu/run.sh stash)" >&2
    exit 1
  fi
  cat $(ls "$WORK"/parts/wheels.tar.* | sort) > "$WORK/wheels.tar"
  local sha
  sha=$(sha256sum "$WORK/wheels.tar" | cut -d' ' -f1)
  if [ "$sha" != "$want_sha" ]; then
    echo "run.sh join: sha256 $sha != $want_sha: a part is damaged or from another prepare run" >&2
    exit 1
  fi
  rm -rf "$WORK/wheels" && mkdir -p "$WORK/wheels"
  tar -C "$WORK/wheels" -xf "$WORK/wheels.tar"
  rm -f "$WORK/wheels.tar"
  touch "$WORK/wheels/.joined"
  echo "run.sh join: $(ls "$WORK"/wheels/*.whl | wc -l) wheels in $WORK/wheels"
}

xformers_matches() {  # WHEEL: 0 when the wheel's C++ ops were built for this torch + CUDA
  "$PY" - "$1" <<'PYEOF'
import json, sys, zipfile
import torch
with zipfile.ZipFile(sys.argv[1]) as z:
    names = [n for n in z.namelist() if n.endswith("xformers/cpp_lib.json")]
    if not names:
        print("xformers wheel: no cpp_lib.json (a pure-Python build): nothing to check")
        sys.exit(0)
    info = json.loads(z.read(names[0]))["version"]
cuda = info.get("cuda")
built_cuda = f"{cuda // 100}.{cuda % 100}" if isinstance(cuda, int) else str(cuda)
here = (torch.__version__.split("+")[0].rsplit(".", 1)[0], (torch.version.cuda or "").split(".")[0])
built = (str(info.get("torch", "")).split("+")[0].rsplit(".", 1)[0], built_cuda.split(".")[0])
print(f"xformers wheel built for torch {info.get('torch')} with CUDA {built_cuda}; this is "
      f"torch {torch.__version__} with CUDA {torch.version.cuda}")
sys.exit(0 if built == here else 1)
PYEOF
}

stage_check_xformers() {
  [ "$DRY" = 1 ] && { echo "+ check each xformers-*.whl's cpp_lib.json against torch"; return; }
  shopt -s nullglob
  local w rc=0
  for w in "$WORK"/wheels/xformers-*.whl; do xformers_matches "$w" || rc=1; done
  return $rc
}

stage_install() {
  stage_join
  local wheels=() w
  if [ "$DRY" = 1 ]; then
    echo "+ check each xformers-*.whl's cpp_lib.json against torch (skip it when it differs)"
    wheels=("$WORK/wheels/*.whl")
  else
    for w in "$WORK"/wheels/*.whl; do
      case "$(basename "$w")" in
        xformers-*)
          if ! xformers_matches "$w"; then
            echo "run.sh install: skipping $(basename "$w"): built for another torch/CUDA;" \
                 "the xformers tests will skip (carry a wheel built for this torch)"
            continue
          fi ;;
      esac
      wheels+=("$w")
    done
  fi
  run "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" "${wheels[@]}"
  if [ "$DRY" = 0 ]; then
    printf 'export PYTHONPATH=%s:%s${PYTHONPATH:+:$PYTHONPATH}\n' "$ROOT" "$WORK/site" \
      > "$WORK/env.sh"
    . "$WORK/env.sh"
  fi
  # the CUDA mask extension, in place (torch there has CUDA); the tree runs from PYTHONPATH
  run env IBOT_FAST_REQUIRE_EXT=1 "$PY" setup.py build_ext --inplace
  run "$PY" -c "import torch, ibot_fast.masking as m; \
print('ibot_fast from the tree; torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'cuda masks', m.extension_available(cuda=True))"
}

stage_env() {
  run mkdir -p "$OUT"
  [ "$DRY" = 1 ] && { echo "+ nvidia-smi, versions, commit, date > $OUT/env.txt"; return; }
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    # the device gets a copy of the working tree without .git: pass IBOT_GPU_COMMIT there
    echo "commit: ${IBOT_GPU_COMMIT:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader \
      2>/dev/null | sed 's/^/gpu: /' || echo "gpu: nvidia-smi not found"
    "$PY" - <<'PYEOF'
import importlib, platform
print("python:", platform.python_version())
for name in ("torch", "triton", "xformers", "nvidia.dali", "numpy", "pytest_benchmark"):
    try:
        mod = importlib.import_module(name)
        print(f"{name}:", getattr(mod, "__version__", "?"))
    except Exception as err:  # noqa: BLE001 -- record why, do not stop
        print(f"{name}: not importable ({type(err).__name__}: {err})")
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs")
PYEOF
  } | tee "$OUT/env.txt"
}

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

for s in "${STAGES[@]}"; do
  echo "run.sh: === $s ==="
  case "$s" in
    stash) stage_stash ;;
    join) stage_join ;;
    check-xformers) stage_check_xformers ;;
    install) stage_install ;;
    env) stage_env ;;
    tier1)
      run mkdir -p "$OUT"
      run timeout $(( ${IBOT_GPU_BUDGET_S:-570} + 20 )) "$PY" bench/gpu/run_gpu.py \
        --out "$OUT" --budget-s "${IBOT_GPU_BUDGET_S:-570}" ;;
    tests) pytest_stage gpu-tests -m gpu tests -q -rs --junitxml "$OUT/gpu-tests.xml" ;;
    tier2) pytest_stage tier2-tests -m gpu tests/test_dali.py tests/test_packed.py \
        -k "dali or xformers" -q -rs --junitxml "$OUT/tier2-tests.xml" ;;
    bench-kernels)
      pytest_stage bench-loss bench/bench_loss.py -m gpu --benchmark-only -q \
        --benchmark-json "$OUT/bench-loss.json"
      pytest_stage bench-masking bench/bench_masking.py --benchmark-only -q \
        --benchmark-json "$OUT/bench-masking.json" ;;
    bench-step) pytest_stage bench-step bench/bench_step.py -m gpu --benchmark-only -q \
        --benchmark-json "$OUT/bench-step.json" ;;
    bench-data) pytest_stage bench-data bench/bench_data.py -m gpu --benchmark-only -q \
        --benchmark-json "$OUT/bench-data.json" ;;
  esac
done
