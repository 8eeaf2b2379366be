"""``IBOTLossBase`` (ibot_fast/loss/common.py): what both iBOT loss modules share -- state
dict, temperature schedules, constructor rules, input checks -- and the centre update across
ranks (world size 2, for real: gloo, two spawned processes, against one process).
"""
import os

import numpy as np
import pytest
import torch

from helpers import TR_K, TR_K2, TR_N, rel_err, run_module, spawn_ranks, transcription_batch
from ibot_fast.loss import IBOTLoss, IBOTLossBase, IBOTLossReference

K, K2, N = TR_K, TR_K2, TR_N


def make_loss(ng, nl, loss_cls=IBOTLoss, **kw):
    # 0.04 -> 0.07 [CLS] and 0.04 -> 0.06 patch over 4 warm-up epochs of 10.
    return loss_cls(K, K2, ng, nl, 0.04, 0.07, 0.04, 0.06, 4, 10, **kw)


# ---- module surface ------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_cls", [IBOTLossReference, IBOTLoss])
def test_state_dict_and_schedules(loss_cls):
    loss_fn = make_loss(2, 10, loss_cls=loss_cls, mim_start_epoch=2)
    sd = loss_fn.state_dict()
    assert list(sd) == ["center", "center2"]
    assert sd["center"].shape == (1, K) and sd["center2"].shape == (1, 1, K2)
    assert sd["center"].dtype == sd["center2"].dtype == torch.float32
    assert not sd["center"].any() and not sd["center2"].any()
    other = make_loss(2, 10, loss_cls=loss_cls)
    other.load_state_dict({"center": torch.full((1, K), 0.5),
                           "center2": torch.full((1, 1, K2), -1.)})
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


@pytest.mark.parametrize("loss_cls", [IBOTLossReference, IBOTLoss])
def test_recipe_constructor_like_reference(loss_cls):
    # README ViT-S/16: 8192 dims, 2 + 10 crops, 0.04 -> 0.07 (both) over 30 of 800 epochs
    loss_fn = loss_cls(8192, 8192, 2, 10, 0.04, 0.07, 0.04, 0.07, 30, 800, mim_start_epoch=0)
    assert loss_fn.teacher_temp_schedule[1] == pytest.approx(0.041034, abs=1e-6)
    assert loss_fn.temperatures(29) == (0.07, 0.07)
    with pytest.raises(ValueError, match="does not fit"):
        loss_cls(K, K2, 2, 0, 0.04, 0.07, 0.04, 0.07, 30, 35, mim_start_epoch=10)


@pytest.mark.parametrize("loss_cls", [IBOTLossReference, IBOTLoss])
def test_shape_errors(loss_cls):
    ng, nl, B = 2, 2, 3
    loss_fn = make_loss(ng, nl, loss_cls=loss_cls)
    b = transcription_batch(seed=1, ng=ng, nl=nl, B=B)
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
    no_local = make_loss(ng, 0, loss_cls=loss_cls)
    out = call(local=None, fn=no_local, masks=b["masks"][:ng])
    assert torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match="nlcrops=0"):
        call(fn=no_local)
    with pytest.raises(ValueError, match="at least 2 crops"):
        loss_cls(K, K2, 1, 0, 0.04, 0.07, 0.04, 0.07, 2, 10)



def test_modules_are_siblings_on_the_shared_base():
    """The dense reference is the fast module's ground truth, not its base class."""
    assert issubclass(IBOTLoss, IBOTLossBase) and issubclass(IBOTLossReference, IBOTLossBase)
    assert not issubclass(IBOTLoss, IBOTLossReference)
    assert not issubclass(IBOTLossReference, IBOTLoss)



def test_public_imports_keep_working():
    """The loss stack's old import paths are aliases of the package's modules."""
    import ibot_fast
    import ibot_fast.adapters as adapters
    import ibot_fast.fused_loss as fused_loss
    import ibot_fast.loss as loss
    import ibot_fast.loss.compat as compat
    import ibot_fast.loss.pairs as pairs
    import ibot_fast.loss.sinkhorn as sinkhorn
    assert ibot_fast.IBOTLoss is loss.IBOTLoss
    assert ibot_fast.IBOTPatchLoss is adapters.IBOTPatchLoss is compat.IBOTPatchLoss
    assert ibot_fast.DINOv2PatchLoss is adapters.DINOv2PatchLoss is compat.DINOv2PatchLoss
    for name in adapters.__all__:
        assert getattr(adapters, name) is getattr(compat, name) is getattr(loss, name)
    assert fused_loss.sinkhorn_knopp_center is sinkhorn.sinkhorn_knopp_center
    assert fused_loss.pairs_to_table is pairs.pairs_to_table
    for name in loss.__all__:
        assert getattr(loss, name) is not None, name
    assert loss.LOSS_BACKENDS == (*fused_loss.BACKENDS, "eager")


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
            half = rank_half(transcription_batch(seed, DIST_NG, DIST_NL, DIST_B), rank,
                             DIST_NG, DIST_NL, DIST_B)
            out, _ = run_module(loss_fn, half, epoch)
            results.append(dict(loss={k: v.detach() for k, v in out.items()},
                                center=loss_fn.center.clone(), center2=loss_fn.center2.clone()))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # 5-15 s: two spawned interpreters
def test_world_size_two_matches_single_process(tmp_path):
    store = str(tmp_path / "filestore")  # rendezvous file; must not exist yet
    procs, hung = spawn_ranks(_dist_worker, WORLD, store, str(tmp_path))
    assert not hung, "distributed workers did not finish within 90 s"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    single = make_loss(DIST_NG, DIST_NL)  # the same steps on the full batch, one process
    for step, (epoch, seed) in enumerate(DIST_STEPS):
        full = transcription_batch(seed, DIST_NG, DIST_NL, DIST_B)
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
