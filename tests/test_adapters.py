"""Adapters (ibot_fast/adapters.py), Sinkhorn-Knopp centring and ``pairs_to_table``
(ibot_fast/fused_loss.py), ``IBOTLoss(center="sinkhorn_knopp")`` (ibot_fast/loss.py).

Ground truths are transcriptions written here in plain torch (fp64), from the originals'
formulas: LightlySSL ``lightly/loss/ibot_loss.py`` (``IBOTPatchLoss.forward`` and the "mean"
``Center``) and DINOv2 ``dinov2/loss/ibot_patch_loss.py`` (``forward``, ``forward_masked``,
``softmax_center_teacher``, ``sinkhorn_knopp_teacher``, the centre update). Every back end must
match to 1e-5 relative (loss, student gradient, centre); Triton runs under TRITON_INTERPRET=1 on
tiny shapes with small blocks (K not a multiple of the block).
"""
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

import ibot_fast
import ibot_fast.fused_loss as fl
from ibot_fast.adapters import (DINOv2PatchLoss, IBOTPatchLoss, dense_row_weights,
                                masked_row_weights)
from ibot_fast.fused_loss import pairs_to_table, sinkhorn_knopp_center, soft_ce
from ibot_fast.loss import IBOTLoss, IBOTLossReference, masked_patch_rows, sinkhorn_knopp_targets

RTOL = 1e-5
BACKENDS = ["torch", "triton"]
K = 37  # never a multiple of the block


def rel_err(actual, expected):
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def dev(backend):
    """Triton runs on CUDA tensors where a GPU exists, else under TRITON_INTERPRET=1 on CPU."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(fl, "_default_chunk_rows", lambda K: 5)
    # the op's torch back end reads its own module's default
    monkeypatch.setattr(sys.modules["ibot_fast.kernels.soft_ce"], "_default_chunk_rows",
                        lambda K: 5)
    try:
        import ibot_fast.kernels.soft_ce_triton as ks
    except ImportError:  # pragma: no cover
        return
    monkeypatch.setattr(ks, "default_block_k", lambda K: 16)


def make_masks(seed, B=5, H=3):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, H, H, generator=g) < 0.4
    m[0] = False  # no masked token
    m[1] = True  # all masked
    m[2] = False
    m[2, 1, 2] = True  # exactly one
    return m


def rows(seed, M, scale_s=2.0, scale_t=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g) * scale_s, torch.randn(M, K, generator=g) * scale_t


# ---- transcriptions of the originals (plain torch, fp64) ------------------------------------
def lightly_forward(teacher_out, student_out, mask, center, teacher_temp, student_temp):
    """LightlySSL IBOTPatchLoss.forward, loss part."""
    teacher_softmax = torch.softmax((teacher_out - center) / teacher_temp, dim=-1)
    student_log_softmax = torch.log_softmax(student_out / student_temp, dim=-1)
    loss = -torch.sum(teacher_softmax * student_log_softmax, dim=-1)
    num_masked_per_image = mask.sum(dim=(1, 2), keepdim=True).clamp(min=1.0)
    weight = (1.0 / num_masked_per_image).expand_as(mask)[mask]
    return (loss * weight).sum() / mask.shape[0]


def lightly_center(center, teacher_out, momentum):
    """Lightly's Center(mode='mean').update, one process."""
    return center * momentum + teacher_out.mean(dim=0, keepdim=True) * (1 - momentum)


def dinov2_forward_masked(s, t, masks, student_temp, n_masked_patches=None, masks_weight=None):
    """DINOv2 iBOTPatchLoss.forward_masked (the torch lossfunc)."""
    loss = torch.sum(t * torch.log_softmax(s / student_temp, dim=-1), dim=-1)
    if masks_weight is None:
        masks_weight = ((1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1)
                        .expand_as(masks)[masks])
    if n_masked_patches is not None:
        loss = loss[:n_masked_patches]
    loss = loss * masks_weight
    return -loss.sum() / masks.shape[0]


def dinov2_forward(s, t, masks, student_temp):
    loss = torch.sum(t * torch.log_softmax(s / student_temp, dim=-1), dim=-1)
    loss = torch.sum(loss * masks.double(), dim=-1) / masks.sum(dim=-1).clamp(min=1.0)
    return -loss.mean()


def dinov2_softmax_center(t, center, teacher_temp):
    return torch.softmax((t - center) / teacher_temp, dim=-1)


def dinov2_sinkhorn(teacher_output, teacher_temp, n_iterations=3):
    """DINOv2 sinkhorn_knopp_teacher, one process (B = the number of rows)."""
    Q = torch.exp(teacher_output.double() / teacher_temp).t()
    B = Q.shape[1]
    Kp = Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= Kp
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def dinov2_center(center, teacher_patch_tokens, momentum):
    """DINOv2 reduce_center_update + apply_center_update, one process."""
    batch = torch.sum(teacher_patch_tokens.mean(1), dim=0, keepdim=True)
    return center * momentum + batch / len(teacher_patch_tokens) * (1 - momentum)


# ---- LightlySSL IBOTPatchLoss -------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_lightly_adapter_matches_lightly_formula(backend, small_blocks):
    kw = dict(teacher_temp=0.05, student_temp=0.12, center_momentum=0.8)
    d = dev(backend)
    fn = IBOTPatchLoss(K, backend=backend, **kw).to(d)
    center = torch.zeros(1, K, dtype=torch.float64)
    for step in range(2):  # the second step uses the updated centre
        mask = make_masks(seed=step)
        M = int(mask.sum())
        s, t = rows(step, M)
        leaf = s.double().requires_grad_(True)
        ref = lightly_forward(t.double(), leaf, mask, center, 0.05, 0.12)
        ref.backward()
        x = s.to(d).requires_grad_(True)
        loss = fn(t.to(d), x, mask.to(d))
        loss.backward()
        assert rel_err(loss, ref) < RTOL, (loss.item(), ref.item())
        assert rel_err(x.grad, leaf.grad) < RTOL
        center = lightly_center(center, t.double(), 0.8)
        assert rel_err(fn.center.center, center) < RTOL
    assert list(fn.state_dict()) == ["center.center"]  # Lightly's key
    assert torch.count_nonzero(center) == K


def test_lightly_adapter_no_masked_token_keeps_centre():
    fn = IBOTPatchLoss(K, backend="torch")
    fn.center.center.fill_(0.25)
    mask = torch.zeros(3, 2, 2, dtype=torch.bool)
    x = torch.zeros(0, K, requires_grad=True)
    loss = fn(torch.zeros(0, K), x, mask)
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == (0, K)
    assert torch.all(fn.center.center == 0.25)  # Lightly's mean over 0 rows would be NaN:
    assert torch.isnan(lightly_center(torch.zeros(1, K), torch.zeros(0, K), 0.9)).all()


@pytest.mark.parametrize("normalize", ["image", "masked_image", "token"])
def test_normalize_choices_match_their_formulas(normalize):
    mask = make_masks(seed=3)
    B = mask.shape[0]
    M = int(mask.sum())
    s, t = rows(7, M)
    fn = IBOTPatchLoss(K, normalize=normalize, backend="torch")
    loss = fn(t, s, mask)
    # per-token CE, then the three averages written per image
    ce = -(torch.softmax(t.double() / 0.04, -1) * torch.log_softmax(s.double() / 0.1, -1)).sum(-1)
    counts = mask.reshape(B, -1).sum(1).tolist()
    per_image, start = [], 0
    for c in counts:
        per_image.append(ce[start:start + c].mean() if c else None)
        start += c
    if normalize == "image":  # the reference: mean over all B images, empty ones as 0
        expect = sum(v for v in per_image if v is not None) / B
    elif normalize == "masked_image":
        kept = [v for v in per_image if v is not None]
        expect = sum(kept) / len(kept)
    else:
        expect = ce.mean()
    assert rel_err(loss, expect) < RTOL
    # the dense layout's weights are the same numbers at the masked positions
    dense = dense_row_weights(mask, normalize)
    assert torch.equal(dense[mask.reshape(-1)], masked_row_weights(mask, normalize=normalize))
    assert torch.all(dense[~mask.reshape(-1)] == 0)


def test_masked_row_weights_padding_and_reference_weights():
    mask = make_masks(seed=4)
    B = mask.shape[0]
    n = int(mask.sum())
    w = masked_row_weights(mask, rows=n + 4)  # a static bound: no host sync
    counts = mask.reshape(B, -1).sum(1)
    expect = (1.0 / counts.clamp(min=1).double() / B).repeat_interleave(counts)
    torch.testing.assert_close(w[:n].double(), expect, rtol=1e-7, atol=0)  # fp32 rounding
    assert torch.all(w[n:] == 0)
    # the same weights as the reference trainer's masked_patch_rows (one global crop)
    _, w_ref = masked_patch_rows([mask], ngcrops=1)
    torch.testing.assert_close(w[:n], w_ref, rtol=1e-7, atol=0)


# ---- DINOv2 iBOTPatchLoss -----------------------------------------------------------------------
def dinov2_batch(seed, pad=0, B=5, H=3):
    masks = make_masks(seed, B, H).reshape(B, H * H)
    n = int(masks.sum())
    s, t = rows(seed + 50, n + pad)
    return masks, n, s, t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["plain", "weights_padded", "tensor_n"])
def test_dinov2_forward_masked_matches_dinov2_formula(backend, variant, small_blocks):
    pad = 0 if variant == "plain" else 3
    masks, n, s, t = dinov2_batch(seed=11, pad=pad)
    g = torch.Generator().manual_seed(1)
    center = torch.randn(1, 1, K, generator=g) * 0.1
    targets = dinov2_softmax_center(t.double(), center.double(), 0.06)[0]
    targets[n:] = 0  # DINOv2's buffer beyond n_masked_patches is zeros
    weights = None
    if variant != "plain":
        weights = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    leaf = s.double().requires_grad_(True)
    ref = dinov2_forward_masked(leaf, targets, masks, 0.1,
                                n_masked_patches=n if pad else None, masks_weight=weights)
    ref.backward()
    d = dev(backend)
    fn = DINOv2PatchLoss(K, backend=backend).to(d)
    n_arg = None if variant == "plain" else (
        n if variant == "weights_padded" else torch.tensor([n], device=d))
    x = s.to(d).requires_grad_(True)
    loss = fn.forward_masked(x, targets.float().to(d), masks.to(d), n_masked_patches=n_arg,
                             masks_weight=weights.to(d) if variant == "weights_padded" else None)
    loss.backward()
    assert rel_err(loss, ref) < RTOL, (loss.item(), ref.item())
    assert rel_err(x.grad, leaf.grad) < RTOL
    assert torch.all(x.grad[n:] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dinov2_fused_teacher_logits_ema_and_centre_update(backend, small_blocks):
    """forward_masked(..., teacher_temp=) == softmax_center_teacher + forward_masked, over two
    steps with DINOv2's centre update in between."""
    d = dev(backend)
    fn = DINOv2PatchLoss(K, center_momentum=0.85, backend=backend).to(d)
    center = torch.zeros(1, 1, K, dtype=torch.float64)
    for step in range(2):
        masks, n, s, t = dinov2_batch(seed=20 + step, pad=2)
        targets = dinov2_softmax_center(t[:n].double(), center, 0.05)[0]
        leaf = s[:n].double().requires_grad_(True)
        ref = dinov2_forward_masked(leaf, targets, masks, 0.1)
        ref.backward()
        x = s.to(d).requires_grad_(True)
        loss = fn.forward_masked(x, t.to(d), masks.to(d),
                                 n_masked_patches=torch.tensor(n, device=d), teacher_temp=0.05)
        loss.backward()
        assert rel_err(loss, ref) < RTOL
        assert rel_err(x.grad[:n], leaf.grad) < RTOL and torch.all(x.grad[n:] == 0)
        # DINOv2's probabilities API agrees as well
        torch.testing.assert_close(
            fn.softmax_center_teacher(t[:n].unsqueeze(0).to(d), 0.05)[0].cpu(), targets.float(),
            rtol=1e-5, atol=1e-7)
        fn.update_center(t[:n].unsqueeze(0).to(d))  # DINOv2 passes [1, n, K]
        center = dinov2_center(center, t[:n].unsqueeze(0).double(), 0.85)
        fn.apply_center_update()
        assert rel_err(fn.center, center) < RTOL
    # padded rows with n_masked_patches give the same centre update
    twin = DINOv2PatchLoss(K)
    masks, n, s, t = dinov2_batch(seed=30, pad=4)
    twin.update_center(t, n_masked_patches=torch.tensor(n))
    twin.apply_center_update()
    assert rel_err(twin.center, dinov2_center(torch.zeros(1, 1, K).double(),
                                              t[:n].unsqueeze(0).double(), 0.9)) < RTOL


def test_dinov2_centre_update_without_masked_rows_keeps_centre():
    fn = DINOv2PatchLoss(K)
    fn.center.fill_(-0.5)
    fn.update_center(torch.zeros(1, 0, K))
    fn.apply_center_update()
    assert torch.all(fn.center == -0.5)
    assert torch.isnan(dinov2_center(torch.zeros(1, 1, K), torch.zeros(1, 0, K), 0.9)).all()
    fn.update_center(torch.randn(6, K), n_masked_patches=0)  # only padding
    fn.apply_center_update()
    assert torch.all(fn.center == -0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dinov2_dense_forward_matches_dinov2_formula(backend, small_blocks):
    B, H = 4, 3
    masks = make_masks(seed=6, B=B, H=H).reshape(B, H * H)
    g = torch.Generator().manual_seed(6)
    s = torch.randn(B, H * H, K, generator=g) * 2
    targets = torch.softmax(torch.randn(B, H * H, K, generator=g) * 5, dim=-1)
    leaf = s.double().requires_grad_(True)
    ref = dinov2_forward(leaf, targets.double(), masks, 0.1)
    ref.backward()
    d = dev(backend)
    x = s.to(d).requires_grad_(True)
    loss = DINOv2PatchLoss(K, backend=backend).to(d)(x, targets.to(d), masks.to(d))
    loss.backward()
    assert rel_err(loss, ref) < RTOL and rel_err(x.grad, leaf.grad) < RTOL


# ---- Sinkhorn-Knopp -----------------------------------------------------------------------------
@pytest.mark.parametrize("T,tau,iters", [(23, 0.05, 3), (6, 0.07, 1), (40, 0.04, 5)])
def test_sinkhorn_center_equals_dinov2_transcription(T, tau, iters):
    g = torch.Generator().manual_seed(T)
    t = torch.randn(T, K, generator=g) * 0.8
    expect = dinov2_sinkhorn(t, tau, iters)
    c = sinkhorn_knopp_center(t, tau, iters, chunk_rows=7)  # several chunks
    got = torch.softmax((t.double() - c.double()) / tau, dim=-1)
    assert rel_err(got, expect) < RTOL
    assert rel_err(sinkhorn_knopp_targets(t, tau, iters), expect) < RTOL  # the eager reference
    torch.testing.assert_close(got.sum(-1), torch.ones(T, dtype=torch.float64))  # samples


def test_sinkhorn_marginals_and_no_overflow():
    g = torch.Generator().manual_seed(0)
    T, tau = 60, 0.05
    t = torch.randn(T, K, generator=g) * 0.5 + torch.linspace(0, 1, K)  # skewed prototypes
    # converged: every sample a distribution, every prototype T/K of the mass
    c = sinkhorn_knopp_center(t, tau, n_iterations=300)
    q = torch.softmax((t.double() - c.double()) / tau, dim=-1)
    torch.testing.assert_close(q.sum(1), torch.ones(T, dtype=torch.float64))
    torch.testing.assert_close(q.sum(0), torch.full((K,), T / K, dtype=torch.float64),
                               rtol=1e-4, atol=0)
    plain = torch.softmax(t.double() / tau, dim=-1).sum(0)
    assert (plain.max() - plain.min()) > 0.5  # without SK the prototypes really are unequal
    # logits/tau up to ~200: exp overflows fp32 in DINOv2's code; fp64 is the ground truth
    big = t * 8
    assert torch.isinf(torch.exp(big / tau)).any()
    expect = dinov2_sinkhorn(big.double(), tau)
    c = sinkhorn_knopp_center(big, tau)
    got = torch.softmax((big.double() - c.double()) / tau, dim=-1)
    assert torch.isfinite(c).all() and rel_err(got, expect) < RTOL
    assert rel_err(sinkhorn_knopp_targets(big, tau), expect) < RTOL


def test_sinkhorn_masked_variant_rows_and_padding():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(15, K, generator=g)
    valid = torch.rand(15, generator=g) < 0.6
    expect = dinov2_sinkhorn(t[valid], 0.06)
    c = sinkhorn_knopp_center(t, 0.06, row_valid_T=valid)
    got = torch.softmax((t.double() - c.double()) / 0.06, dim=-1)[valid]
    assert rel_err(got, expect) < RTOL
    # DINOv2's call with n_masked_patches_tensor and a padded buffer
    fn = DINOv2PatchLoss(K)
    q = fn.sinkhorn_knopp_teacher(t, 0.06, n_masked_patches_tensor=torch.tensor([9]))
    assert rel_err(q[:9], dinov2_sinkhorn(t[:9], 0.06)) < RTOL and torch.all(q[9:] == 0)
    # no valid row: a zero centre, not NaN
    assert torch.all(sinkhorn_knopp_center(t, 0.06, row_valid_T=torch.zeros(15, dtype=bool)) == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dinov2_fused_sinkhorn(backend, small_blocks):
    masks, n, s, t = dinov2_batch(seed=40, pad=3)
    targets = dinov2_sinkhorn(t[:n], 0.05)
    leaf = s[:n].double().requires_grad_(True)
    ref = dinov2_forward_masked(leaf, targets, masks, 0.1)
    ref.backward()
    d = dev(backend)
    fn = DINOv2PatchLoss(K, center="sinkhorn_knopp", backend=backend).to(d)
    x = s.to(d).requires_grad_(True)
    loss = fn.forward_masked(x, t.to(d), masks.to(d), n_masked_patches=torch.tensor([n], device=d),
                             teacher_temp=0.05)
    loss.backward()
    assert rel_err(loss, ref) < RTOL and rel_err(x.grad[:n], leaf.grad) < RTOL
    assert torch.all(x.grad[n:] == 0) and torch.all(fn.center == 0)


# ---- IBOTLoss(center="sinkhorn_knopp") ----------------------------------------------------------
K2, N = 45, 9


def ibot_batch(seed, ng, nl, B):
    g = torch.Generator().manual_seed(seed)
    masks = [make_masks(seed + q, B, 3) for q in range(ng)]
    return dict(s_cls=torch.randn(ng * B, K, generator=g) * 2,
                s_patch=torch.randn(ng * B, N, K2, generator=g) * 2,
                s_local=torch.randn(nl * B, K, generator=g) * 2 if nl else None,
                t_cls=torch.randn(ng * B, K, generator=g) * 0.3,
                t_patch=torch.randn(ng * B, N, K2, generator=g) * 0.3,
                masks=masks + [torch.ones(B, 2, 2, dtype=torch.bool)] * nl)


def ibot_run(fn, b, epoch, selected=False, max_rows=None, d="cpu"):
    b = {k: ([m.to(d) for m in v] if k == "masks" else v if v is None else v.to(d))
         for k, v in b.items()}
    leaves = {k: b[k].clone().requires_grad_(True) for k in ("s_cls", "s_patch", "s_local")
              if b[k] is not None}
    if selected:
        idx, w = masked_patch_rows(b["masks"], fn.ngcrops, max_rows=max_rows)
        out = fn.forward_selected(leaves["s_cls"], b["t_cls"], leaves.get("s_local"),
                                  leaves["s_patch"].reshape(-1, K2)[idx],
                                  b["t_patch"].reshape(-1, K2)[idx], w,
                                  b["t_patch"].reshape(-1, K2).mean(0), epoch)
    else:
        out = fn((leaves["s_cls"], leaves["s_patch"]), (b["t_cls"], b["t_patch"]),
                 leaves.get("s_local"), b["masks"], epoch)
    out["loss"].backward()
    return out, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("backend,selected", [("torch", False), ("triton", False),
                                              ("torch", True)])
def test_ibot_loss_sinkhorn_backends_match_eager(backend, selected, small_blocks):
    ng, nl, B, epoch = 2, 1, 5, 2
    args = (K, K2, ng, nl, 0.04, 0.07, 0.04, 0.06, 4, 10)
    ref = IBOTLossReference(*args, center="sinkhorn_knopp")
    d = dev(backend)
    fast = IBOTLoss(*args, center="sinkhorn_knopp", backend=backend).to(d)
    b = ibot_batch(seed=8, ng=ng, nl=nl, B=B)
    (out, grads), (rout, rgrads) = (ibot_run(fast, b, epoch, selected, max_rows=60, d=d),
                                    ibot_run(ref, b, epoch))
    for key in ("cls", "patch", "loss"):
        assert rel_err(out[key], rout[key]) < RTOL, key
    for key in rgrads:
        assert rel_err(grads[key], rgrads[key]) < RTOL, key
    for fn in (ref, fast):  # no EMA centre with Sinkhorn-Knopp
        assert torch.all(fn.center == 0) and torch.all(fn.center2 == 0)
    # the reference's [CLS] term from the transcribed targets (not from our code)
    tau = ref.temperatures(epoch)[0]
    p = dinov2_sinkhorn(b["t_cls"], tau).view(ng, B, K)
    logp = torch.log_softmax(torch.cat([b["s_cls"], b["s_local"]]).double() / 0.1, -1)
    logp = logp.view(ng + nl, B, K)
    terms = [-(p[q] * logp[v]).sum(-1).mean() for q in range(ng) for v in range(ng + nl)
             if v != q]
    assert rel_err(out["cls"], sum(terms) / len(terms)) < RTOL
    # no masked token anywhere: a zero patch term, no NaN from an empty Sinkhorn-Knopp
    b0 = dict(b, masks=[torch.zeros_like(m) for m in b["masks"][:ng]] + b["masks"][ng:])
    for fn, kw in ((ref, {}), (fast, dict(selected=selected, max_rows=60, d=d))):
        out0, grads0 = ibot_run(fn, b0, epoch, **kw)
        assert out0["patch"].item() == 0.0 and torch.isfinite(out0["loss"])
        assert torch.all(grads0["s_patch"] == 0)
    # and it differs from EMA centring (the option is not a no-op)
    ema = IBOTLossReference(*args)
    assert rel_err(ibot_run(ema, b, epoch)[0]["cls"], rout["cls"]) > 1e-3


# ---- pairs_to_table -----------------------------------------------------------------------------
def test_pairs_to_table_matches_loop_and_soft_ce():
    g = torch.Generator().manual_seed(0)
    M, T, R = 7, 5, 16
    st = torch.randint(0, M, (R,), generator=g)
    st[:3] = 2  # a row with several pairs
    st[st == 6] = 5  # a row without pairs
    tt = torch.randint(0, T, (R,), generator=g)
    w = torch.rand(R, generator=g) + 0.1
    partner, weight = pairs_to_table(st, tt, w, M)
    P = int(torch.bincount(st, minlength=M).max())
    assert partner.shape == weight.shape == (M, P)
    fill = [0] * M
    for r in range(R):  # the loop it replaces
        i = int(st[r])
        assert partner[i, fill[i]] == tt[r] and weight[i, fill[i]] == w[r]
        fill[i] += 1
    for i in range(M):
        assert torch.all(weight[i, fill[i]:] == 0) and torch.all(partner[i, fill[i]:] == 0)
    # with a given (larger) P nothing changes but the padding; and the loss is the pair sum
    partner9, weight9 = pairs_to_table(st, tt, w, M, P=P + 2)
    assert torch.equal(weight9[:, :P], weight) and torch.all(weight9[:, P:] == 0)
    s, t = torch.randn(M, K, generator=g), torch.randn(T, K, generator=g)
    c = torch.zeros(K)
    loss = soft_ce(s, t, partner9, weight9, c, 0.1, 0.04, backend="torch")
    flat = -(w.double()[:, None] * torch.softmax(t.double()[tt] / 0.04, -1)
             * torch.log_softmax(s.double()[st] / 0.1, -1)).sum()
    assert rel_err(loss, flat) < RTOL


def test_pairs_to_table_bad_input():
    st, tt, w = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 3]), torch.ones(3)
    with pytest.raises(ValueError, match="more than P=1"):
        pairs_to_table(st, tt, w, M=2, P=1)
    with pytest.raises(ValueError, match="student_R has indices outside"):
        pairs_to_table(st, tt, w, M=1)
    with pytest.raises(ValueError, match="same length"):
        pairs_to_table(st, tt[:2], w, M=2)
    with pytest.raises(ValueError, match="student_R must be a 1-D integer"):
        pairs_to_table(st.float(), tt, w, M=2)


# ---- surface and bad input ----------------------------------------------------------------------
def test_adapter_surface_and_bad_input():
    assert ibot_fast.IBOTPatchLoss is IBOTPatchLoss and ibot_fast.DINOv2PatchLoss is DINOv2PatchLoss
    mask = make_masks(seed=1)
    M = int(mask.sum())
    s, t = rows(1, M)
    fn = IBOTPatchLoss(K, backend="torch")
    with pytest.raises(ValueError, match="center_mode"):
        IBOTPatchLoss(K, center_mode="median")
    with pytest.raises(ValueError, match="normalize"):
        IBOTPatchLoss(K, normalize="batch")
    with pytest.raises(ValueError, match="backend"):
        DINOv2PatchLoss(K, backend="cuda")
    with pytest.raises(ValueError, match="center must be"):
        DINOv2PatchLoss(K, center="centering")
    with pytest.raises(ValueError, match="center must be"):
        IBOTLoss(K, K2, 2, 1, 0.04, 0.07, 0.04, 0.07, 2, 10, center="mean")
    with pytest.raises(ValueError, match="student_out"):
        fn(t, s[:, :-1], mask)
    with pytest.raises(ValueError, match="teacher_out"):
        fn(t[:-1], s, mask)
    with pytest.raises(ValueError, match="mask must be a bool"):
        fn(t, s, mask.float())
    with pytest.raises(ValueError, match="masked tokens but the logits have"):
        IBOTPatchLoss(K, backend="torch", check_finite=True)(t[:-1], s[:-1], mask)
    bad = t.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="teacher_TK contains NaN"):
        IBOTPatchLoss(K, backend="torch", check_finite=True)(bad, s, mask)
    d = DINOv2PatchLoss(K, normalize="token")
    with pytest.raises(ValueError, match="masks_weight"):
        d.forward_masked(s, t, mask.reshape(5, -1), masks_weight=torch.ones(M))
    with pytest.raises(ValueError, match="n_masked_patches"):
        d.forward_masked(s, t, mask.reshape(5, -1), n_masked_patches=torch.tensor([1.5]))
    with pytest.raises(ValueError, match="row_valid_T"):
        sinkhorn_knopp_center(t, 0.05, row_valid_T=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="n_iterations"):
        sinkhorn_knopp_center(t, 0.05, n_iterations=0)


# ---- world size 2 (gloo, two spawned processes) -------------------------------------------------
def _dist_worker(rank, store_path, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                                         world_size=2)
    try:
        g = torch.Generator().manual_seed(0)
        t = torch.randn(20, K, generator=g)
        valid = torch.rand(20, generator=g) < 0.7
        half = slice(0, 12) if rank == 0 else slice(12, 20)  # unequal row counts
        c = sinkhorn_knopp_center(t[half], 0.05, row_valid_T=valid[half])
        c_ref = sinkhorn_knopp_targets(t[half][valid[half]], 0.05)
        lightly = IBOTPatchLoss(K)  # rank 1 has no masked row: drops out of the mean
        lightly.center.update(t[:5] if rank == 0 else t[:0])
        dino = DINOv2PatchLoss(K)
        dino.update_center(t[half].unsqueeze(0))
        dino.apply_center_update()
        torch.save(dict(c=c, c_ref=c_ref, lightly=lightly.center.center.clone(),
                        dino=dino.center.clone()), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # 5-15 s: two spawned interpreters
def test_world_size_two_sinkhorn_and_centres(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_dist_worker, args=(r, str(tmp_path / "store"), str(tmp_path)),
                         daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.terminate()
        p.join(5)
    assert not hung and all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    g = torch.Generator().manual_seed(0)
    t = torch.randn(20, K, generator=g)
    valid = torch.rand(20, generator=g) < 0.7
    expect = dinov2_sinkhorn(t[valid], 0.05)  # one process, all valid rows
    for r, half in ((0, slice(0, 12)), (1, slice(12, 20))):
        got = torch.softmax((t[half].double() - res[r]["c"].double()) / 0.05, -1)[valid[half]]
        assert rel_err(got, expect[:int(valid[:12].sum())] if r == 0
                       else expect[int(valid[:12].sum()):]) < RTOL
        assert rel_err(res[r]["c_ref"], expect[:int(valid[:12].sum())] if r == 0
                       else expect[int(valid[:12].sum()):]) < RTOL
        torch.testing.assert_close(res[r]["lightly"], 0.1 * t[:5].mean(0, keepdim=True))
        # DINOv2: the mean of the two ranks' means (not the mean over all 20 rows)
        torch.testing.assert_close(res[r]["dino"].view(K),
                                   0.1 * (t[:12].mean(0) + t[12:].mean(0)) / 2)
