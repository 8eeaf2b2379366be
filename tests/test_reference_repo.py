"""Parity with the real reference: a bytedance/ibot checkout's own code, loaded at run time
(ibot_fast/reference_repo.py).

    IBOT_REFERENCE_REPO=/path/to/ibot pytest tests/test_reference_repo.py

Skipped as a whole when IBOT_REFERENCE_REPO is unset; fails (with the reason) when it is set but
does not point at a checkout. What is compared, all in fp64 unless said otherwise:

1. the reference's ``iBOTLoss`` against ``ibot_fast.loss.IBOTLoss`` (eager and torch back ends,
   and Triton in fp32 under the interpreter) and ``IBOTLossReference``: loss terms, gradients
   of every student input, both centres, over two calls (the second uses the updated centres);
2. the reference's ViT + iBOTHead against ours with the same weights, taken over through
   ``ibot_fast.convert`` from a checkpoint in the reference's layout: masked and unmasked
   forward, local crops (position-table interpolation), the last attention map;
3. two training steps of the reference (``ReferenceTrainStep``: its networks, loss, clipping,
   last-layer freeze, AdamW, EMA) against ``Trainer.train_step``, ``--step reference`` and
   ``--step fast`` (the default), from the same weights on the same batches: loss terms, gradients,
   student and teacher weights, centres.

Tolerances. In fp64 both sides evaluate the same formulas; only the order of floating-point
additions differs (SDPA vs explicit attention, fused vs dense soft-max, foreach vs loop). One
rounding is 1.1e-16 relative; sums over <= 10^4 terms, 12 blocks and an AdamW step (whose
update lr*m/(sqrt(v)+eps) is Lipschitz in the gradient away from 0, see tests/test_train.py)
stay many orders below 1e-9 relative, while any semantic slip (a temperature, a centre, a
weight, a mask, an eps) moves results by >= 1e-6. So rtol 1e-9 (atol 1e-12 for values near 0)
separates the two. Triton computes in fp32: 1e-5 relative to the fp64 reference, the budget of
tests/test_loss.py (fp32 rounding 6e-8 through a K-way log-sum-exp and a few hundred terms).
"""
from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch
import torch.distributed as dist

REPO = os.environ.get("IBOT_REFERENCE_REPO")
if not REPO:
    pytest.skip("set IBOT_REFERENCE_REPO to a bytedance/ibot checkout", allow_module_level=True)

from ibot_fast import convert  # noqa: E402
from ibot_fast import reference_repo  # noqa: E402
from ibot_fast.loss import IBOTLoss, IBOTLossReference  # noqa: E402
from ibot_fast.models import build_ibot_models  # noqa: E402
from ibot_fast.reference_repo import load_reference  # noqa: E402

from helpers import FP64, compare_train_steps_with_reference  # noqa: E402

pytestmark = [pytest.mark.reference,
              pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")]

FP32 = dict(rtol=1e-5, atol=1e-6)
OWN_ROOTS = ("utils", "models", "loader", "main_ibot", "evaluation")


@pytest.fixture(scope="module")
def ref():
    try:
        return load_reference(REPO)
    except ValueError as err:
        pytest.fail(f"IBOT_REFERENCE_REPO={REPO!r} is set but unusable: {err}")


def _no_process_group():
    return not (dist.is_available() and dist.is_initialized())


# ------------------------------------------------------------------------------ loading
def test_load_leaves_no_trace(monkeypatch, ref):
    """A fresh load puts back what held the reference's top-level names (here a stand-in
    `utils`), removes the checkout's modules and the stubs, and restores sys.path."""
    monkeypatch.setattr(reference_repo, "_CACHE", {})
    sentinel = type(sys)("utils")
    monkeypatch.setitem(sys.modules, "utils", sentinel)
    path, meta_path = list(sys.path), list(sys.meta_path)
    others = {n: m for n, m in sys.modules.items() if n.split(".")[0] in OWN_ROOTS}

    fresh = load_reference(REPO)

    assert fresh is not ref and load_reference(REPO) is fresh  # cached per path
    assert sys.path == path and sys.meta_path == meta_path
    assert {n: m for n, m in sys.modules.items() if n.split(".")[0] in OWN_ROOTS} == others
    assert sys.modules["utils"] is sentinel
    for root in fresh.stubbed:  # missing packages were stubbed for the import only
        assert root not in sys.modules
    assert not any(isinstance(m, reference_repo._StubModule) for m in list(sys.modules.values()))
    # the loaded code uses the checkout's modules, not the stand-in
    assert fresh.main_ibot.utils is fresh.utils
    assert os.path.realpath(fresh.utils.__file__).startswith(os.path.realpath(REPO))
    assert fresh.head.utils is fresh.utils
    assert _no_process_group()
    if "torchvision" in fresh.stubbed:
        with pytest.raises(RuntimeError, match="stub made by ibot_fast.reference_repo"):
            fresh.main_ibot.transforms.Compose([])


def test_not_a_checkout_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="not a bytedance/ibot checkout: missing main_ibot.py"):
        load_reference(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        load_reference(tmp_path / "nowhere")


# ------------------------------------------------------------------------------ 1. the loss
K, N, B = 64, 16, 4  # 4x4 patch grid, 4 images


def _loss_batch(seed, ng, nl, K2):
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    batch = dict(s_cls=torch.randn(ng * B, K, generator=g, dtype=d) * 2,
                 s_patch=torch.randn(ng * B, N, K2, generator=g, dtype=d) * 2,
                 s_local=torch.randn(nl * B, K, generator=g, dtype=d) * 2 if nl else None,
                 t_cls=torch.randn(ng * B, K, generator=g, dtype=d) * 0.3 + 0.1,
                 t_patch=torch.randn(ng * B, N, K2, generator=g, dtype=d) * 0.3 - 0.05)
    masks = []
    for v in range(ng):
        m = torch.rand(B, 4, 4, generator=g) < 0.4
        m[0] = False  # an image without masked tokens: counts 0 in the mean over B
        m[1] = True  # every token masked
        m[2] = False
        m[2, v, 3 - v] = True  # exactly one
        masks.append(m)
    batch["masks"] = masks + [torch.ones(B, 2, 2, dtype=torch.bool)] * nl  # locals: unread
    return batch


def _run_loss(fn, batch, epoch, dtype):
    # fresh leaves per side (.to() of an equal dtype would share the tensor and its .grad)
    leaves = {k: batch[k].detach().to(dtype, copy=True).requires_grad_(True)
              for k in ("s_cls", "s_patch", "s_local") if batch[k] is not None}
    out = fn((leaves["s_cls"], leaves["s_patch"]),
             (batch["t_cls"].to(dtype), batch["t_patch"].to(dtype)), leaves.get("s_local"),
             batch["masks"], epoch)
    out["loss"].backward()
    return ({k: v.detach() for k, v in out.items()}, {k: t.grad for k, t in leaves.items()},
            fn.center.detach().clone(), fn.center2.detach().clone())


# (ng, nl, K2, lambda1, lambda2, warmup epochs, epochs, mim_start_epoch, [epochs of 2 calls])
LOSS_CASES = {
    "globals-only": (2, 0, K, 1.0, 1.0, 3, 6, 0, [0, 1]),
    "locals-separate-patch-dim-lambdas": (2, 3, 37, 0.5, 2.0, 3, 6, 0, [1, 2]),
    "after-warmup": (2, 2, K, 1.0, 1.0, 2, 6, 0, [2, 5]),
    "mim-start-epoch": (2, 2, 37, 1.0, 1.0, 2, 6, 2, [1, 3]),
    "one-global": (1, 2, K, 1.0, 1.0, 2, 4, 0, [0, 3]),
}
OURS = ["eager", "torch", "triton", "IBOTLossReference"]
TRITON_CASES = ("locals-separate-patch-dim-lambdas", "mim-start-epoch")


@pytest.mark.parametrize("ours", OURS)
@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_loss_matches_reference(ref, case, ours):
    ng, nl, K2, l1, l2, warm, epochs, mim, call_epochs = LOSS_CASES[case]
    if ours == "triton":
        if case not in TRITON_CASES:
            pytest.skip("the Triton interpreter takes ~3 s a case: two cases cover it")
        if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
            pytest.skip("triton runs on the CPU only under TRITON_INTERPRET=1")
    ctor = (K, K2, ng, nl, 0.04, 0.07, 0.03, 0.06, warm, epochs)
    kw = dict(lambda1=l1, lambda2=l2, mim_start_epoch=mim)
    theirs = ref.iBOTLoss(*ctor, **kw).double()
    if ours == "IBOTLossReference":
        mine, dtype, tol = IBOTLossReference(*ctor, **kw).double(), torch.float64, FP64
    elif ours == "triton":  # computes in fp32: inputs and centres fp32, 1e-5
        mine, dtype, tol = IBOTLoss(*ctor, backend="triton", **kw), torch.float32, FP32
    else:
        mine, dtype, tol = IBOTLoss(*ctor, backend=ours, **kw).double(), torch.float64, FP64
    for k, epoch in enumerate(call_epochs):  # the second call uses the updated centres
        batch = _loss_batch(10 * k + len(case), ng, nl, K2)
        r_out, r_grads, r_c, r_c2 = _run_loss(theirs, batch, epoch, torch.float64)
        o_out, o_grads, o_c, o_c2 = _run_loss(mine, batch, epoch, dtype)
        assert r_out["patch"] > 0 and r_out["cls"] > 0
        for key in ("cls", "patch", "loss"):
            torch.testing.assert_close(o_out[key].double(), r_out[key], **tol,
                                       msg=f"{key} (call {k})")
        assert r_grads.keys() == o_grads.keys()
        for key in r_grads:
            torch.testing.assert_close(o_grads[key].double(), r_grads[key], **tol,
                                       msg=f"grad {key} (call {k})")
        # the reference's centre2 is [1, 1, K2]; ours is stored the same way
        torch.testing.assert_close(o_c.double(), r_c, **tol, msg="center")
        torch.testing.assert_close(o_c2.double(), r_c2, **tol, msg="center2")
    assert _no_process_group()


# ------------------------------------------------------------------------------ 2. the models
def _perturb(module, seed):
    """Random weights everywhere (biases, norms, masked_embed, weight_g are 0/1 at init,
    where a swapped or missing tensor would go unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)


@pytest.mark.parametrize("attn", ["sdpa", "math"])
def test_vit_and_head_match_reference(ref, attn):
    """vit_tiny/8 (the reference's own factory) on 32-px globals and 16-px locals, separate
    student patch head, shared teacher head; weights go into a checkpoint in the reference's
    layout (`module.` prefixes, argparse args) and into our models through ibot_fast.convert."""
    torch.manual_seed(0)
    kw = dict(patch_size=8, img_size=[32], return_all_tokens=True)
    head = dict(patch_out_dim=48, hidden_dim=64, bottleneck_dim=32)
    with reference_repo._quiet_weight_norm():
        r_student = ref.MultiCropWrapper(ref.models.vit_tiny(masked_im_modeling=True, **kw),
                                         ref.iBOTHead(192, 40, norm_last_layer=False,
                                                      shared_head=False, **head))
        r_teacher = ref.MultiCropWrapper(ref.models.vit_tiny(**kw),
                                         ref.iBOTHead(192, 40, shared_head=True,
                                                      **{**head, "patch_out_dim": 40}))
    # fp32 weights (exact in fp64): the export path builds fp32 modules, then all go to fp64
    _perturb(r_student, 1)
    _perturb(r_teacher, 2)
    state = {"student": {f"module.{k}": v for k, v in r_student.state_dict().items()},
             "teacher": r_teacher.state_dict(), "epoch": 3,
             "args": argparse.Namespace(arch="vit_tiny", patch_size=8, out_dim=40,
                                        use_fp16=False)}

    converted = convert.reference_to_ibot_fast(state)
    # (the teacher built here is unused: ours comes from the export path below; a shared
    # teacher head would need patch_out_dim == out_dim, in the reference too)
    student, _ = build_ibot_models("vit_tiny", 8, img_size=32, out_dim=40, patch_out_dim=48,
                                   shared_head=False, shared_head_teacher=False,
                                   norm_last_layer=False, drop_path=0.0,
                                   head_hidden_dim=64, head_bottleneck_dim=32)
    student.load_state_dict(converted["student"])  # strict
    t_backbone, info = convert.build_backbone(state, "teacher")  # the export path
    t_head = convert.build_head(state, "teacher")
    assert info["arch"] == "vit_tiny" and info["img_size"] == 32 and t_head.shared_head
    for m in (r_student, r_teacher, student, t_backbone, t_head):
        m.double()
    for m in (student.backbone, t_backbone):
        m.set_attn_backend(attn)
    for m in (r_student, r_teacher, student, t_backbone, t_head):
        m.eval()

    g = torch.Generator().manual_seed(3)
    globals_ = [torch.randn(B, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(2)]
    locals_ = [torch.randn(B, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2)]
    masks = [torch.rand(B, 4, 4, generator=g) < 0.5 for _ in range(2)]
    masks[0][0], masks[1][1] = False, True
    with torch.no_grad():
        r_masked = r_student(globals_, mask=masks)
        o_masked = student(globals_, mask=masks)
        r_student.backbone.masked_im_modeling = False  # as train_one_epoch does for locals
        r_local = r_student(locals_)
        r_student.backbone.masked_im_modeling = True
        o_local = student(locals_)
        r_teach = r_teacher(globals_)
        o_teach = t_head(t_backbone(torch.cat(globals_)))
        r_attn = r_teacher.backbone.get_last_selfattention(globals_[0])
        o_attn = t_backbone.get_last_selfattention(globals_[0])
    for name, r, o in (("masked student", r_masked, o_masked), ("local student", r_local,
                       o_local), ("teacher", r_teach, o_teach)):
        for part, rr, oo in zip(("cls", "patch"), r, o):
            assert rr.shape == oo.shape, (name, part)
            torch.testing.assert_close(oo, rr, **FP64, msg=f"{name} {part}")
    torch.testing.assert_close(o_attn, r_attn, **FP64, msg="last self-attention")
    # the mask token mattered: the same crops unmasked give other patch outputs
    unmasked = student(globals_, mask=[torch.zeros_like(m) for m in masks])[1]
    assert (unmasked - o_masked[1]).abs().max() > 1e-3


# ------------------------------------------------------------------------------ 3. train steps
# vit_nano/8 (the reference's VisionTransformer class with our widths: it has no such factory)
# on 16-px globals / 8-px locals, K = 64, drop path 0.1, clipping that bites, lr > 0 in epoch 1
TINY = ["--arch", "vit_nano", "--patch_size", "8", "--global_crops_size", "16",
        "--local_crops_size", "8", "--local_crops_number", "2", "--out_dim", "64",
        "--head_hidden_dim", "32", "--head_bottleneck_dim", "16", "--batch_size_per_gpu", "4",
        "--warmup_teacher_temp_epochs", "1", "--warmup_epochs", "1", "--num_workers", "0",
        "--progress", "false", "--pred_ratio", "0", "0.3", "--pred_ratio_var", "0", "0.2",
        "--lr", "0.05", "--epochs", "3", "--freeze_last_layer", "1", "--clip_grad", "0.05",
        "--drop_path", "0.1", "--precision", "fp64", "--data_path", "synthetic:16"]

STEP_CASES = {
    "default": [],  # separate student patch head, shared teacher head (reference defaults)
    "shared-head-no-locals": ["--shared_head", "true", "--norm_last_layer", "false",
                              "--local_crops_number", "0"],
    "lambdas-rand-masks": ["--lambda1", "0.7", "--lambda2", "1.5", "--pred_shape", "rand",
                           "--pred_ratio", "0.5", "--pred_ratio_var", "0",
                           "--momentum_teacher", "0.9"],
}


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_train_steps_match_reference(ref, tmp_path, case):
    compare_train_steps_with_reference(ref, TINY + STEP_CASES[case], tmp_path)
    assert _no_process_group()
