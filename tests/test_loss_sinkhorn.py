"""Sinkhorn-Knopp centring (ibot_fast/loss/sinkhorn.py), both forms, against a transcription
of DINOv2's ``sinkhorn_knopp_teacher`` (tests/helpers.py, plain torch, fp64), on one process and
on two (gloo, spawned, with the adapters' centre updates across ranks)."""
import os

import pytest
import torch

from helpers import small_blocks  # noqa: F401 - fixture
from helpers import dinov2_sinkhorn, rel_err, spawn_ranks
from ibot_fast.loss import (DINOv2PatchLoss, IBOTPatchLoss, sinkhorn_knopp_center,
                            sinkhorn_knopp_targets)

RTOL = 1e-5
K = 37  # never a multiple of the block


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



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_target_form_is_the_centre_form(dtype, small_blocks):
    """One implementation: the dense targets are softmax((t - c)/tau) for the centre c, rows
    outside row_valid_T are 0, the valid rows match the transcription on those rows only."""
    g = torch.Generator().manual_seed(5)
    t = (torch.randn(17, K, generator=g) * 0.7).to(dtype)
    valid = torch.rand(17, generator=g) < 0.5
    for row_valid in (None, valid):
        q = sinkhorn_knopp_targets(t, 0.05, 4, row_valid_T=row_valid)
        assert q.dtype == dtype and q.shape == t.shape
        c = sinkhorn_knopp_center(t.double(), 0.05, 4, row_valid_T=row_valid)
        expect = torch.softmax((t.double() - c) / 0.05, dim=-1)
        if row_valid is None:
            assert rel_err(q, expect) < RTOL
            assert rel_err(q, dinov2_sinkhorn(t, 0.05, 4)) < RTOL
        else:
            assert torch.all(q[~valid] == 0)
            assert rel_err(q[valid], expect[valid]) < RTOL
            assert rel_err(q[valid], dinov2_sinkhorn(t[valid], 0.05, 4)) < RTOL
    with pytest.raises(ValueError, match="row_valid_T"):
        sinkhorn_knopp_targets(t, 0.05, row_valid_T=valid[:3])
    with pytest.raises(ValueError, match="teacher_temp must be > 0"):
        sinkhorn_knopp_targets(t, 0.0)


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
    procs, hung = spawn_ranks(_dist_worker, 2, str(tmp_path / "store"), str(tmp_path))
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
