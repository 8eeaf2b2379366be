"""The iBOT loss modules against an independent fp64 transcription of their maths.

``transcribed_ibot_loss`` (tests/helpers.py) is written from the maths in the docstring of
ibot_fast/loss/reference.py as plain loops over the teacher crop q, the student crop v and the
image b; it shares no code with ibot_fast.loss. ``IBOTLossReference`` (the dense eager ground
truth of every fast path) and ``IBOTLoss`` (default back end) run in fp32 and must match it to
1e-5 (relative) in the loss terms, in the gradients of every student input and in both centres
after the update.
"""
import pytest
import torch

from helpers import (TR_K, TR_K2, TR_N, TR_RTOL, check_against_transcription, rel_err,
                     run_module, run_transcription, transcription_batch)
from ibot_fast.loss import IBOTLoss, IBOTLossReference

RTOL = TR_RTOL
K, K2, N = TR_K, TR_K2, TR_N


def make_loss(ng, nl, loss_cls=IBOTLoss, **kw):
    # 0.04 -> 0.07 [CLS] and 0.04 -> 0.06 patch over 4 warm-up epochs of 10.
    return loss_cls(K, K2, ng, nl, 0.04, 0.07, 0.04, 0.06, 4, 10, **kw)


# ---- parity with the transcription -------------------------------------------------------------
@pytest.mark.parametrize("loss_cls", [IBOTLossReference, IBOTLoss])
@pytest.mark.parametrize("ng,nl,B,mask_shape", [
    (2, 0, 3, "grid"),  # no local crops
    (2, 3, 4, "grid"),  # with local crops
    (2, 2, 4, "flat"),  # masks given as [B, N]
    (1, 2, 3, "grid"),  # a single global crop: only global-teacher / local-student pairs
])
@pytest.mark.parametrize("epoch", [0, 2, 3, 7])  # inside the warm-up (0, 2), its end (3), after
def test_matches_transcription(loss_cls, ng, nl, B, mask_shape, epoch):
    loss_fn = make_loss(ng, nl, loss_cls=loss_cls)
    g = torch.Generator().manual_seed(epoch)  # non-zero centres, as after some steps
    loss_fn.load_state_dict({"center": torch.randn(1, K, generator=g) * 0.1,
                             "center2": torch.randn(1, 1, K2, generator=g) * 0.1})
    tau, tau2 = loss_fn.temperatures(epoch)
    batch = transcription_batch(seed=100 * ng + 10 * nl + epoch, ng=ng, nl=nl, B=B,
                                mask_shape=mask_shape)
    check_against_transcription(loss_fn, batch, epoch, ng, nl, tau, tau2)


@pytest.mark.parametrize("loss_cls", [IBOTLossReference, IBOTLoss])
@pytest.mark.parametrize("epoch", [1, 2, 3, 5, 9])
def test_matches_transcription_mim_start_and_lambdas(loss_cls, epoch):
    ng, nl, B = 2, 2, 4
    kw = dict(lambda1=0.7, lambda2=1.9, student_temp=0.12, center_momentum=0.8,
              center_momentum2=0.95)
    loss_fn = make_loss(ng, nl, loss_cls=loss_cls, mim_start_epoch=3, **kw)
    tau, tau2 = loss_fn.temperatures(epoch)
    expected_tau2 = {1: 0.04, 2: 0.04, 3: 0.04, 5: 0.04 + 2 * 0.02 / 3, 9: 0.06}[epoch]
    assert tau2 == pytest.approx(expected_tau2, rel=1e-12)  # held until epoch 3, then ramps
    batch = transcription_batch(seed=7 + epoch, ng=ng, nl=nl, B=B)
    check_against_transcription(loss_fn, batch, epoch, ng, nl, tau, tau2, lambda1=0.7,
                                lambda2=1.9, student_temp=0.12, m=0.8, m2=0.95)


@pytest.mark.parametrize("loss_cls", [IBOTLossReference, IBOTLoss])
def test_centres_carry_over_steps(loss_cls):
    """Step 1 uses zero centres; each later step uses the centres left by the previous one."""
    ng, nl, B = 2, 2, 3
    loss_fn = make_loss(ng, nl, loss_cls=loss_cls)
    assert torch.equal(loss_fn.center, torch.zeros(1, K))
    assert torch.equal(loss_fn.center2, torch.zeros(1, 1, K2))
    c, c2 = torch.zeros(K, dtype=torch.float64), torch.zeros(K2, dtype=torch.float64)
    for step, epoch in enumerate([0, 0, 5]):
        batch = transcription_batch(seed=50 + step, ng=ng, nl=nl, B=B)
        tau, tau2 = loss_fn.temperatures(epoch)
        out, _ = run_module(loss_fn, batch, epoch)
        ref, _, c, c2 = run_transcription(batch, c, c2, tau, tau2, ng, nl)
        assert rel_err(out["loss"], ref["loss"]) < RTOL, step
        assert rel_err(loss_fn.center.reshape(-1), c) < RTOL
        assert rel_err(loss_fn.center2.reshape(-1), c2) < RTOL
        if step == 0:
            # the check can fail: the same step with the *updated* centres gives another loss
            wrong, *_ = run_transcription(batch, c, c2, tau, tau2, ng, nl)
            assert rel_err(out["loss"], wrong["loss"]) > 1e-3


@pytest.mark.parametrize("loss_cls", [IBOTLossReference, IBOTLoss])
def test_unmasked_tokens_get_zero_gradient_and_teacher_none(loss_cls):
    ng, nl, B = 2, 1, 3
    batch = transcription_batch(seed=3, ng=ng, nl=nl, B=B)
    t_cls = batch["t_cls"].clone().requires_grad_(True)
    t_patch = batch["t_patch"].clone().requires_grad_(True)
    s_patch = batch["s_patch"].clone().requires_grad_(True)
    loss_fn = make_loss(ng, nl, loss_cls=loss_cls)
    out = loss_fn((batch["s_cls"], s_patch), (t_cls, t_patch), batch["s_local"], batch["masks"], 0)
    out["loss"].backward()
    assert t_cls.grad is None and t_patch.grad is None
    mask_rows = torch.cat([batch["masks"][q].reshape(B, N) for q in range(ng)])  # crop-major
    assert torch.all(s_patch.grad[~mask_rows] == 0)
    assert torch.all(s_patch.grad[mask_rows].abs().sum(-1) > 0)
    # image 0 of each global crop has no masked token: it adds nothing but counts in the mean
    assert torch.all(s_patch.grad[0] == 0) and torch.all(s_patch.grad[B] == 0)


@pytest.mark.parametrize("loss_cls", [IBOTLossReference, IBOTLoss])
def test_half_precision_inputs_compute_in_fp32(loss_cls):
    ng, nl, B = 2, 2, 3
    batch = transcription_batch(seed=11, ng=ng, nl=nl, B=B)
    out16, grads16 = run_module(make_loss(ng, nl, loss_cls=loss_cls), batch, 2,
                                dtype=torch.bfloat16)
    same_bf16_values = {k: (v.bfloat16().float() if torch.is_tensor(v) and v.is_floating_point()
                            else v) for k, v in batch.items()}
    out32, _ = run_module(make_loss(ng, nl, loss_cls=loss_cls), same_bf16_values, 2)
    for key in ("cls", "patch", "loss"):
        assert out16[key].dtype == torch.float32
        assert rel_err(out16[key], out32[key]) < 1e-6  # same bf16 values, fp32 maths
    assert all(g.dtype == torch.bfloat16 for g in grads16.values())
