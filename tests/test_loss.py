"""IBOTLoss against an independent fp64 transcription of reference-semantics.md section 2.

`transcribed_ibot_loss` below is written from the spec text as plain loops over the teacher
crop q, the student crop v and the image b; it shares no code with ibot_fast.loss. IBOTLoss
runs in fp32 and must match it to 1e-5 (relative) in the loss terms, in the gradients of every
student input and in both centres after the update.
"""
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from ibot_fast.loss import IBOTLoss

RTOL = 1e-5
K, K2, N = 64, 37, 16  # K2 deliberately not a power of two; N = 4x4 patch grid


# ---- the independent transcription (fp64) ----------------------------------------------------
def transcribed_ibot_loss(s_cls, s_patch, s_local, t_cls, t_patch, masks, center, center2,
                          tau, tau2, ng, nl, lambda1=1.0, lambda2=1.0, student_temp=0.1,
                          m=0.9, m2=0.9):
    """Section 2.2/2.3 as loops. Crop-major rows: row = crop * B + b.

    Returns (cls, patch, loss, new_center [K], new_center2 [K2]). Autograd runs through the
    student inputs, whatever their dtype (use fp64 leaves for the ground truth)."""
    nc = ng + nl
    B = s_cls.shape[0] // ng
    student_cls_rows = torch.cat([s_cls, s_local]) if nl > 0 else s_cls
    c, c2 = center.reshape(-1).double(), center2.reshape(-1).double()

    cls_sum, n_cls_terms = 0.0, 0
    patch_sum, n_patch_terms = 0.0, 0
    for q in range(ng):
        for v in range(nc):
            if v == q:  # patch / MIM term, same view
                image_losses = []
                for b in range(B):
                    T = torch.softmax((t_patch[q * B + b].double() - c2) / tau2, dim=-1)  # [N, K2]
                    S = torch.log_softmax(s_patch[v * B + b] / student_temp, dim=-1)  # [N, K2]
                    token_ce = -(T * S).sum(dim=-1)  # [N]
                    mk = masks[v][b].reshape(-1).double()
                    image_losses.append((token_ce * mk).sum() / max(mk.sum().item(), 1.0))
                patch_sum = patch_sum + sum(image_losses) / B  # mean over ALL images
                n_patch_terms += 1
            else:  # [CLS] term, v != q (cross-global and global-teacher/local-student)
                image_losses = []
                for b in range(B):
                    P = torch.softmax((t_cls[q * B + b].double() - c) / tau, dim=-1)
                    L = torch.log_softmax(student_cls_rows[v * B + b] / student_temp, dim=-1)
                    image_losses.append(-(P * L).sum())
                cls_sum = cls_sum + sum(image_losses) / B
                n_cls_terms += 1
    assert n_cls_terms == ng * nc - ng and n_patch_terms == ng
    loss_cls = cls_sum / n_cls_terms * lambda1
    loss_patch = patch_sum / n_patch_terms * lambda2

    # centres: plain means over all rows (and all N tokens), then the EMA
    rows = t_cls.shape[0]
    cls_mean = sum(t_cls[r].double() for r in range(rows)) / rows
    patch_mean = sum(t_patch[r].double().mean(dim=0) for r in range(rows)) / rows
    new_c = m * c + (1 - m) * cls_mean
    new_c2 = m2 * c2 + (1 - m2) * patch_mean
    return loss_cls, loss_patch, loss_cls + loss_patch, new_c, new_c2


# ---- helpers -----------------------------------------------------------------------------------
def make_batch(seed, ng, nl, B, mask_shape="grid", special_masks=True):
    """Random logits (crop-major), masks for all crops (locals get 2x2 masks, never read)."""
    g = torch.Generator().manual_seed(seed)
    batch = dict(
        s_cls=torch.randn(ng * B, K, generator=g) * 2.0,
        s_patch=torch.randn(ng * B, N, K2, generator=g) * 2.0,
        s_local=torch.randn(nl * B, K, generator=g) * 2.0 if nl > 0 else None,
        t_cls=torch.randn(ng * B, K, generator=g) * 0.3 + 0.1,
        t_patch=torch.randn(ng * B, N, K2, generator=g) * 0.3 - 0.05,
    )
    masks = []
    for v in range(ng):
        mk = torch.rand(B, 4, 4, generator=g) < 0.4
        if special_masks:
            mk[0] = False  # an image with zero masked tokens
            mk[1] = True  # an image with every token masked
            if B > 2:
                mk[2] = False  # an image with exactly one masked token
                mk[2, v % 4, 3 - v % 4] = True
        masks.append(mk.reshape(B, N) if mask_shape == "flat" else mk)
    masks += [torch.ones(B, 2, 2, dtype=torch.bool) for _ in range(nl)]
    batch["masks"] = masks
    return batch


def rel_err(actual, expected):
    """max |a - e| / max |e|: 'relative' for scalars, scale-relative for tensors."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def run_module(loss_fn, batch, epoch, dtype=torch.float32):
    """IBOTLoss on leaf copies of the student inputs; returns (out, grads dict)."""
    leaves = {k: batch[k].detach().to(dtype, copy=True).requires_grad_(True)
              for k in ("s_cls", "s_patch", "s_local") if batch[k] is not None}
    out = loss_fn((leaves["s_cls"], leaves["s_patch"]),
                  (batch["t_cls"].to(dtype), batch["t_patch"].to(dtype)),
                  leaves.get("s_local"), batch["masks"], epoch)
    out["loss"].backward()
    return out, {k: t.grad for k, t in leaves.items()}


def run_transcription(batch, center, center2, tau, tau2, ng, nl, **kw):
    leaves = {k: batch[k].detach().double().requires_grad_(True)
              for k in ("s_cls", "s_patch", "s_local") if batch[k] is not None}
    cls, patch, loss, c, c2 = transcribed_ibot_loss(
        leaves["s_cls"], leaves["s_patch"], leaves.get("s_local"), batch["t_cls"],
        batch["t_patch"], batch["masks"], center, center2, tau, tau2, ng, nl, **kw)
    loss.backward()
    return dict(cls=cls, patch=patch, loss=loss), {k: t.grad for k, t in leaves.items()}, c, c2


def check_against_transcription(loss_fn, batch, epoch, ng, nl, tau, tau2, **kw):
    """One step: loss terms, gradients of all student inputs and both centres."""
    center0, center20 = loss_fn.center.clone(), loss_fn.center2.clone()
    out, grads = run_module(loss_fn, batch, epoch)
    ref, ref_grads, ref_c, ref_c2 = run_transcription(batch, center0, center20, tau, tau2,
                                                      ng, nl, **kw)
    for key in ("cls", "patch", "loss"):
        assert out[key].dim() == 0 and out[key].dtype == torch.float32
        assert rel_err(out[key], ref[key]) < RTOL, (key, out[key].item(), ref[key].item())
    assert set(grads) == set(ref_grads)
    for key in ref_grads:
        assert grads[key] is not None and grads[key].shape == ref_grads[key].shape
        assert rel_err(grads[key], ref_grads[key]) < RTOL, key
    assert rel_err(loss_fn.center.reshape(-1), ref_c) < RTOL
    assert rel_err(loss_fn.center2.reshape(-1), ref_c2) < RTOL
    assert loss_fn.center.shape == (1, K) and loss_fn.center2.shape == (1, 1, K2)
    return out


def make_loss(ng, nl, **kw):
    # 0.04 -> 0.07 [CLS] and 0.04 -> 0.06 patch over 4 warm-up epochs of 10.
    return IBOTLoss(K, K2, ng, nl, 0.04, 0.07, 0.04, 0.06, 4, 10, **kw)


# ---- parity with the transcription -------------------------------------------------------------
@pytest.mark.parametrize("ng,nl,B,mask_shape", [
    (2, 0, 3, "grid"),  # no local crops
    (2, 3, 4, "grid"),  # with local crops
    (2, 2, 4, "flat"),  # masks given as [B, N]
    (1, 2, 3, "grid"),  # a single global crop: only global-teacher / local-student pairs
])
@pytest.mark.parametrize("epoch", [0, 2, 3, 7])  # inside the warm-up (0, 2), its end (3), after
def test_matches_transcription(ng, nl, B, mask_shape, epoch):
    loss_fn = make_loss(ng, nl)
    g = torch.Generator().manual_seed(epoch)  # non-zero centres, as after some steps
    loss_fn.load_state_dict({"center": torch.randn(1, K, generator=g) * 0.1,
                             "center2": torch.randn(1, 1, K2, generator=g) * 0.1})
    tau, tau2 = loss_fn.temperatures(epoch)
    batch = make_batch(seed=100 * ng + 10 * nl + epoch, ng=ng, nl=nl, B=B, mask_shape=mask_shape)
    check_against_transcription(loss_fn, batch, epoch, ng, nl, tau, tau2)


@pytest.mark.parametrize("epoch", [1, 2, 3, 5, 9])
def test_matches_transcription_mim_start_and_lambdas(epoch):
    ng, nl, B = 2, 2, 4
    kw = dict(lambda1=0.7, lambda2=1.9, student_temp=0.12, center_momentum=0.8,
              center_momentum2=0.95)
    loss_fn = make_loss(ng, nl, mim_start_epoch=3, **kw)
    tau, tau2 = loss_fn.temperatures(epoch)
    expected_tau2 = {1: 0.04, 2: 0.04, 3: 0.04, 5: 0.04 + 2 * 0.02 / 3, 9: 0.06}[epoch]
    assert tau2 == pytest.approx(expected_tau2, rel=1e-12)  # held until epoch 3, then ramps
    batch = make_batch(seed=7 + epoch, ng=ng, nl=nl, B=B)
    check_against_transcription(loss_fn, batch, epoch, ng, nl, tau, tau2, lambda1=0.7,
                                lambda2=1.9, student_temp=0.12, m=0.8, m2=0.95)


def test_centres_carry_over_steps():
    """Step 1 uses zero centres; each later step uses the centres left by the previous one."""
    ng, nl, B = 2, 2, 3
    loss_fn = make_loss(ng, nl)
    assert torch.equal(loss_fn.center, torch.zeros(1, K))
    assert torch.equal(loss_fn.center2, torch.zeros(1, 1, K2))
    c, c2 = torch.zeros(K, dtype=torch.float64), torch.zeros(K2, dtype=torch.float64)
    for step, epoch in enumerate([0, 0, 5]):
        batch = make_batch(seed=50 + step, ng=ng, nl=nl, B=B)
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


def test_unmasked_tokens_get_zero_gradient_and_teacher_none():
    ng, nl, B = 2, 1, 3
    batch = make_batch(seed=3, ng=ng, nl=nl, B=B)
    t_cls = batch["t_cls"].clone().requires_grad_(True)
    t_patch = batch["t_patch"].clone().requires_grad_(True)
    s_patch = batch["s_patch"].clone().requires_grad_(True)
    out = make_loss(ng, nl)((batch["s_cls"], s_patch), (t_cls, t_patch), batch["s_local"],
                            batch["masks"], 0)
    out["loss"].backward()
    assert t_cls.grad is None and t_patch.grad is None
    mask_rows = torch.cat([batch["masks"][q].reshape(B, N) for q in range(ng)])  # crop-major
    assert torch.all(s_patch.grad[~mask_rows] == 0)
    assert torch.all(s_patch.grad[mask_rows].abs().sum(-1) > 0)
    # image 0 of each global crop has no masked token: it adds nothing but counts in the mean
    assert torch.all(s_patch.grad[0] == 0) and torch.all(s_patch.grad[B] == 0)


def test_half_precision_inputs_compute_in_fp32():
    ng, nl, B = 2, 2, 3
    batch = make_batch(seed=11, ng=ng, nl=nl, B=B)
    out16, grads16 = run_module(make_loss(ng, nl), batch, 2, dtype=torch.bfloat16)
    out32, _ = run_module(make_loss(ng, nl), {k: (v.bfloat16().float() if torch.is_tensor(v) and
                                                  v.is_floating_point() else v)
                                              for k, v in batch.items()}, 2)
    for key in ("cls", "patch", "loss"):
        assert out16[key].dtype == torch.float32
        assert rel_err(out16[key], out32[key]) < 1e-6  # same bf16 values, fp32 maths
    assert all(g.dtype == torch.bfloat16 for g in grads16.values())


# ---- module surface ------------------------------------------------------------------------------
def test_state_dict_and_schedules():
    loss_fn = make_loss(2, 10, mim_start_epoch=2)
    sd = loss_fn.state_dict()
    assert list(sd) == ["center", "center2"]
    assert sd["center"].shape == (1, K) and sd["center2"].shape == (1, 1, K2)
    assert sd["center"].dtype == sd["center2"].dtype == torch.float32
    assert not sd["center"].any() and not sd["center2"].any()
    other = make_loss(2, 10)
    other.load_state_dict({"center": torch.full((1, K), 0.5), "center2": torch.full((1, 1, K2), -1.)})
    assert torch.all(other.center == 0.5) and torch.all(other.center2 == -1.)
    assert isinstance(loss_fn.teacher_temp_schedule, np.ndarray)
    assert len(loss_fn.teacher_temp_schedule) == len(loss_fn.teacher_temp2_schedule) == 10
    assert loss_fn.temperatures(0) == (0.04, 0.04)
    assert loss_fn.temperatures(1) == pytest.approx((0.05, 0.04), rel=1e-12)  # patch held
    assert loss_fn.temperatures(3) == pytest.approx((0.07, 0.04 + 0.02 / 3), rel=1e-12)
    assert loss_fn.temperatures(5) == (0.07, 0.06)
    assert loss_fn.temperatures(np.int64(9)) == (0.07, 0.06)
    with pytest.raises(IndexError, match="epoch 10"):
        loss_fn.temperatures(10)


def test_recipe_constructor_like_reference():
    # README ViT-S/16: 8192 dims, 2 + 10 crops, 0.04 -> 0.07 (both) over 30 of 800 epochs
    loss_fn = IBOTLoss(8192, 8192, 2, 10, 0.04, 0.07, 0.04, 0.07, 30, 800, mim_start_epoch=0)
    assert loss_fn.teacher_temp_schedule[1] == pytest.approx(0.041034, abs=1e-6)
    assert loss_fn.temperatures(29) == (0.07, 0.07)
    with pytest.raises(ValueError, match="does not fit"):
        IBOTLoss(K, K2, 2, 0, 0.04, 0.07, 0.04, 0.07, 30, 35, mim_start_epoch=10)


def test_shape_errors():
    ng, nl, B = 2, 2, 3
    loss_fn = make_loss(ng, nl)
    b = make_batch(seed=1, ng=ng, nl=nl, B=B)
    s, t = (b["s_cls"], b["s_patch"]), (b["t_cls"], b["t_patch"])

    def call(student=s, teacher=t, local=b["s_local"], masks=b["masks"], fn=loss_fn):
        return fn(student, teacher, local, masks, 0)

    with pytest.raises(ValueError, match="teacher \\[CLS\\]"):
        call(teacher=(torch.randn(ng * B, K + 1), b["t_patch"]))
    with pytest.raises(ValueError, match="out_dim"):
        call(student=(torch.randn(ng * B, K + 1), b["s_patch"]))
    with pytest.raises(ValueError, match="teacher patch"):
        call(teacher=(b["t_cls"], torch.randn(ng * B, N, K2 + 1)))
    with pytest.raises(ValueError, match="multiple of ngcrops"):
        call(student=(torch.randn(ng * B + 1, K), b["s_patch"]))
    with pytest.raises(ValueError, match="patch_out_dim"):
        call(student=(b["s_cls"], torch.randn(ng * B, N, K)))
    with pytest.raises(ValueError, match="student_local_cls is None"):
        call(local=None)
    with pytest.raises(ValueError, match="nlcrops\\*B"):
        call(local=torch.randn(nl * B + 1, K))
    with pytest.raises(ValueError, match="N = 16"):  # mask grid does not match the tokens
        call(masks=[torch.zeros(B, 3, 3, dtype=torch.bool)] * ng)
    with pytest.raises(ValueError, match="B=3"):
        call(masks=[torch.zeros(B + 1, 4, 4, dtype=torch.bool)] * ng)
    with pytest.raises(ValueError, match="at least ngcrops"):
        call(masks=b["masks"][:1])
    with pytest.raises(IndexError, match="outside"):
        loss_fn(s, t, b["s_local"], b["masks"], 10)
    # nlcrops == 0: None is accepted (like the reference), real local logits are not
    no_local = make_loss(ng, 0)
    out = call(local=None, fn=no_local, masks=b["masks"][:ng])
    assert torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match="nlcrops=0"):
        call(fn=no_local)
    with pytest.raises(ValueError, match="at least 2 crops"):
        IBOTLoss(K, K2, 1, 0, 0.04, 0.07, 0.04, 0.07, 2, 10)


# ---- world size 2, for real (gloo, two spawned processes) ----------------------------------------
WORLD, DIST_NG, DIST_NL, DIST_B = 2, 2, 2, 4  # each rank gets B/2 = 2 images of every crop
DIST_STEPS = [(0, 101), (6, 102)]  # (epoch, batch seed): step 2 runs with non-zero centres


def rank_half(batch, rank, ng, nl, B):
    """Images [rank*B/W, (rank+1)*B/W) of every crop, keeping the crop-major layout."""
    h = B // WORLD
    sl = slice(rank * h, (rank + 1) * h)

    def split(x, ncrops):
        return torch.cat([x[c * B:(c + 1) * B][sl] for c in range(ncrops)])

    return dict(s_cls=split(batch["s_cls"], ng), s_patch=split(batch["s_patch"], ng),
                s_local=split(batch["s_local"], nl), t_cls=split(batch["t_cls"], ng),
                t_patch=split(batch["t_patch"], ng), masks=[m[sl] for m in batch["masks"]])


def _dist_worker(rank, store_path, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_path}",
                                         rank=rank, world_size=WORLD)
    try:
        loss_fn = make_loss(DIST_NG, DIST_NL)
        results = []
        for epoch, seed in DIST_STEPS:
            half = rank_half(make_batch(seed, DIST_NG, DIST_NL, DIST_B), rank,
                             DIST_NG, DIST_NL, DIST_B)
            out, _ = run_module(loss_fn, half, epoch)
            results.append(dict(loss={k: v.detach() for k, v in out.items()},
                                center=loss_fn.center.clone(), center2=loss_fn.center2.clone()))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # 5-15 s: two spawned interpreters
def test_world_size_two_matches_single_process(tmp_path):
    ctx = mp.get_context("spawn")
    store = str(tmp_path / "filestore")  # rendezvous file; must not exist yet
    procs = [ctx.Process(target=_dist_worker, args=(r, store, str(tmp_path)), daemon=True)
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.terminate()
        p.join(5)
    assert not hung, "distributed workers did not finish within 90 s"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    single = make_loss(DIST_NG, DIST_NL)  # the same steps on the full batch, one process
    for step, (epoch, seed) in enumerate(DIST_STEPS):
        full = make_batch(seed, DIST_NG, DIST_NL, DIST_B)
        prev_center, prev_center2 = single.center.clone(), single.center2.clone()
        run_module(single, full, epoch)
        for rank in range(WORLD):
            got = per_rank[rank][step]
            # centres: global mean over both ranks == mean over the full batch
            torch.testing.assert_close(got["center"], single.center, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got["center2"], single.center2, rtol=1e-6, atol=1e-6)
            # loss: each rank's own half, with the previous (shared) centres
            local_fn = make_loss(DIST_NG, DIST_NL)
            local_fn.load_state_dict({"center": prev_center, "center2": prev_center2})
            expect, _ = run_module(local_fn, rank_half(full, rank, DIST_NG, DIST_NL, DIST_B), epoch)
            for key in ("cls", "patch", "loss"):
                assert rel_err(got["loss"][key], expect[key]) < 1e-6, (step, rank, key)
        # the two halves really differ (the check is not vacuous)
        assert rel_err(per_rank[0][step]["loss"]["loss"], per_rank[1][step]["loss"]["loss"]) > 1e-4
