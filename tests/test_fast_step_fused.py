"""The fast step's fused head + loss (``--fused_head_loss true``) and whole-step compile
(``--compile step``): each against the unfused / eager fast step and the reference step
(``--step reference``)."""
from __future__ import annotations

import os

import pytest
import torch

from ibot_fast.loss import IBOTLoss
from ibot_fast.train import Trainer
from helpers import fast_args, assert_same_runs, compare_with_reference, run_steps

# FAST_TINY (tests/helpers.py) has a separate student patch head and a shared teacher head
HEADS = {
    "student-separate": [],
    "shared": ["--shared_head", "true"],
    "both-separate-K2": ["--shared_head", "false", "--shared_head_teacher", "false",
                         "--patch_out_dim", "48"],
}


# ------------------------------------------------------------ the loss entry point alone
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_selected_linear_equals_forward_selected(dtype):
    """Logits ``z @ W.T`` through forward_selected vs (z, W) through forward_selected_linear:
    loss terms, gradients of z and W (student), centres. Padding rows (weight 0) included."""
    g = torch.Generator().manual_seed(0)
    ng, nl, B, K, K2, D, M = 2, 1, 3, 12, 10, 5, 7
    args = (K, K2, ng, nl, 0.04, 0.07, 0.04, 0.07, 1, 3)
    a, b = IBOTLoss(*args, backend="torch").to(dtype), IBOTLoss(*args, backend="torch").to(dtype)
    c2 = torch.randn(1, 1, K2, generator=g, dtype=dtype)
    for m in (a, b):  # a non-zero previous centre
        m.center2.copy_(c2)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    s_cls, t_cls, s_loc = r(ng * B, K), r(ng * B, K), r(nl * B, K)
    zs, ws, zt, wt = r(M, D), r(K2, D), r(M, D), r(K2, D)
    weight = torch.rand(M, generator=g, dtype=dtype)
    weight[[2, 5]] = 0  # padding rows
    t_mean = r(K2)
    zs1, ws1 = zs.clone().requires_grad_(), ws.clone().requires_grad_()
    zs2, ws2 = zs.clone().requires_grad_(), ws.clone().requires_grad_()
    want = a.forward_selected(s_cls, t_cls, s_loc, zs1 @ ws1.T, zt @ wt.T, weight, t_mean, 1)
    got = b.forward_selected_linear(s_cls, t_cls, s_loc, zs2, ws2, zt, wt, weight, t_mean, 1)
    want["loss"].backward()
    got["loss"].backward()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for key in ("cls", "patch", "loss"):
        torch.testing.assert_close(got[key], want[key], **tol, msg=key)
    torch.testing.assert_close(zs2.grad, zs1.grad, **tol)
    torch.testing.assert_close(ws2.grad, ws1.grad, **tol)
    assert zs2.grad[[2, 5]].abs().max() == 0  # padding rows: exactly no gradient
    for key in ("center", "center2"):
        torch.testing.assert_close(getattr(b, key), getattr(a, key), **tol, msg=key)


def test_forward_selected_linear_bad_input():
    loss = IBOTLoss(8, 6, 2, 0, 0.04, 0.07, 0.04, 0.07, 1, 3, backend="torch")
    cls, z, w, wt = torch.randn(4, 8), torch.randn(5, 3), torch.randn(6, 3), torch.randn(6, 3)
    ok = dict(patch_weight=torch.ones(5), teacher_patch_mean=torch.zeros(6), epoch=0)
    with pytest.raises(ValueError, match="teacher_patch_z"):
        loss.forward_selected_linear(cls, cls, None, z, w, z[:4], wt, **ok)
    with pytest.raises(ValueError, match="student_patch_w"):
        loss.forward_selected_linear(cls, cls, None, z, w[:, :2], z, wt, **ok)
    sk = IBOTLoss(8, 6, 2, 0, 0.04, 0.07, 0.04, 0.07, 1, 3, backend="torch",
                  center="sinkhorn_knopp")
    with pytest.raises(ValueError, match="sinkhorn_knopp"):
        sk.forward_selected_linear(cls, cls, None, z, w, z, wt, **ok)


# --------------------------------------------------------- --fused_head_loss in the step
@pytest.mark.parametrize("head", ["shared", "both-separate-K2"])  # FAST_TINY's own: the fp32 test
def test_fused_head_equals_reference_fp64(tmp_path, head):
    """fp64, 1e-9: losses, every gradient (weight_v / weight_g of the patch layer included),
    weights after AdamW, EMA teacher, centres; a frozen-last-layer step and two normal ones."""
    compare_with_reference(tmp_path, ["--fused_head_loss", "true", "--ema_backend", "torch"],
             ref_extra=HEADS[head])


def test_fused_head_equals_reference_fp32(tmp_path):
    compare_with_reference(tmp_path, ["--fused_head_loss", "true"], precision="fp32")


@pytest.mark.parametrize("precision, head", [("fp64", "both-separate-K2"), ("fp32", "shared")])
def test_fused_head_equals_unfused_fast_step(tmp_path, precision, head):
    dtype = torch.float64 if precision == "fp64" else torch.float32
    common = ["--precision", precision, "--fast_step", "true", *HEADS[head]]
    unfused = Trainer(fast_args(tmp_path / "u", *common))
    fused = Trainer(fast_args(tmp_path / "f", *common, "--fused_head_loss", "true"))
    loader = iter(unfused.loader)
    batches = [next(loader) for _ in range(2)]
    assert_same_runs(unfused, run_steps(unfused, batches, dtype, 3),
                      fused, run_steps(fused, batches, dtype, 3), precision)


@pytest.mark.parametrize("extra, needle", [
    (["--fast_step", "true", "--fused_head_loss", "true", "--head_tokens", "all"],
     "--head_tokens selected"),
    (["--step", "reference", "--fused_head_loss", "true"], "--step reference"),
    (["--fast_step", "true", "--compile", "step", "--head_tokens", "all"], "--compile blocks"),
    (["--fast_step", "false", "--compile", "step"], "--step reference"),
])
def test_fused_and_compile_flags_fail_with_message(tmp_path, extra, needle, capsys):
    """Usage errors (exit 2) from the flag validation, before any work."""
    with pytest.raises(SystemExit) as exc:
        fast_args(tmp_path, "--precision", "fp32", *extra)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


# ------------------------------------------------------------------ --compile step
def _compiled_step_vs_eager(tmp_path, backend, extra):
    """Five steps with different masks (two epochs: a new teacher temperature) through the
    eager fast step and the whole-step compile: the first compiles one graph, the other four
    compile nothing (a recompile raises); results, gradients and weights agree (fp32)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    # a teacher-temperature warm-up over 3 epochs: epochs 1 and 2 differ
    extra = ["--warmup_teacher_temp_epochs", "3", "--epochs", "4", *extra]
    eager = Trainer(fast_args(tmp_path / "e", "--precision", "fp32", "--fast_step", "true", *extra))
    comp = Trainer(fast_args(tmp_path / "c", "--precision", "fp32", "--fast_step", "true",
                         "--compile", "step", "--compile_backend", backend, *extra))
    assert comp.path.compile == "step"
    loader = iter(eager.loader)
    batches = [next(loader) for _ in range(4)] + [next(iter(eager.loader))]
    assert len({int(b[2].n_valid) for b in batches}) > 1  # the masks really differ
    n = eager.iters_per_epoch
    # epoch 1, then epoch 2 (warm-up: another teacher temperature) at the same schedule slot
    steps = [(1, n), (1, n + 1), (1, n + 2), (2, n + 3), (2, n + 3)]
    assert eager.ibot_loss.temperatures(1) != eager.ibot_loss.temperatures(2)
    torch._dynamo.reset()
    counters.clear()
    results = {"eager": [], "comp": []}
    try:
        for k, ((images, _, masks), (epoch, it)) in enumerate(zip(batches, steps)):
            if k == 1:  # the step compiled in step 0; a recompile now raises
                torch._dynamo.config.error_on_recompile = True
                graphs = counters["stats"]["unique_graphs"]
            for name, tr in (("eager", eager), ("comp", comp)):
                torch.manual_seed(k)  # the same drop-path draws
                res = tr.train_step(images, masks, epoch, it)
                grads = {p_name: None if p.grad is None else p.grad.clone()
                         for p_name, p in tr.student_without_ddp.named_parameters()}
                results[name].append((res, grads))
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert counters["stats"]["unique_graphs"] == graphs == 1
    assert not counters["recompiles"]
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert_same_runs(eager, results["eager"], comp, results["comp"], "fp32")


@pytest.mark.parametrize("extra", [[], ["--fused_head_loss", "true"]],
                         ids=["unfused", "fused-head"])
def test_compiled_step_equals_eager_and_does_not_recompile(tmp_path, extra):
    """aot_eager (the graph capture and autograd of torch.compile without inductor's code
    generation, which costs minutes on 2 CPU cores)."""
    _compiled_step_vs_eager(tmp_path, "aot_eager", extra)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("IBOT_TEST_INDUCTOR") != "1",
                    reason="inductor's first compile of the step took 104 s on 2 busy CPU "
                           "cores (over the suite's per-test budget); IBOT_TEST_INDUCTOR=1 runs it")
def test_compiled_step_inductor(tmp_path):
    _compiled_step_vs_eager(tmp_path, "inductor", ["--fused_head_loss", "true"])
