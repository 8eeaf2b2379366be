"""ibot_fast/models/packed.py: packed blocks against separate passes, the attention back ends
(and the rules that refuse a back end before it fails at scale), stochastic depth."""
from __future__ import annotations

import itertools
import math
import sys
import types

import pytest
import torch

import ibot_fast.models.packed as packed
from ibot_fast.models import build_ibot_models
from ibot_fast.models.packed import (ALL_ATTN_BACKENDS, FLEX_EAGER_MAX_TOKENS, PackedBlock,
                                     attn_backend_flag_errors, check_attn_backend,
                                     check_flex_tokens, check_xformers_ops, draw_subsets,
                                     packed_attention)


# ------------------------------------------------------------------- packed blocks, attention
def _vit(**kw):
    student, _ = build_ibot_models("vit_nano", 8, img_size=16, out_dim=8, patch_out_dim=8,
                                   shared_head=True, head_hidden_dim=8, head_bottleneck_dim=4,
                                   **kw)
    return student.backbone.double()


def test_packed_blocks_equal_separate_passes():
    """Two crop groups (2x5 and 3x2 tokens) through a packed block equal each group alone
    through the reference Block.forward."""
    torch.manual_seed(0)
    bb = _vit(drop_path=0.0)
    blk = bb.blocks[1]
    xs = [torch.randn(2, 5, 128, dtype=torch.float64), torch.randn(3, 2, 128, dtype=torch.float64)]
    for backend in ("sdpa", "math"):
        pb = PackedBlock(blk, layout=((2, 5), (3, 2)), attn_backend=backend)
        got = pb(torch.cat([x.reshape(-1, 128) for x in xs]))
        want = torch.cat([blk(x).reshape(-1, 128) for x in xs])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_packed_block_on_read_rows_equals_its_full_output_at_those_rows():
    """forward_rows(x, rows, coins) is forward(x, coins)[rows] (fp64; with drop-path coins,
    some dropped; rows unsorted, as the head's [CLS]-then-patch order), and backward through
    it gives the same gradients as through the full output's rows."""
    torch.manual_seed(0)
    blk = _vit(drop_path=0.3).blocks[2]
    layout = ((2, 5), (3, 2))
    x = torch.randn(16, 128, dtype=torch.float64, requires_grad=True)
    coins = [[torch.tensor([1.0, 0.0], dtype=torch.float64).view(2, 1, 1),
              torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64).view(3, 1, 1)],
             [torch.tensor([1.0, 1.0], dtype=torch.float64).view(2, 1, 1),
              torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64).view(3, 1, 1)]]
    rows = torch.tensor([0, 5, 10, 12, 14, 3, 7, 15])
    pb = PackedBlock(blk, layout=layout, attn_backend="sdpa")
    got = pb.forward_rows(x, rows, coins)
    want = pb(x, coins)[rows]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(got)
    (gx_got,) = torch.autograd.grad(got, x, g)
    (gx_want,) = torch.autograd.grad(want, x, g)
    torch.testing.assert_close(gx_got, gx_want, rtol=1e-12, atol=1e-12)


def test_flex_document_mask_forward_equals_math():
    """flex_attention's document mask over a packed stream (forward only: no CPU backward)."""
    torch.manual_seed(0)
    layout = ((2, 5), (3, 2))
    qkv = torch.randn(16, 3 * 8)
    want = packed_attention(qkv, layout, 2, 0.5, "math")
    try:
        got = packed_attention(qkv, layout, 2, 0.5, "flex")
    except Exception as err:  # pragma: no cover - depends on the torch build
        pytest.skip(f"flex_attention forward unavailable here: {err}")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_check_attn_backend():
    assert check_attn_backend("sdpa", "cpu") == "sdpa"
    with pytest.raises(ValueError, match="unknown attn_backend"):
        check_attn_backend("flash", "cpu")
    assert check_attn_backend("flex", "cpu", training=False) == "flex"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "xformers", "flex", "varlen"])
def test_packed_attention_backends_gpu(backend):
    """Every back end on a packed stream of two crop sizes, forward and backward, against the
    explicit softmax in fp32 (bf16 back ends: error budget of bf16 rounding)."""
    try:
        check_attn_backend(backend, "cuda")
    except ValueError as err:
        pytest.skip(str(err))
    torch.manual_seed(0)
    layout = ((4, 197), (6, 37))
    R = sum(b * t for b, t in layout)
    qkv = torch.randn(R, 3 * 384, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(R, 384, device="cuda", dtype=torch.bfloat16)
    ref_in = qkv.detach().float().requires_grad_()
    want = packed_attention(ref_in, layout, 6, 64 ** -0.5, "math")
    (want * g.float()).sum().backward()
    got = packed_attention(qkv, layout, 6, 64 ** -0.5, backend)
    (got.float() * g.float()).sum().backward()
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(qkv.grad.float(), ref_in.grad, rtol=5e-2, atol=5e-2)


# ---------------------------------------------- back ends refused before they fail at scale
RECIPE_LAYOUT = ((2 * 128, 197), (10 * 128, 37))  # ViT-S/16, B = 128: 2x224 + 10x96 crops


def test_flag_rules_refuse_varlen_without_16_bit_precision():
    """varlen is flash attention (bf16/fp16 only): fp32 and fp64 are refused, naming
    --precision and the fix; 16-bit precisions and the other back ends pass."""
    for precision in ("fp32", "fp64"):
        (err,) = attn_backend_flag_errors("varlen", precision, "cuda")
        assert "--precision " + precision in err and "--precision bf16" in err
    for precision in ("bf16", "fp16"):
        assert attn_backend_flag_errors("varlen", precision, "cuda") == []
    for backend in ("sdpa", "math", "flex", "xformers"):
        assert attn_backend_flag_errors(backend, "fp32", "cuda") == []


def test_flag_rules_refuse_cuda_back_ends_on_the_cpu():
    assert attn_backend_flag_errors("sdpa", "fp32", "cpu") == []
    assert attn_backend_flag_errors("math", "fp64", "cpu") == []
    for backend in ("xformers", "flex", "varlen"):
        errs = attn_backend_flag_errors(backend, "bf16", "cpu")
        assert len(errs) == 1 and "--attn_backend sdpa" in errs[0], backend
    # both rules at once: one message each
    assert len(attn_backend_flag_errors("varlen", "fp32", "cpu")) == 2
    (err,) = attn_backend_flag_errors("flash", None, "cuda")
    assert all(name in err for name in ALL_ATTN_BACKENDS)
    with pytest.raises(ValueError, match=r"\-\-precision fp32"):
        check_attn_backend("varlen", "cuda", precision="fp32")


def test_varlen_refuses_fp32_inputs_with_the_flag():
    qkv = torch.randn(16, 24)
    with pytest.raises(ValueError, match=r"\-\-precision bf16"):
        packed_attention(qkv, ((2, 5), (3, 2)), 2, 0.5, "varlen")


def test_eager_flex_refuses_the_recipe_stream_and_compiled_flex_takes_it():
    """Eager flex would materialise heads x R x R scores (R ~ 97,800 at the recipe batch:
    ~229 GB for 6 heads); it refuses such a stream with the limit in the message, while the
    compiled path (every accelerator) accepts it."""
    R = sum(b * t for b, t in RECIPE_LAYOUT)
    assert 97_000 < R < 98_000 and 6 * R * R * 4 > 200e9
    with pytest.raises(ValueError, match=f"at most {FLEX_EAGER_MAX_TOKENS}"):
        check_flex_tokens(R, "cpu")
    check_flex_tokens(FLEX_EAGER_MAX_TOKENS, "cpu")
    check_flex_tokens(R, "cuda")


def test_eager_flex_refuses_before_computing(monkeypatch):
    monkeypatch.setattr(packed, "FLEX_EAGER_MAX_TOKENS", 15)
    monkeypatch.setattr(packed, "_flex_attention_fn", lambda device: pytest.fail("ran"))
    with pytest.raises(ValueError, match="16 x 16 scores"):
        packed_attention(torch.randn(16, 24), ((2, 5), (3, 2)), 2, 0.5, "flex")


def test_flex_on_an_accelerator_compiles_the_mask_and_the_kernel(monkeypatch):
    """Where flex runs compiled, the block mask is built with _compile=True (block by block,
    never a dense R x R mask) and the attention goes through the torch.compile'd flex_attention;
    here the compiled function is stood in for by the eager op (on the CPU), which must see the
    same arguments and give the math back end's result."""
    from torch.nn.attention import flex_attention as fa
    calls = {"mask": [], "flex": 0}
    real_mask, real_flex = fa.create_block_mask, fa.flex_attention

    def mask_recorder(*args, **kw):
        calls["mask"].append(kw.get("_compile"))
        return real_mask(*args, **{**kw, "_compile": False})

    def compiled_stand_in(*args, **kw):
        calls["flex"] += 1
        return real_flex(*args, **kw)

    monkeypatch.setattr(packed, "flex_runs_compiled", lambda device: True)
    monkeypatch.setattr(packed, "_FLEX_CACHE", {})
    monkeypatch.setattr(packed, "_COMPILED_FLEX", [compiled_stand_in])
    monkeypatch.setattr(fa, "create_block_mask", mask_recorder)
    torch.manual_seed(0)
    layout = ((2, 5), (3, 2))
    qkv = torch.randn(16, 3 * 8)
    want = packed_attention(qkv, layout, 2, 0.5, "math")
    for _ in range(2):  # the mask is built once per layout
        got = packed_attention(qkv, layout, 2, 0.5, "flex")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert calls == {"mask": [True], "flex": 2}


@pytest.mark.gpu
def test_flex_at_the_recipe_stream_fits_gpu():
    """Flex over the whole recipe stream (ViT-S, B = 128: R ~ 97,800 tokens, 6 heads), forward
    and backward in bf16, in a few GB (eager flex would need ~229 GB), equal to SDPA per crop."""
    try:
        check_attn_backend("flex", "cuda")
    except ValueError as err:
        pytest.skip(str(err))
    torch.manual_seed(0)
    R = sum(b * t for b, t in RECIPE_LAYOUT)
    qkv = torch.randn(R, 3 * 384, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = packed_attention(qkv, RECIPE_LAYOUT, 6, 64 ** -0.5, "flex")
    out.float().square().mean().backward()
    peak_gb = (torch.cuda.max_memory_allocated() - base) / 1e9
    assert peak_gb < 8, peak_gb
    with torch.no_grad():
        want = packed_attention(qkv.detach(), RECIPE_LAYOUT, 6, 64 ** -0.5, "sdpa")
    torch.testing.assert_close(out.detach().float(), want.float(), rtol=2e-2, atol=2e-2)


# --------------------------------------------------- xformers: its compiled ops must load
def _fake_xformers(monkeypatch, load_error=None, attention=None, metadata=None):
    """An importable stand-in for an installed xformers wheel."""
    root = types.ModuleType("xformers")
    root.__version__ = "0.0.35"
    cpp = types.ModuleType("xformers._cpp_lib")
    cpp._cpp_library_load_exception = load_error
    cpp._build_metadata = metadata
    ops = types.ModuleType("xformers.ops")
    ops.fmha = types.SimpleNamespace(BlockDiagonalMask=types.SimpleNamespace(
        from_seqlens=lambda seqlens: ("block-diagonal", tuple(seqlens))))
    ops.memory_efficient_attention = attention or (lambda q, k, v, attn_bias=None: q)
    root._cpp_lib, root.ops = cpp, ops
    for name, mod in (("xformers", root), ("xformers._cpp_lib", cpp), ("xformers.ops", ops)):
        monkeypatch.setitem(sys.modules, name, mod)


def test_xformers_wheel_for_another_torch_is_refused_with_its_build(monkeypatch):
    """A wheel whose _C.so does not load (built for torch 2.10 + CUDA 12.8, needs
    libcudart.so.12) is refused at the back end's check, saying what it was built for."""
    err = OSError("libcudart.so.12: cannot open shared object file: No such file")
    err.build_info = types.SimpleNamespace(torch_version="2.10.0+cu128", cuda_version=1208)
    _fake_xformers(monkeypatch, load_error=err)
    with pytest.raises(ValueError) as info:
        check_attn_backend("xformers", "cuda")
    msg = str(info.value)
    assert "libcudart.so.12" in msg and "built for torch 2.10.0+cu128 with CUDA 12.8" in msg
    assert f"this is torch {torch.__version__}" in msg and "--attn_backend sdpa" in msg


def test_xformers_ops_that_fail_to_run_are_refused_with_its_build(monkeypatch):
    def no_kernel(q, k, v, attn_bias=None):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")

    meta = types.SimpleNamespace(torch_version="2.10.0", cuda_version=1208)
    _fake_xformers(monkeypatch, attention=no_kernel, metadata=meta)
    with pytest.raises(ValueError, match="No operator found") as info:
        check_xformers_ops("cpu")
    assert "built for torch 2.10.0 with CUDA 12.8" in str(info.value)
    _fake_xformers(monkeypatch, metadata=meta)  # ops that run: accepted
    check_xformers_ops("cpu")


def test_xformers_missing_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # import fails
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    with pytest.raises(ValueError, match="cannot be imported"):
        check_xformers_ops("cuda")


# ------------------------------------------------------------------------ stochastic depth
def test_subset_stochastic_depth_expectation_is_exact():
    """Compute-skipping stochastic depth: averaged over *every* subset of the size drawn, the
    output equals x + branch(x) (the expectation the flag promises), per group; and each
    sequence of a subset gets branch / (k/b), the others exactly x."""
    torch.manual_seed(0)
    bb = _vit(drop_path=0.5)
    blk = bb.blocks[3]  # drop rate 0.5 -> subsets of b - floor(b/2)
    p = blk.drop_path.drop_prob
    layout = ((4, 5), (3, 2))
    pb = PackedBlock(blk, layout=layout)
    x = torch.randn(sum(b * t for b, t in layout), 128, dtype=torch.float64)
    full = x + pb._attn_branch(x, layout)
    ks = [b - int(p * b) for b, _ in layout]
    subsets = [list(itertools.combinations(range(b), k)) for (b, _), k in zip(layout, ks)]
    total, count = torch.zeros_like(x), 0
    for combo in itertools.product(*subsets):
        idx = [torch.tensor(c) for c in combo]
        y = pb._subset_residual(x, pb._attn_branch, idx)
        total += y
        count += 1
        start = 0
        for (b, t), c, k in zip(layout, combo, ks):
            for s in range(b):
                rows = slice(start + s * t, start + (s + 1) * t)
                want = (x[rows] + (full[rows] - x[rows]) * (b / k) if s in c else x[rows])
                torch.testing.assert_close(y[rows], want, rtol=1e-10, atol=1e-12)
            start += b * t
    torch.testing.assert_close(total / count, full, rtol=1e-10, atol=1e-12)


def test_draw_subsets_sizes_and_uniformity():
    torch.manual_seed(0)
    bb = _vit(drop_path=0.4)
    draws = [draw_subsets(bb.blocks, [10], "cpu")[3][0][0] for _ in range(2000)]
    assert all(d.numel() == 10 - int(0.4 * 10) and torch.equal(d, d.sort().values.unique())
               for d in draws)
    freq = torch.bincount(torch.cat(draws), minlength=10).double() / len(draws)
    # each index is in a subset with probability 6/10; 5 sigma of 2000 Bernoulli draws
    assert (freq - 0.6).abs().max() < 5 * math.sqrt(0.24 / 2000)
