"""The fused iBOT loss against ground truths: ``soft_ce`` / ``soft_ce_linear``
(ibot_fast.fused_loss, kernels/soft_ce_triton.py) and ``IBOTLoss(backend=...)``.

* Op level: ``dense_soft_ce`` below is the issue's formula written out densely in fp64
  (gather the partner rows, softmax, log_softmax, weighted sum); autograd gives the gradients.
* Module level: ``IBOTLossReference`` (the eager dense path, itself tested against an independent
  transcription in test_loss.py) is the ground truth for every back end of ``IBOTLoss``.

Every back end must agree to 1e-5 (relative; scale-relative for tensors) in loss, gradients and
centres. On the CPU, the Triton back end runs under TRITON_INTERPRET=1 (set by conftest.py), in
fp32 and on tiny shapes: the interpreter is slow. Block and chunk sizes are forced small so K is
not a multiple of the block and the rows not a multiple of the chunk.
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import ibot_fast.fused_loss as fl
from ibot_fast.fused_loss import soft_ce, soft_ce_linear, teacher_col_sum
from ibot_fast.loss import IBOTLoss, IBOTLossReference, masked_patch_rows

RTOL = 1e-5
BACKENDS = ["torch", "triton"]


def rel_err(actual, expected):
    """max |a - e| / max |e| (as in test_loss.py)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _interpreter_tests_need_the_interpreter(request):
    """These tests feed CPU tensors to backend="triton". On a GPU machine triton compiles for
    real and rejects them, unless TRITON_INTERPRET=1 was set by hand; the gpu-marked tests
    below cover the compiled kernels there."""
    callspec = getattr(request.node, "callspec", None)
    if (callspec is not None and callspec.params.get("backend") == "triton"
            and "gpu" not in request.keywords and torch.cuda.is_available()
            and os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("CPU interpreter test: run with TRITON_INTERPRET=1")


@pytest.fixture
def small_blocks(monkeypatch):
    """Several K blocks (Triton) and several row chunks (torch) even at tiny shapes."""
    monkeypatch.setattr(fl, "_default_chunk_rows", lambda K: 5)
    # the op's torch back end reads its own module's default
    monkeypatch.setattr(sys.modules["ibot_fast.kernels.soft_ce"], "_default_chunk_rows",
                        lambda K: 5)
    try:
        import ibot_fast.kernels.soft_ce_triton as ks
    except ImportError:  # pragma: no cover - triton missing: torch back end only
        return
    monkeypatch.setattr(ks, "default_block_k", lambda K: 16)


# ---- op level --------------------------------------------------------------------------------
def dense_soft_ce(s_MK, t_TK, partner_MP, weight_MP, c_K, tau_s, tau_t):
    """loss = sum_i sum_p w_ip sum_k -softmax((t_j - c)/tau_t)_k log_softmax(s_i/tau_s)_k."""
    logp_MK = torch.log_softmax(s_MK / tau_s, dim=-1)
    pt_MPK = torch.softmax((t_TK.double()[partner_MP] - c_K.double()) / tau_t, dim=-1)
    return -(weight_MP.double()[..., None] * pt_MPK * logp_MK[:, None, :]).sum()


def make_pairs(seed, M=13, T=9, K=37, P=2, scale_s=2.0, scale_t=0.5):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(M, K, generator=g) * scale_s
    t = torch.randn(T, K, generator=g) * scale_t
    c = torch.randn(K, generator=g) * 0.1
    partner = torch.randint(0, T, (M, P), generator=g)
    weight = torch.rand(M, P, generator=g) + 0.1
    weight[1, 0] = 0.0  # a dead pair inside a live row
    weight[4] = 0.0  # a row without pairs: zero gradient
    partner[2, :] = 3  # a student row paired twice with the same teacher row
    return s, t, partner, weight, c


def check_op(backend, s, t, partner, weight, c, tau_s=0.1, tau_t=0.04, **kw):
    leaf = s.double().requires_grad_(True)
    ref = dense_soft_ce(leaf, t, partner, weight, c, tau_s, tau_t)
    ref.backward()
    x = s.clone().requires_grad_(True)
    loss = soft_ce(x, t, partner, weight, c, tau_s, tau_t, backend=backend, **kw)
    loss.backward()
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert rel_err(loss, ref) < RTOL, (loss.item(), ref.item())
    assert x.grad.dtype == s.dtype
    assert rel_err(x.grad, leaf.grad) < RTOL
    return loss, x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [37, 300])  # never a multiple of the block
def test_soft_ce_matches_dense_formula(backend, K, small_blocks):
    s, t, partner, weight, c = make_pairs(seed=K, K=K)
    _, grad = check_op(backend, s, t, partner, weight, c)
    assert torch.all(grad[4] == 0) and torch.all(grad[1] != 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_ce_large_logits_and_identical_rows(backend, small_blocks):
    s, t, partner, weight, c = make_pairs(seed=1, scale_s=300.0, scale_t=100.0)  # s/tau ~ 3e3
    check_op(backend, s, t, partner, weight, c)
    # identical student rows, identical teacher rows, and a constant row (uniform softmax)
    s, t, partner, weight, c = make_pairs(seed=2)
    s[:] = s[0]
    t[:] = t[0]
    s[5] = 7.0
    loss, grad = check_op(backend, s, t, partner, weight, c)
    # rows 0 and 3 have the same logits and partners' logits: same gradient up to the weights
    w0, w3 = weight[0].sum(), weight[3].sum()
    torch.testing.assert_close(grad[0] / w0, grad[3] / w3, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_ce_no_live_pair(backend, small_blocks):
    s, t, partner, weight, c = make_pairs(seed=3)
    x = s.clone().requires_grad_(True)
    loss = soft_ce(x, t, partner, torch.zeros_like(weight), c, 0.1, 0.04, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x.grad == 0)


def test_soft_ce_half_precision_torch():
    """bf16/fp16 inputs: fp32 maths, gradient in the input dtype (same values as fp32 run)."""
    s, t, partner, weight, c = make_pairs(seed=4)
    for dt in (torch.bfloat16, torch.float16):
        x = s.to(dt).requires_grad_(True)
        loss = soft_ce(x, t.to(dt), partner, weight, c, 0.1, 0.04, backend="torch")
        loss.backward()
        x32 = s.to(dt).float().requires_grad_(True)
        ref = soft_ce(x32, t.to(dt).float(), partner, weight, c, 0.1, 0.04, backend="torch")
        ref.backward()
        assert loss.dtype == torch.float32 and x.grad.dtype == dt
        assert rel_err(loss, ref) < 1e-6
        assert rel_err(x.grad, x32.grad) < 1e-2  # the gradient is rounded to dt once


def test_soft_ce_grad_scales_with_upstream_and_refuses_second_backward():
    s, t, partner, weight, c = make_pairs(seed=5)
    x = s.clone().requires_grad_(True)
    (3.0 * soft_ce(x, t, partner, weight, c, 0.1, 0.04, backend="torch")).backward()
    leaf = s.double().requires_grad_(True)
    (3.0 * dense_soft_ce(leaf, t, partner, weight, c, 0.1, 0.04)).backward()
    assert rel_err(x.grad, leaf.grad) < RTOL
    loss = soft_ce(s.clone().requires_grad_(True), t, partner, weight, c, 0.1, 0.04)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


# ---- fused-linear variant ------------------------------------------------------------------
def make_linear(seed, M=11, T=7, K=37, D=24, P=2):
    g = torch.Generator().manual_seed(seed)
    zs = F.normalize(torch.randn(M, D, generator=g), dim=-1)
    zt = F.normalize(torch.randn(T, D, generator=g), dim=-1)
    ws = F.normalize(torch.randn(K, D, generator=g), dim=-1) * 1.3  # weight-normed, g = 1.3
    wt = F.normalize(torch.randn(K, D, generator=g), dim=-1)
    c = torch.randn(K, generator=g) * 0.05
    partner = torch.randint(0, T, (M, P), generator=g)
    weight = torch.rand(M, P, generator=g) + 0.1
    weight[3] = 0.0
    weight[5, P - 1] = 0.0 if P > 1 else weight[5, 0]  # a dead pair in a live row
    return zs, ws, zt, wt, partner, weight, c


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K,D,P", [(37, 24, 2), (70, 16, 1)])
def test_soft_ce_linear_matches_dense_formula(backend, K, D, P):
    zs, ws, zt, wt, partner, weight, c = make_linear(seed=K + D, K=K, D=D, P=P)
    a, b = zs.double().requires_grad_(True), ws.double().requires_grad_(True)
    ref = dense_soft_ce(a @ b.T, zt.double() @ wt.double().T, partner, weight, c, 0.1, 0.04)
    ref.backward()
    x, y = zs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    loss = soft_ce_linear(x, y, zt, wt, partner, weight, c, 0.1, 0.04, backend=backend,
                          chunk_rows=4, block_k=16, block_m=16)
    loss.backward()
    assert rel_err(loss, ref) < RTOL
    assert x.grad.dtype == y.grad.dtype == torch.float32
    assert rel_err(x.grad, a.grad) < RTOL, "bottleneck gradient"
    assert rel_err(y.grad, b.grad) < RTOL, "last-layer weight gradient"
    assert torch.all(x.grad[3] == 0)
    # the centre statistic by linearity: column sums of z_t W_t^T == (sum z_t) W_t^T
    torch.testing.assert_close(teacher_col_sum(zt @ wt.T), zt.sum(0) @ wt.T, rtol=1e-5,
                               atol=1e-6)


# ---- IBOTLoss: every back end against the eager dense reference ------------------------------
K, K2, H = 37, 45, 3  # odd output dims; a 3x3 patch grid (N = 9)
N = H * H


def make_loss(cls, ng, nl, **kw):
    return cls(K, K2, ng, nl, 0.04, 0.07, 0.04, 0.06, 4, 10, **kw)


def make_batch(seed, ng, nl, B, case):
    g = torch.Generator().manual_seed(seed)
    sc = dict(odd=(2.0, 0.3), no_mask=(2.0, 0.3), identical=(2.0, 0.3), large=(300.0, 80.0))[case]
    b = dict(s_cls=torch.randn(ng * B, K, generator=g) * sc[0],
             s_patch=torch.randn(ng * B, N, K2, generator=g) * sc[0],
             s_local=torch.randn(nl * B, K, generator=g) * sc[0] if nl else None,
             t_cls=torch.randn(ng * B, K, generator=g) * sc[1] + 0.1,
             t_patch=torch.randn(ng * B, N, K2, generator=g) * sc[1] - 0.05)
    if case == "identical":
        for key in ("s_cls", "t_cls"):
            b[key][:] = b[key][0]
        for key in ("s_patch", "t_patch"):
            b[key][:] = b[key][0, 0]
    masks = []
    for q in range(ng):
        m = torch.rand(B, H, H, generator=g) < 0.4
        m[0] = False  # no masked token: counts as 0 in the mean over images
        m[1] = True  # every token masked
        m[2] = False
        m[2, q % H, (q + 1) % H] = True  # exactly one masked token
        masks.append(torch.zeros_like(m) if case == "no_mask" else m)
    b["masks"] = masks + [torch.ones(B, 2, 2, dtype=torch.bool)] * nl
    return b


def run(loss_fn, b, epoch, via_selected=False, max_rows=None):
    leaves = {k: b[k].clone().requires_grad_(True) for k in ("s_cls", "s_patch", "s_local")
              if b[k] is not None}
    if via_selected:
        ng = loss_fn.ngcrops
        idx, w = masked_patch_rows(b["masks"], ng, max_rows=max_rows)
        out = loss_fn.forward_selected(
            leaves["s_cls"], b["t_cls"], leaves.get("s_local"),
            leaves["s_patch"].reshape(-1, K2)[idx], b["t_patch"].reshape(-1, K2)[idx], w,
            b["t_patch"].reshape(-1, K2).mean(0), epoch)
    else:
        out = loss_fn((leaves["s_cls"], leaves["s_patch"]), (b["t_cls"], b["t_patch"]),
                      leaves.get("s_local"), b["masks"], epoch)
    out["loss"].backward()
    return out, {k: v.grad for k, v in leaves.items()}


def compare(got, want, fast, ref, rtol=RTOL):
    (out, grads), (rout, rgrads) = got, want
    for key in ("cls", "patch", "loss"):
        assert out[key].dim() == 0 and out[key].dtype == rout[key].dtype
        assert rel_err(out[key], rout[key]) < rtol, (key, out[key].item(), rout[key].item())
    for key in rgrads:
        assert grads[key] is not None, key
        assert rel_err(grads[key], rgrads[key]) < rtol, key
    assert rel_err(fast.center, ref.center) < rtol
    assert rel_err(fast.center2, ref.center2) < rtol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,ng,nl,B,epoch", [
    ("odd", 2, 3, 4, 1),  # local crops, warm-up epoch, K/K2/N all odd
    ("odd", 1, 2, 3, 7),  # a single global crop
    ("no_mask", 2, 1, 3, 0),  # no masked token anywhere: patch loss 0, centre still moves
    ("large", 2, 1, 3, 5),  # logits/tau ~ 3e3: no overflow
    ("identical", 2, 2, 3, 2),
])
def test_ibot_loss_backends_match_eager(backend, case, ng, nl, B, epoch, small_blocks):
    g = torch.Generator().manual_seed(epoch)
    state = {"center": torch.randn(1, K, generator=g) * 0.1,
             "center2": torch.randn(1, 1, K2, generator=g) * 0.1}
    ref = make_loss(IBOTLossReference, ng, nl)
    fast = make_loss(IBOTLoss, ng, nl, backend=backend)
    ref.load_state_dict(state)
    fast.load_state_dict(state)
    b = make_batch(seed=len(case) + 10 * B, ng=ng, nl=nl, B=B, case=case)
    got, want = run(fast, b, epoch), run(ref, b, epoch)
    compare(got, want, fast, ref)
    if case == "no_mask":
        assert got[0]["patch"].item() == 0.0 and torch.all(got[1]["s_patch"] == 0)
        assert not torch.equal(fast.center2, state["center2"])
    mask_rows = torch.cat([b["masks"][q].reshape(B, N) for q in range(ng)])
    assert torch.all(got[1]["s_patch"][~mask_rows] == 0)
    # a second step starts from the updated centres
    b2 = make_batch(seed=99, ng=ng, nl=nl, B=B, case="odd")
    compare(run(fast, b2, epoch), run(ref, b2, epoch), fast, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_rows", [None, 40])  # nonzero, or a static bound with padding
def test_forward_selected_matches_dense_reference(backend, max_rows, small_blocks):
    ng, nl, B, epoch = 2, 2, 4, 3
    kw = dict(lambda1=0.7, lambda2=1.9, student_temp=0.12, center_momentum=0.8,
              center_momentum2=0.95)
    ref = make_loss(IBOTLossReference, ng, nl, **kw)
    fast = make_loss(IBOTLoss, ng, nl, backend=backend, **kw)
    b = make_batch(seed=5, ng=ng, nl=nl, B=B, case="odd")
    n_masked = int(sum(m.sum() for m in b["masks"][:ng]))
    assert max_rows is None or n_masked < max_rows <= ng * B * N  # padding rows exist
    idx, w = masked_patch_rows(b["masks"], ng, max_rows=max_rows)
    assert idx.numel() == (n_masked if max_rows is None else max_rows)
    # weights from the formula: 1/(ng B max(count, 1)) for a masked token of its image
    counts = torch.stack([b["masks"][q].reshape(B, N).sum(1) for q in range(ng)]).reshape(-1)
    expect_w = torch.where(torch.cat([b["masks"][q].reshape(-1) for q in range(ng)])[idx],
                           1.0 / (ng * B * counts.clamp(min=1)[idx // N]), 0.0)
    torch.testing.assert_close(w, expect_w.float(), rtol=0, atol=0)
    got = run(fast, b, epoch, via_selected=True, max_rows=max_rows)
    compare(got, run(ref, b, epoch), fast, ref)


def test_ibot_loss_surface_and_eager_backend():
    import ibot_fast.kernels
    import ibot_fast.kernels.soft_ce_triton  # noqa: F401 - must not shadow the function
    assert ibot_fast.kernels.soft_ce is soft_ce
    ng, nl, B = 2, 1, 3
    fast = make_loss(IBOTLoss, ng, nl)
    assert fast.backend == "auto" and list(fast.state_dict()) == ["center", "center2"]
    eager = make_loss(IBOTLoss, ng, nl, backend="eager")
    ref = make_loss(IBOTLossReference, ng, nl)
    b = make_batch(seed=3, ng=ng, nl=nl, B=B, case="odd")
    got, want = run(eager, b, 1), run(ref, b, 1)
    for key in ("cls", "patch", "loss"):  # backend="eager" *is* the reference code path
        assert torch.equal(got[0][key], want[0][key])
    with pytest.raises(ValueError, match="backend"):
        make_loss(IBOTLoss, ng, nl, backend="cuda")


def test_ibot_loss_under_cpu_autocast_and_bf16():
    """bf16 inputs inside a bf16 autocast region: fp32 loss, same values as fp32 maths on the
    same bf16 numbers."""
    ng, nl, B = 2, 1, 3
    b = make_batch(seed=8, ng=ng, nl=nl, B=B, case="odd")
    b16 = {k: (v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v)
           for k, v in b.items()}
    b32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
           for k, v in b16.items()}
    fast, ref = make_loss(IBOTLoss, ng, nl), make_loss(IBOTLossReference, ng, nl)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = run(fast, b16, 2)
    rout, _ = run(ref, b32, 2)
    for key in ("cls", "patch", "loss"):
        assert out[key].dtype == torch.float32
        assert rel_err(out[key], rout[key]) < RTOL
    assert all(g.dtype == torch.bfloat16 for g in grads.values())


# ---- bad input ---------------------------------------------------------------------------------
def test_bad_input_raises_value_error():
    s, t, partner, weight, c = make_pairs(seed=6)
    args = dict(student_MK=s, teacher_TK=t, partner_MP=partner, weight_MP=weight, center_K=c,
                student_temp=0.1, teacher_temp=0.04)

    def call(**kw):
        return soft_ce(**{**args, **kw})

    with pytest.raises(ValueError, match="teacher_TK has K"):
        call(teacher_TK=torch.randn(9, 38))
    with pytest.raises(ValueError, match="center_K"):
        call(center_K=torch.zeros(36))
    with pytest.raises(ValueError, match="student_MK must be fp16"):
        call(student_MK=s.long())
    with pytest.raises(ValueError, match="teacher_TK must be 2-D"):
        call(teacher_TK=t[None])
    with pytest.raises(ValueError, match="partner_MP must be an int64"):
        call(partner_MP=partner.int())
    with pytest.raises(ValueError, match="partner_MP must be \\[M=13"):
        call(partner_MP=partner[:5], weight_MP=weight[:5])
    with pytest.raises(ValueError, match="weight_MP"):
        call(weight_MP=weight[:, :1])
    with pytest.raises(ValueError, match="student_temp"):
        call(student_temp=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        call(backend="cuda")
    with pytest.raises(ValueError, match="fp64"):
        call(student_MK=s.double(), backend="triton")
    bad_t = t.clone()
    bad_t[2, 5] = float("nan")
    call(teacher_TK=bad_t)  # no check, no sync: NaN propagates
    with pytest.raises(ValueError, match="teacher_TK contains NaN"):
        call(teacher_TK=bad_t, check_finite=True)
    zs, ws, zt, wt, lp, lw, lc = make_linear(seed=7)
    with pytest.raises(ValueError, match="ws_KD must be"):
        soft_ce_linear(zs, ws[:, :-1], zt, wt, lp, lw, lc, 0.1, 0.04)
    with pytest.raises(ValueError, match="zt_TD has D"):
        soft_ce_linear(zs, ws, zt[:, :-1], wt, lp, lw, lc, 0.1, 0.04)
    with pytest.raises(ValueError, match="center_K"):
        soft_ce_linear(zs, ws, zt, wt, lp, lw, lc[:-1], 0.1, 0.04)


def test_ibot_loss_bad_input():
    ng, nl, B = 2, 1, 3
    b = make_batch(seed=9, ng=ng, nl=nl, B=B, case="odd")
    fast = make_loss(IBOTLoss, ng, nl, check_finite=True)
    t_patch = b["t_patch"].clone()
    t_patch[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="teacher_output\\[1\\] contains NaN"):
        fast((b["s_cls"], b["s_patch"]), (b["t_cls"], t_patch), b["s_local"], b["masks"], 0)
    with pytest.raises(ValueError, match="patch_out_dim"):  # the reference's checks still run
        fast((b["s_cls"], b["s_patch"][..., :-1]), (b["t_cls"], b["t_patch"]), b["s_local"],
             b["masks"], 0)
    idx, w = masked_patch_rows(b["masks"], ng)
    sp, tp = b["s_patch"].reshape(-1, K2)[idx], b["t_patch"].reshape(-1, K2)[idx]
    mean = b["t_patch"].reshape(-1, K2).mean(0)
    sel = fast.forward_selected
    with pytest.raises(ValueError, match="teacher_patch_rows"):
        sel(b["s_cls"], b["t_cls"], b["s_local"], sp, tp[:-1], w, mean, 0)
    with pytest.raises(ValueError, match="patch_weight"):
        sel(b["s_cls"], b["t_cls"], b["s_local"], sp, tp, w[:-1], mean, 0)
    with pytest.raises(ValueError, match="teacher_patch_mean"):
        sel(b["s_cls"], b["t_cls"], b["s_local"], sp, tp, w, mean[:-1], 0)
    with pytest.raises(ValueError, match="student_local_cls"):
        sel(b["s_cls"], b["t_cls"], None, sp, tp, w, mean, 0)
    with pytest.raises(ValueError, match="student_cls"):
        sel(b["s_cls"][:, :-1], b["t_cls"], b["s_local"], sp, tp, w, mean, 0)


# ---- inplace_grad: the gradient written into the student logits (Liger-style) ---------------
def linear_logits(seed, rows, K_out, D=6):
    """Student logits from a Linear, as in iBOT's head: the op upstream of the loss whose
    parameter (and input) gradients must not change when the logits are overwritten."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(D, K_out).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(K_out, D, generator=g) * 0.7)
        lin.bias.copy_(torch.randn(K_out, generator=g) * 0.1)
    return lin, torch.randn(*rows, D, generator=g, dtype=torch.float64)


def upstream_grads(lin, z_leaf):
    return dict(weight=lin.weight.grad.clone(), bias=lin.bias.grad.clone(),
                z=z_leaf.grad.clone())


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_ce_inplace_grad_matches(backend, small_blocks):
    """loss and the gradients of the Linear producing the logits: equal to the non-inplace
    path and to the dense formula (fp64 autograd); the logits now hold their gradient."""
    _, t, partner, weight, c = make_pairs(seed=11)
    lin, z = linear_logits(seed=11, rows=(13,), K_out=37)
    # fp64 ground truth: autograd through the dense formula
    zl = z.clone().requires_grad_(True)
    ref = 3.0 * dense_soft_ce(lin(zl), t, partner, weight, c, 0.1, 0.04)
    ref.backward()
    want = upstream_grads(lin, zl)
    got = {}
    for inplace in (False, True):
        lin.zero_grad()
        zl = z.float().clone().requires_grad_(True)
        lin32 = torch.nn.Linear(6, 37)
        lin32.load_state_dict({k: v.float() for k, v in lin.state_dict().items()})
        logits = lin32(zl)
        version = logits._version
        loss = soft_ce(logits, t, partner, weight, c, 0.1, 0.04, backend=backend,
                       inplace_grad=inplace)
        assert (logits._version > version) == inplace  # autograd sees the write
        (3.0 * loss).backward()
        assert rel_err(3.0 * loss, ref) < RTOL
        got[inplace] = dict(weight=lin32.weight.grad, bias=lin32.bias.grad, z=zl.grad)
        for key in want:
            assert rel_err(got[inplace][key], want[key]) < RTOL, (inplace, key)
        if inplace:  # the logits tensor now *is* d(3 loss)/d logits; the dead row is 0
            leaf = lin(z).detach().requires_grad_(True)
            (3.0 * dense_soft_ce(leaf, t, partner, weight, c, 0.1, 0.04)).backward()
            assert rel_err(logits.detach(), leaf.grad) < RTOL
            assert torch.all(logits[4] == 0)
    for key in want:
        assert rel_err(got[True][key], got[False][key]) < RTOL, key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ng,nl", [(2, 2), (2, 0)])  # nl = 0: the [CLS] logits in place too
def test_ibot_loss_inplace_grad_matches_eager(backend, ng, nl, small_blocks):
    B, epoch, D = 3, 2, 5
    b = make_batch(seed=21 + nl, ng=ng, nl=max(nl, 1), B=B, case="odd")
    masks = b["masks"][:ng] + b["masks"][ng:ng + nl]
    head_cls, z_cls = linear_logits(seed=1, rows=((ng + nl) * B,), K_out=K, D=D)
    head_patch, z_patch = linear_logits(seed=2, rows=(ng * B, N), K_out=K2, D=D)
    state = {"center": torch.randn(1, K) * 0.1, "center2": torch.randn(1, 1, K2) * 0.1}

    def step(loss_fn, dtype):
        hc, hp = (torch.nn.Linear(D, K).to(dtype), torch.nn.Linear(D, K2).to(dtype))
        hc.load_state_dict(head_cls.state_dict())
        hp.load_state_dict(head_patch.state_dict())
        zc = z_cls.to(dtype, copy=True).requires_grad_(True)
        zp = z_patch.to(dtype, copy=True).requires_grad_(True)
        s_cls = hc(zc)  # globals then locals, crop-major, like MultiCropWrapper's output
        out = loss_fn((s_cls[:ng * B], hp(zp)), (b["t_cls"].to(dtype), b["t_patch"].to(dtype)),
                      s_cls[ng * B:] if nl else None, masks, epoch)
        out["loss"].backward()
        return out, dict(wc=hc.weight.grad, bc=hc.bias.grad, wp=hp.weight.grad,
                         bp=hp.bias.grad, zc=zc.grad, zp=zp.grad)

    outs = {}
    for name, loss_fn, dtype in (
            ("ref", make_loss(IBOTLossReference, ng, nl), torch.float64),
            ("fused", make_loss(IBOTLoss, ng, nl, backend=backend), torch.float32),
            ("inplace", make_loss(IBOTLoss, ng, nl, backend=backend, inplace_grad=True),
             torch.float32)):
        loss_fn.load_state_dict(state)
        outs[name] = step(loss_fn, dtype) + (loss_fn,)
    for name in ("fused", "inplace"):
        for want in ("ref", "fused"):
            (out, grads, fn), (rout, rgrads, rfn) = outs[name], outs[want]
            for key in ("cls", "patch", "loss"):
                assert rel_err(out[key], rout[key]) < RTOL, (name, want, key)
            for key in rgrads:
                assert rel_err(grads[key], rgrads[key]) < RTOL, (name, want, key)
            assert rel_err(fn.center, rfn.center) < RTOL
            assert rel_err(fn.center2, rfn.center2) < RTOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_grad_misuse(backend):
    s, t, partner, weight, c = make_pairs(seed=12)
    args = (t, partner, weight, c, 0.1, 0.04)
    kw = dict(backend=backend, inplace_grad=True)
    with pytest.raises(ValueError, match="student_MK: inplace_grad=True .* leaf"):
        soft_ce(s.clone().requires_grad_(True), *args, **kw)
    base = s.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="student_MK: inplace_grad=True needs a contiguous"):
        soft_ce((base * 1.0).T.contiguous().T, *args, **kw)
    x = base * 1.0
    with pytest.raises(ValueError, match="teacher logits share"):
        soft_ce(x, x.detach()[:9], partner, weight, c, 0.1, 0.04, **kw)
    # an op that saved the logits for its backward: torch's in-place error, not a wrong result
    x = base * 1.0
    saved = x.pow(2).sum()  # PowBackward saves x
    loss = soft_ce(x, *args, **kw)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + saved).backward()
    # no gradient needed: nothing is overwritten
    x = base * 1.0
    with torch.no_grad():
        soft_ce(x, *args, **kw)
    assert torch.equal(x, s)
    # module level: argument names, and no in-place on the eager path
    ng, nl, B = 2, 0, 3
    bb = make_batch(seed=13, ng=ng, nl=1, B=B, case="odd")
    fn = make_loss(IBOTLoss, ng, nl, backend=backend, inplace_grad=True)
    sc, sp = bb["s_cls"].clone().requires_grad_(True), bb["s_patch"].clone().requires_grad_(True)
    teach = (bb["t_cls"], bb["t_patch"])
    with pytest.raises(ValueError, match=r"student_output\[1\] \(patch logits\).*leaf"):
        fn((sc * 1.0, sp), teach, None, bb["masks"], 0)
    with pytest.raises(ValueError, match=r"student_output\[0\] \(\[CLS\] logits\).*leaf"):
        fn((sc, sp * 1.0), teach, None, bb["masks"], 0)
    with pytest.raises(ValueError, match=r"student_output\[1\].*contiguous"):
        fn((sc * 1.0, (sp * 1.0).transpose(0, 1).contiguous().transpose(0, 1)), teach, None,
           bb["masks"], 0)
    with pytest.raises(ValueError, match="inplace_grad=True needs a fused backend"):
        make_loss(IBOTLoss, ng, nl, backend="eager", inplace_grad=True)


# ---- GPU (skipped without CUDA) ----------------------------------------------------------------
def _gpu_batch(ng=2, nl=10, B=8, N=196, K=8192, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    b = dict(s_cls=torch.randn(ng * B, K, device=dev, generator=g),
             s_patch=torch.randn(ng * B, N, K, device=dev, generator=g),
             s_local=torch.randn(nl * B, K, device=dev, generator=g),
             t_cls=torch.randn(ng * B, K, device=dev, generator=g) * 0.3,
             t_patch=torch.randn(ng * B, N, K, device=dev, generator=g) * 0.3)
    masks = [torch.rand(B, 14, 14, device=dev, generator=g) < 0.3 for _ in range(ng)]
    masks[0][0] = False
    b["masks"] = masks + [torch.ones(B, 6, 6, dtype=torch.bool, device=dev)] * nl
    return b


@pytest.mark.gpu
def test_gpu_triton_matches_eager_fp32_vit_shapes():
    ng, nl = 2, 10
    b = _gpu_batch(ng, nl)
    ref = IBOTLossReference(8192, 8192, ng, nl, 0.04, 0.07, 0.04, 0.07, 30, 100).cuda()
    fast = IBOTLoss(8192, 8192, ng, nl, 0.04, 0.07, 0.04, 0.07, 30, 100,
                    backend="triton").cuda()
    compare(run(fast, b, 3), run(ref, b, 3), fast, ref)


@pytest.mark.gpu
def test_gpu_triton_inplace_grad_vit_shapes():
    """Compiled kernel, inplace_grad=True: logits from a Linear; its parameter gradients and
    the loss equal the non-inplace path and the eager reference; version counter bumped."""
    ng, nl, B, N, D = 2, 10, 4, 196, 64
    b = _gpu_batch(ng, nl, B=B)
    g = torch.Generator(device="cuda").manual_seed(1)
    z = torch.randn(ng * B, N, D, device="cuda", generator=g)
    w = torch.randn(8192, D, device="cuda", generator=g) * 0.3
    results = {}
    for name, kw in (("ref", None), ("fused", {}), ("inplace", dict(inplace_grad=True))):
        args = (8192, 8192, ng, nl, 0.04, 0.07, 0.04, 0.07, 30, 100)
        fn = (IBOTLossReference(*args) if kw is None
              else IBOTLoss(*args, backend="triton", **kw)).cuda()
        wl = w.clone().requires_grad_(True)
        logits = z @ wl.T
        version = logits._version
        out = fn((b["s_cls"], logits), (b["t_cls"], b["t_patch"]), b["s_local"], b["masks"], 3)
        assert (logits._version > version) == (name == "inplace")
        out["loss"].backward()
        results[name] = (out["loss"], wl.grad)
    for name in ("fused", "inplace"):
        assert rel_err(results[name][0], results["ref"][0]) < RTOL
        assert rel_err(results[name][1], results["ref"][1]) < 1e-4  # + a matmul (no TF32 by default)
        assert rel_err(results[name][1], results["fused"][1]) < RTOL


@pytest.mark.gpu
def test_gpu_bf16_error_budget():
    """Error of the kernel on bf16 inputs vs an fp64 ground truth on the fp32 inputs: at most 2x
    the error of the same eager code run on the bf16 inputs (flash-attn style budget)."""
    ng, nl = 2, 10
    b = _gpu_batch(ng, nl, seed=1)
    args = (8192, 8192, ng, nl, 0.04, 0.07, 0.04, 0.07, 30, 100)
    b64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
           for k, v in b.items()}
    b16 = {k: (v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v)
           for k, v in b.items()}
    truth = run(IBOTLossReference(*args).cuda().double(), b64, 0)
    eager = run(IBOTLossReference(*args).cuda(), b16, 0)
    fused = run(IBOTLoss(*args, backend="triton").cuda(), b16, 0)
    for key in ("cls", "patch", "loss"):
        e_ref = (eager[0][key].double() - truth[0][key]).abs().item()
        e_fused = (fused[0][key].double() - truth[0][key]).abs().item()
        assert e_fused <= 2 * e_ref + 1e-6 * truth[0][key].abs().item(), (key, e_fused, e_ref)
    for key in truth[1]:
        e_ref = (eager[1][key].double() - truth[1][key]).abs().max().item()
        e_fused = (fused[1][key].double() - truth[1][key]).abs().max().item()
        assert e_fused <= 2 * e_ref + 1e-12, (key, e_fused, e_ref)


@pytest.mark.gpu
def test_gpu_soft_ce_linear_triton_matches_torch():
    torch.manual_seed(0)
    M, T, K, D = 3000, 1000, 8192, 256
    zs = F.normalize(torch.randn(M, D, device="cuda"), dim=-1)
    zt = F.normalize(torch.randn(T, D, device="cuda"), dim=-1)
    ws = F.normalize(torch.randn(K, D, device="cuda"), dim=-1)
    wt = F.normalize(torch.randn(K, D, device="cuda"), dim=-1)
    partner = torch.randint(0, T, (M, 2), device="cuda")
    weight = torch.rand(M, 2, device="cuda") / M
    c = torch.randn(K, device="cuda") * 0.01
    # the Triton back end takes bf16/fp16 inputs on CUDA (fp32: torch, see linear_backend);
    # both back ends see the same bf16 values and compute in fp32 from them
    zs, zt = zs.bfloat16(), zt.bfloat16()
    grads = {}
    for be in ("torch", "triton"):
        x, y = zs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        loss = soft_ce_linear(x, y, zt, wt, partner, weight, c, 0.1, 0.04, backend=be)
        loss.backward()
        grads[be] = (loss, x.grad, y.grad)
    for a, e in zip(grads["triton"], grads["torch"]):
        assert rel_err(a, e) < 1e-4
    with pytest.raises(ValueError, match="bf16/fp16"):
        soft_ce_linear(zs.float(), ws, zt.float(), wt, partner, weight, c, 0.1, 0.04,
                       backend="triton")
