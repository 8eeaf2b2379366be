"""The Triton kernels of ``kernels/`` as the H200 (sm_90) compiles them, without a GPU; and the
package's place at the bottom of the import graph.

Every ``@triton.jit`` kernel is compiled ahead of time for ``GPUTarget("cuda", 90, 32)`` with
the launch parameters its wrapper's own selection function picks at the iBOT shapes (K = 8192,
D = 256, ~7,500 masked patch rows with one partner, ~768 [CLS] rows with two; bf16 / fp16 /
fp32 inputs; the EMA over a ViT-S teacher with its heads, ~22 M parameters, with and without
the bf16 copy). Checked: it compiles, the shared memory a launch needs (``metadata.shared``)
fits the H200's 232,448 B per block, and Triton's bundled ``ptxas -v`` reports no register
spills. The interpreter tests cannot see any of this: they run at tiny shapes, on the CPU.

The CPU test session sets ``TRITON_INTERPRET=1`` before triton is imported (``conftest.py``),
which would turn every kernel into an interpreter object. So the compiles run in one
subprocess without that variable (this file run as a script), which writes the figures as
JSON. Figures are cached in pytest's cache directory, keyed by the kernel sources, the case
and the Triton version: a run with unchanged kernels compiles nothing.
"""
import ast
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
KERNELS_DIR = REPO / "kernels"
SHARED_LIMIT = 232_448  # H200 (sm_90): the most shared memory one block may opt into, bytes

# (op, M rows, K, D, P, input dtype); "ema": M = parameters, K = 1 with the bf16 copy, else 0
K_HEAD, D_BOTTLENECK, M_PATCH, M_CLS, N_EMA = 8192, 256, 7_500, 768, 22_000_000
# soft_ce_linear on fp32 inputs takes the torch back end on CUDA (test below): no compile
CASES = [(op, M, K_HEAD, D_BOTTLENECK, P, dt)
         for op in ("soft_ce", "soft_ce_linear_fwd", "soft_ce_linear_dw")
         for M, P in ((M_PATCH, 1), (M_CLS, 2))
         for dt in ("bfloat16", "float16", "float32")
         if not (op.startswith("soft_ce_linear") and dt == "float32")] + \
        [("ema", N_EMA, bf16_copy, 0, 0, "float32") for bf16_copy in (1, 0)]


def case_id(case):
    op, M, K, D, P, dt = case
    if op == "ema":
        return f"ema-{'bf16copy' if K else 'nocopy'}"
    return f"{op}-M{M}-P{P}-{dt}"


# ---- kernels/ imports nothing from ibot_fast --------------------------------------------------
def _imported_modules(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module or ""


def test_kernels_import_nothing_from_ibot_fast():
    files = sorted(KERNELS_DIR.glob("*.py"))
    assert {"__init__.py", "soft_ce.py", "soft_ce_triton.py", "ema_triton.py"} <= \
        {f.name for f in files}
    upward = {f.name: m for f in files for m in _imported_modules(f)
              if m == "ibot_fast" or m.startswith("ibot_fast.")}
    assert not upward, f"kernels/ must stay at the bottom of the import graph: {upward}"


def test_package_attribute_is_the_function_not_the_submodule():
    import ibot_fast.fused_loss as fl
    import ibot_fast.kernels
    from ibot_fast.kernels import soft_ce, soft_ce_linear, teacher_col_sum
    from ibot_fast.kernels.soft_ce import soft_ce as op  # loads the submodule (already loaded)
    module = sys.modules["ibot_fast.kernels.soft_ce"]
    assert callable(ibot_fast.kernels.soft_ce) and ibot_fast.kernels.soft_ce is op is soft_ce
    assert module.soft_ce is soft_ce and module.soft_ce_linear is soft_ce_linear
    assert (fl.soft_ce, fl.soft_ce_linear, fl.teacher_col_sum) == \
        (soft_ce, soft_ce_linear, teacher_col_sum)


# ---- the compile worker (runs in a subprocess, without TRITON_INTERPRET) ------------------------
def _launches(case):
    """[(kernel, {arg: sample}, constexprs, num_warps, num_stages)] the wrapper would launch.
    A sample is ("*", dtype name) for a pointer, an int, or "fp32" for a float."""
    import torch
    from ibot_fast.kernels import ema_triton, soft_ce_triton as st
    op, M, K, D, P, dt = case
    if op == "ema":
        cfg = ema_triton.ema_config(M)
        args = dict(t_ptr=("*", "fp32"), s_ptr=("*", "fp32"), t16_ptr=("*", "i16"),
                    w_ptr=("*", "fp32"), n=M)
        return [(ema_triton._ema_kernel, args, dict(BLOCK=cfg["block"], WRITE_BF16=bool(K),
                                                     HIGH_WEIGHT=False),
                 cfg["num_warps"], None)]
    tri = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    if op == "soft_ce":
        cfg = st.soft_ce_fwd_config(K, P)
        t = tri[dt]
        args = dict(s_ptr=("*", t), s_row_stride=K, t_ptr=("*", t), t_row_stride=K,
                    partner_ptr=("*", "i64"), weight_ptr=("*", "fp32"), c_ptr=("*", "fp32"),
                    g_ptr=("*", t), g_row_stride=K, loss_ptr=("*", "fp32"), K=K,
                    tau_s_ptr=("*", "fp32"), tau_t_ptr=("*", "fp32"))
        return [(st._soft_ce_fwd_kernel, args,
                 dict(P=P, P_PAD=1 << (P - 1).bit_length(), BLOCK_K=cfg["block_k"]),
                 cfg["num_warps"], None)]
    # the iBOT step under bf16 autocast: bf16 bottleneck rows, the fp32 weight-normed weight
    z, w = torch.empty(0, dtype=getattr(torch, dt)), torch.empty(0, dtype=torch.float32)
    cfgs = st.soft_ce_linear_config(M, K, D, P, st.linear_tile_dtype(z, w, z, w))
    t = tri[str(cfgs["tile_dtype"]).replace("torch.", "")]
    common = dict(zs_ptr=("*", t), zs_row_stride=D, ws_ptr=("*", t), ws_row_stride=D,
                  zt_ptr=("*", t), zt_row_stride=D, wt_ptr=("*", t), wt_row_stride=D,
                  partner_ptr=("*", "i64"), weight_ptr=("*", "fp32"), c_ptr=("*", "fp32"))
    scalars = dict(M=M, K=K, D=D, tau_s_ptr=("*", "fp32"), tau_t_ptr=("*", "fp32"))
    if op == "soft_ce_linear_fwd":
        kernel, cfg = st._soft_ce_linear_fwd_kernel, cfgs["fwd"]
        outs = dict(dzs_ptr=("*", "fp32"), loss_ptr=("*", "fp32"), lse_s_ptr=("*", "fp32"),
                    lse_t_ptr=("*", "fp32"))
    else:
        kernel, cfg = st._soft_ce_linear_dw_kernel, cfgs["dw"]
        outs = dict(lse_s_ptr=("*", "fp32"), lse_t_ptr=("*", "fp32"), dws_ptr=("*", "fp32"))
    const = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    return [(kernel, {**common, **outs, **scalars}, dict(P=P, **const), cfg["num_warps"],
             cfg["num_stages"])]


def _ptxas():
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(90).path
    except (ImportError, TypeError, AttributeError):
        from triton import knobs
        return knobs.nvidia.ptxas.path


def _signature(kernel, args, const):
    """Signature and attributes as the JIT launcher specialises them: pointers and ints that
    are multiples of 16 get the 16-divisibility attribute."""
    names = kernel.arg_names
    sig, attrs = {}, {}
    for name in names:
        if name in const:
            sig[name] = "constexpr"
            continue
        v = args[name]
        if isinstance(v, tuple):
            sig[name] = "*" + v[1]
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
        elif v == "fp32":
            sig[name] = "fp32"
        else:
            sig[name] = "i32" if v < 2 ** 31 else "i64"
            if v % 16 == 0:
                attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    return sig, attrs


def _compile(kernel, sig, attrs, const, num_warps, num_stages, workdir):
    """Compile for sm_90; shared memory from the metadata, registers and spills from
    ``ptxas -v`` on the PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    opts = dict(num_warps=num_warps)
    if num_stages is not None:
        opts["num_stages"] = num_stages
    t0 = time.time()
    compiled = triton.compile(ASTSource(kernel, sig, const, attrs),
                              target=GPUTarget("cuda", 90, 32), options=opts)
    ptx = pathlib.Path(workdir) / f"{kernel.__name__}.ptx"
    ptx.write_text(compiled.asm["ptx"])
    log = subprocess.run([_ptxas(), "-v", "--gpu-name=sm_90a", str(ptx), "-o",
                          str(ptx.with_suffix(".o"))], capture_output=True, text=True,
                         check=True).stderr
    num = lambda pattern: int(re.search(pattern, log).group(1))  # noqa: E731
    return dict(kernel=kernel.__name__, shared=int(compiled.metadata.shared),
                registers=num(r"Used (\d+) registers"),
                spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"),
                num_warps=num_warps, num_stages=num_stages, constexprs=dict(const),
                seconds=round(time.time() - t0, 1))


def _worker(cache_dir: str, out_json: str):
    """Compile every case's launches (each distinct launch once: the linear kernels see fp32
    tiles for every input dtype) and write ``{case id: {"kernels": [figures]}}``."""
    import tempfile
    import triton
    sources = b"".join((KERNELS_DIR / f).read_bytes()
                       for f in ("soft_ce_triton.py", "ema_triton.py"))
    results = {}
    for case in CASES:
        figs = []
        try:
            for kernel, args, const, num_warps, num_stages in _launches(case):
                sig, attrs = _signature(kernel, args, const)
                key = hashlib.sha256(sources + repr((
                    triton.__version__, kernel.__name__, sorted(sig.items()),
                    sorted(attrs.items()), sorted(const.items()), num_warps,
                    num_stages)).encode()).hexdigest()[:32]
                cached = pathlib.Path(cache_dir) / f"{kernel.__name__}-{key}.json"
                if not cached.exists():
                    with tempfile.TemporaryDirectory() as tmp:
                        fig = _compile(kernel, sig, attrs, const, num_warps, num_stages, tmp)
                    cached.write_text(json.dumps(fig))
                figs.append(json.loads(cached.read_text()))
            results[case_id(case)] = dict(kernels=figs)
        except Exception as e:  # reported per case by the tests
            results[case_id(case)] = dict(error=f"{type(e).__name__}: {e}"[:4000])
    pathlib.Path(out_json).write_text(json.dumps(results, indent=1))


def _nvidia_backend_missing():
    try:
        import triton  # noqa: F401  (under the interpreter here: only its files are needed)
        from triton.backends.nvidia import compiler  # noqa: F401
        path = _ptxas()
    except Exception as e:  # pragma: no cover - depends on the install
        return f"Triton's NVIDIA back end is not installed ({type(e).__name__}: {e})"
    if not path or not os.path.exists(path):  # pragma: no cover
        return f"Triton's bundled ptxas is missing ({path})"
    return None


@pytest.fixture(scope="module")
def sm90_figures(pytestconfig, tmp_path_factory):
    reason = _nvidia_backend_missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("sm90") / "figures.json"
    cache = getattr(pytestconfig, "cache", None)  # absent under -p no:cacheprovider
    cache_dir = cache.mkdir("kernels_sm90") if cache is not None else out.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default, stated (no warning)
    t0 = time.time()
    proc = subprocess.run([sys.executable, __file__, str(cache_dir), str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"sm_90 compile worker failed:\n{proc.stderr[-4000:]}"
    figures = json.loads(out.read_text())
    print(f"sm_90 compiles: {time.time() - t0:.1f} s")
    return figures


@pytest.mark.slow  # the first run compiles ~16 kernels (about a minute); cached runs, ~1 s
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernel_compiles_for_sm90_within_limits(sm90_figures, case):
    got = sm90_figures[case_id(case)]
    assert "error" not in got, f"{case_id(case)} does not compile for sm_90: {got.get('error')}"
    for k in got["kernels"]:
        assert k["shared"] <= SHARED_LIMIT, \
            f"{case_id(case)}: {k['shared']} B of shared memory > {SHARED_LIMIT} B ({k})"
        assert k["spill_stores"] == 0 and k["spill_loads"] == 0, \
            f"{case_id(case)}: register spills ({k})"


def test_soft_ce_linear_fp32_on_cuda_takes_the_torch_back_end():
    """The fused-linear kernels run their dots in TF32; fp32 inputs on CUDA would need exact
    products that spill at D = 256, so "auto" routes them to torch and "triton" refuses."""
    import torch
    from ibot_fast.kernels.soft_ce import linear_backend

    class FakeCuda:  # dtype and device metadata are all linear_backend reads
        is_cuda = True

        def __init__(self, dtype):
            self.dtype = dtype

    fp32 = [FakeCuda(torch.float32)] * 4
    mixed = [FakeCuda(torch.bfloat16), FakeCuda(torch.float32)] * 2
    assert linear_backend("auto", "triton", *fp32) == "torch"
    assert linear_backend("auto", "triton", *mixed) == "triton"
    assert linear_backend("triton", "triton", *mixed) == "triton"
    with pytest.raises(ValueError, match="backend='auto' or 'torch'"):
        linear_backend("triton", "triton", *fp32)
    cpu = torch.zeros(1)  # the interpreter (CPU tests) runs fp32 tiles, exact ("ieee")
    assert linear_backend("triton", "triton", cpu, cpu, cpu, cpu) == "triton"


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
