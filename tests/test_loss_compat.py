"""The adapters (ibot_fast/loss/compat.py, alias ibot_fast/adapters.py) against transcriptions
of the originals.

Ground truths are transcriptions written here in plain torch (fp64), from the originals'
formulas: LightlySSL ``lightly/loss/ibot_loss.py`` (``IBOTPatchLoss.forward`` with and without
its forward-time ``teacher_temp``, and the "mean" ``Center``) and DINOv2
``dinov2/loss/ibot_patch_loss.py`` (``forward``, ``forward_masked``, ``softmax_center_teacher``,
``sinkhorn_knopp_teacher``, the centre update). Every back end must match to 1e-5 relative
(loss, student gradient, centre); Triton runs under TRITON_INTERPRET=1 on tiny shapes with small
blocks (K not a multiple of the block).
"""
import pytest
import torch

import ibot_fast
from helpers import small_blocks  # noqa: F401 - fixture
from helpers import device_for, dinov2_sinkhorn, make_masks, rel_err
from ibot_fast.adapters import (DINOv2PatchLoss, IBOTPatchLoss, dense_row_weights,
                                masked_row_weights)
from ibot_fast.fused_loss import sinkhorn_knopp_center
from ibot_fast.loss import IBOTLoss, masked_patch_rows

RTOL = 1e-5
BACKENDS = ["torch", "triton"]
K = 37  # never a multiple of the block
K2 = 45


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


def dinov2_center(center, teacher_patch_tokens, momentum):
    """DINOv2 reduce_center_update + apply_center_update, one process."""
    batch = torch.sum(teacher_patch_tokens.mean(1), dim=0, keepdim=True)
    return center * momentum + batch / len(teacher_patch_tokens) * (1 - momentum)


# ---- LightlySSL IBOTPatchLoss -------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_lightly_adapter_matches_lightly_formula(backend, small_blocks):
    kw = dict(teacher_temp=0.05, student_temp=0.12, center_momentum=0.8)
    d = device_for(backend)
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



@pytest.mark.parametrize("backend", BACKENDS)
def test_lightly_forward_time_teacher_temp(backend, small_blocks):
    """LightlySSL >= 1.5.21: ``forward(teacher_out, student_out, mask, teacher_temp=None)``, the
    teacher temperature of the step from the caller's warm-up schedule; None (or no keyword)
    uses the constructor's. Called as Lightly's examples call it (all keywords), then
    positionally, then with a tensor temperature; each step against the transcription with the
    temperature that step used, centre updated every step."""
    d = device_for(backend)
    fn = IBOTPatchLoss(K, teacher_temp=0.05, student_temp=0.12, center_momentum=0.8,
                       backend=backend).to(d)
    center = torch.zeros(1, K, dtype=torch.float64)
    steps = [("keywords", 0.045), ("none", None), ("positional", 0.07), ("tensor", 0.06),
             ("absent", None)]
    losses = []
    for step, (how, temp) in enumerate(steps):
        mask = make_masks(seed=10 + step)
        M = int(mask.sum())
        s, t = rows(20 + step, M)
        leaf = s.double().requires_grad_(True)
        used = 0.05 if temp is None else temp
        ref = lightly_forward(t.double(), leaf, mask, center, used, 0.12)
        ref.backward()
        x = s.to(d).requires_grad_(True)
        td, md = t.to(d), mask.to(d)
        if how == "keywords":
            loss = fn(teacher_out=td, student_out=x, mask=md, teacher_temp=temp)
        elif how == "none":
            loss = fn(teacher_out=td, student_out=x, mask=md, teacher_temp=None)
        elif how == "positional":
            loss = fn(td, x, md, temp)
        elif how == "tensor":
            loss = fn(td, x, md, teacher_temp=torch.tensor(temp))
        else:
            loss = fn(td, x, md)
        loss.backward()
        assert rel_err(loss, ref) < RTOL, (how, loss.item(), ref.item())
        assert rel_err(x.grad, leaf.grad) < RTOL, how
        center = lightly_center(center, t.double(), 0.8)
        assert rel_err(fn.center.center, center) < RTOL, how
        losses.append(loss.item())
    # the keyword is not ignored: the same batch at another temperature gives another loss
    mask = make_masks(seed=10)
    s, t = rows(20, int(mask.sum()))
    twin = IBOTPatchLoss(K, teacher_temp=0.05, student_temp=0.12, backend="torch")
    assert abs(twin(t, s, mask, teacher_temp=0.045).item()
               - IBOTPatchLoss(K, teacher_temp=0.05, student_temp=0.12,
                               backend="torch")(t, s, mask).item()) > 1e-4
    with pytest.raises(ValueError, match="teacher_temp must be > 0"):
        twin(t, s, mask, teacher_temp=0.0)


def test_lightly_constructor_defaults_attributes_and_pinned_value():
    """Lightly's defaults (``IBOTPatchLoss()`` as its DINOv2 example builds it), its attribute
    names, and the value Lightly's own test pins (computed there with DINOv2's code)."""
    fn = IBOTPatchLoss(backend="torch")
    assert fn.output_dim == 65536 and fn.center.value.shape == (1, 65536)
    assert (fn.teacher_temp, fn.student_temp, fn.center.momentum) == (0.04, 0.1, 0.9)
    assert fn.center.size == (1, 65536) and fn.center.dim == (0,)
    assert fn.student_temperature == 0.1  # the attribute's name before LightlySSL 1.5.21
    fn.student_temperature = 0.2
    assert fn.student_temp == 0.2
    crit = IBOTPatchLoss(output_dim=2, teacher_temp=0.1, student_temp=0.2, center_mode="mean",
                         center_momentum=0.9, backend="torch")
    teacher_out = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    student_out = torch.tensor([[0.7, 0.8], [0.9, 1.0], [1.1, 1.2]])
    mask = torch.tensor([[[True, False], [True, False]], [[False, False], [False, True]],
                         [[False, False], [False, False]]])
    loss = crit(teacher_out=teacher_out, student_out=student_out, mask=mask)
    assert loss.item() == pytest.approx(0.4057, rel=1e-4)
    torch.testing.assert_close(crit.center.value, 0.1 * teacher_out.mean(0, keepdim=True))


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
    d = device_for(backend)
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
    d = device_for(backend)
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
    d = device_for(backend)
    x = s.to(d).requires_grad_(True)
    loss = DINOv2PatchLoss(K, backend=backend).to(d)(x, targets.to(d), masks.to(d))
    loss.backward()
    assert rel_err(loss, ref) < RTOL and rel_err(x.grad, leaf.grad) < RTOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_dinov2_fused_sinkhorn(backend, small_blocks):
    masks, n, s, t = dinov2_batch(seed=40, pad=3)
    targets = dinov2_sinkhorn(t[:n], 0.05)
    leaf = s[:n].double().requires_grad_(True)
    ref = dinov2_forward_masked(leaf, targets, masks, 0.1)
    ref.backward()
    d = device_for(backend)
    fn = DINOv2PatchLoss(K, center="sinkhorn_knopp", backend=backend).to(d)
    x = s.to(d).requires_grad_(True)
    loss = fn.forward_masked(x, t.to(d), masks.to(d), n_masked_patches=torch.tensor([n], device=d),
                             teacher_temp=0.05)
    loss.backward()
    assert rel_err(loss, ref) < RTOL and rel_err(x.grad[:n], leaf.grad) < RTOL
    assert torch.all(x.grad[n:] == 0) and torch.all(fn.center == 0)


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
