"""The fused soft-target CE op against ground truths: ``soft_ce`` / ``soft_ce_linear``
(kernels/soft_ce.py, kernels/soft_ce_triton.py). ``dense_soft_ce`` below is the op's formula
written out densely in fp64 (gather the partner rows, softmax, log_softmax, weighted sum);
autograd gives the gradients. The modules built on the op are tested in test_loss_*.py.

Every back end must agree to 1e-5 (relative; scale-relative for tensors) in loss and
gradients. On the CPU, the Triton back end runs under TRITON_INTERPRET=1 (set by conftest.py),
in fp32 and on tiny shapes: the interpreter is slow. Block and chunk sizes are forced small so K is
not a multiple of the block and the rows not a multiple of the chunk.
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import interpreter_tests_need_the_interpreter, small_blocks  # noqa: F401 - fixtures
from helpers import linear_logits, rel_err
from ibot_fast.kernels.soft_ce import soft_ce, soft_ce_linear, teacher_col_sum

RTOL = 1e-5
BACKENDS = ["torch", "triton"]
pytestmark = pytest.mark.usefixtures("interpreter_tests_need_the_interpreter")


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


# ---- inplace_grad: the gradient written into the student logits (Liger-style) ---------------
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


# ---- GPU (skipped without CUDA) ----------------------------------------------------------------
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
