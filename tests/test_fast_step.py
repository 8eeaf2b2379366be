"""The fast step (``--step fast``, the default; ibot_fast/fast_step.py) against the reference
step (``--step reference``), flag by flag; torch.compile without recompiles. The pieces it is
made of have their own files: test_packed.py (packed blocks, attention back ends, stochastic
depth), test_ema.py (the flat EMA and its Triton kernel)."""
from __future__ import annotations

import itertools
import os
import shutil

import pytest
import torch

from ibot_fast.fast_step import patch_token_rows
from ibot_fast.train import Trainer
from helpers import torchrun_tiny as _torchrun_tiny
from helpers import assert_same_weights
from helpers import FAST_TINY, SWIN_FLAGS, compare_with_reference, fast_args



# ------------------------------------------------------------------ the step, flag by flag
CPU_FLAGS = list(itertools.product(["true", "false"], ["selected", "all"], ["sdpa", "math"]))


@pytest.mark.parametrize("packed, head, attn", CPU_FLAGS)
def test_fast_step_equals_reference_fp64(tmp_path, packed, head, attn):
    """Every CPU combination of packing, head rows and attention back end, in fp64 (where
    the two paths must agree to rounding): losses, every gradient, weights after AdamW, the
    EMA teacher and both centres, over a frozen-last-layer step and two normal ones."""
    compare_with_reference(tmp_path, ["--packed_crops", packed, "--head_tokens", head,
                        "--attn_backend", attn, "--ema_backend", "torch"])


def test_fast_step_triton_ema_equals_reference(tmp_path):
    """The flat EMA through the Triton kernel (interpreter on the CPU)."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("triton runs on the CPU only under TRITON_INTERPRET=1")
    compare_with_reference(tmp_path, ["--ema_backend", "triton"], steps=2)


def test_fast_step_equals_reference_fp32(tmp_path):
    """The default fast flags in fp32 (losses/centres to 1e-5; weights to 2% of an lr step,
    the Adam noise floor explained in test_train)."""
    compare_with_reference(tmp_path, [], precision="fp32")


@pytest.mark.parametrize("extra", [
    ["--shared_head", "false"],                       # the reference's default head mix
    ["--shared_head", "true", "--norm_last_layer", "true"],
    ["--local_crops_number", "0"],                    # no local crops: one crop group
    ["--pred_start_epoch", "2"],                      # masks off: no selected patch row
    ["--pred_ratio", "0.5", "--pred_ratio_var", "0", "--pred_shape", "rand"],
], ids=["separate-patch-head", "frozen-g", "no-locals", "no-masks", "rand-masks"])
def test_fast_step_head_and_mask_variants(tmp_path, extra):
    compare_with_reference(tmp_path, [], ref_extra=extra, steps=2)


def test_fast_step_equals_reference_fp64_with_inexact_mask_weights(tmp_path):
    """24-px globals (3x3 patch grids): masks of 3 tokens occur, whose patch-loss weight
    1/(3·B·C) is not exact in fp32. The fast step takes its weights in fp64 in an fp64 run, so
    it still equals the reference step to 1e-9 (with fp32 weights: ~1e-8 off)."""
    ref, _ = compare_with_reference(tmp_path, [], ref_extra=["--global_crops_size", "24"],
                                    steps=2)
    counts = [int(c) for _, _, mb in [next(iter(ref.loader))] for c in mb.counts_CB.flatten()]
    assert 3 in counts, counts  # the case this test is about


def test_fast_step_plain_mask_list(tmp_path):
    """A loader without --mask_backend hands over a list of masks; the fast step builds the
    selection itself."""
    ref = Trainer(fast_args(tmp_path / "r", "--precision", "fp64", "--step", "reference"))
    fast = Trainer(fast_args(tmp_path / "f", "--precision", "fp64", "--fast_step", "true"))
    images, _, masks = next(iter(ref.loader))
    images = [im.double() for im in images]
    as_list = [m.clone() for m in masks]
    torch.manual_seed(0)
    a = ref.train_step(images, masks, 1, ref.iters_per_epoch)
    torch.manual_seed(0)
    b = fast.train_step(images, as_list, 1, ref.iters_per_epoch)
    torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-9, atol=1e-12)


def test_eager_step_runs_the_heads_on_the_masked_rows_only(tmp_path):
    """An eager step cuts the padded selection to the loader's masked count (a host int: no
    device sync): the student's and the teacher's patch head rows are exactly the masked
    tokens, not ng·B·max_masked, and the count survives ``.to()`` and pickling."""
    import pickle
    fast = Trainer(fast_args(tmp_path, "--precision", "fp64"))
    images, _, masks = next(iter(fast.loader))
    n = int(masks.n_valid)
    assert masks.n_valid_host == n < masks.idx_M.numel()
    assert masks.to("cpu").n_valid_host == pickle.loads(pickle.dumps(masks)).n_valid_host == n
    head_s = fast.student_without_ddp.head
    head_t = fast.teacher.head
    rows = []
    hooks = [h.last_layer2.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
             for h in (head_s, head_t)]
    try:
        fast.train_step([im.double() for im in images], masks, 1, fast.iters_per_epoch)
    finally:
        for h in hooks:
            h.remove()
    ng, B = len(masks), images[0].shape[0]
    n_cls = len(images) * B
    # a shared head's last_layer2 is its last_layer: the teacher's (shared by default) also
    # takes its ng·B [CLS] rows, the student's [CLS] and patch rows go in one matmul
    t_rows = [n, 1] + ([ng * B] if head_t.last_layer2 is head_t.last_layer else [])
    s_rows = [n_cls + n] if head_s.last_layer2 is head_s.last_layer else [n]
    assert sorted(rows) == sorted(t_rows + s_rows), (rows, ng, B, n)


def test_eager_step_cuts_the_last_student_block_to_the_read_rows(tmp_path):
    """The student's last block computes its MLP on the rows the head reads only ([CLS] of
    every crop + the masked patch rows); the other blocks, and the teacher's, on every token."""
    fast = Trainer(fast_args(tmp_path, "--precision", "fp64"))
    images, _, masks = next(iter(fast.loader))
    seen = {}
    hooks = [blk.mlp.register_forward_hook(
        lambda m, i, o, key=(net, k): seen.setdefault(key, []).append(i[0].shape[0]))
        for net, bb in (("student", fast.student_without_ddp.backbone),
                        ("teacher", fast.teacher.backbone))
        for k, blk in enumerate(bb.blocks)]
    try:
        fast.train_step([im.double() for im in images], masks, 1, fast.iters_per_epoch)
    finally:
        for h in hooks:
            h.remove()
    B, last = images[0].shape[0], len(fast.teacher.backbone.blocks) - 1
    tokens = sum(im.shape[0] * (1 + (im.shape[-1] // 8) ** 2) for im in images)  # 8-px patches
    assert seen[("student", last)] == [len(images) * B + masks.n_valid_host]
    assert all(seen[("student", k)] == [tokens] for k in range(last))
    g_tokens = len(masks) * B * (1 + (images[0].shape[-1] // 8) ** 2)
    assert all(seen[("teacher", k)] == [g_tokens] for k in range(last + 1))


def test_patch_token_rows_by_hand():
    # N = 4 patches per crop: flat patch index 6 is token 2 of image 1 -> row 1*5 + 1 + 2 = 8
    idx = torch.tensor([0, 3, 4, 6, 11])
    assert patch_token_rows(idx, 4).tolist() == [1, 4, 6, 8, 14]


# ---------------------------------------------------------------- bad flags fail clearly
@pytest.mark.parametrize("extra, needle", [
    (["--step", "reference", "--compile", "true"], "--step reference"),
    (["--fast_step", "false", "--drop_path_mode", "subset"], "--step reference"),
    (["--fast_step", "true", "--ema_teacher_bf16", "true"], "--precision bf16"),
    (["--fast_step", "true", "--attn_backend", "xformers"], "xformers"),
    (["--fast_step", "true", "--attn_backend", "varlen"], "CUDA"),
    (["--fast_step", "true", "--attn_backend", "flex"], "flex"),
])
def test_fast_flags_fail_with_message(tmp_path, extra, needle, capsys):
    """Usage errors (exit 2) from the flag validation, before any work."""
    if torch.cuda.is_available() and "--attn_backend" in extra:
        pytest.skip("the attention back ends may be available on this machine")
    with pytest.raises(SystemExit) as exc:
        fast_args(tmp_path, "--precision", "fp32", *extra)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("model", [[], SWIN_FLAGS], ids=["vit", "swin"])
def test_bf16_teacher_copy_follows_the_ema(tmp_path, model):
    """--ema_teacher_bf16: the EMA pass writes the bf16 copy the teacher forward runs on."""
    tr = Trainer(fast_args(tmp_path, *model, "--precision", "bf16", "--fast_step", "true",
                           "--ema_teacher_bf16", "true", "--ema_backend", "torch"))
    images, _, masks = next(iter(tr.loader))
    ema = tr.path.ema
    start = ema.teacher_bf16_flat.clone()
    out = tr.train_step(images, masks, 1, tr.iters_per_epoch)
    assert torch.isfinite(out["loss"])
    assert not torch.equal(ema.teacher_bf16_flat, start)  # the EMA moved it
    assert torch.equal(ema.teacher_bf16_flat, ema.teacher_flat.to(torch.bfloat16))
    for name, p in ema.bf16_parameters().items():
        assert torch.equal(p, dict(tr.teacher.named_parameters())[name].to(torch.bfloat16))
    # the teacher forward reads the copy: changing only the copy changes its output
    globals_ = torch.cat(images[:tr.path.ng])
    with torch.no_grad(), tr.autocast():
        before = tr.path.teacher_forward(globals_, None)[0]
        ema.teacher_bf16_flat.mul_(0.5)
        after = tr.path.teacher_forward(globals_, None)[0]
    assert torch.isfinite(before).all() and not torch.equal(before, after)


# ------------------------------------------------------------------------ stochastic depth
def test_subset_mode_without_drop_path_is_the_reference(tmp_path):
    """--drop_path_mode subset changes nothing where no block drops (--drop_path 0)."""
    compare_with_reference(tmp_path, ["--drop_path_mode", "subset"], ref_extra=["--drop_path", "0"], steps=2)


def test_subset_mode_trains(tmp_path):
    tr = Trainer(fast_args(tmp_path, "--precision", "fp32", "--fast_step", "true",
                       "--drop_path_mode", "subset", "--drop_path", "0.5"))
    images, _, masks = next(iter(tr.loader))
    before = tr.student_without_ddp.backbone.blocks[3].mlp.fc1.weight.detach().clone()
    out = tr.train_step(images, masks, 1, tr.iters_per_epoch)
    assert torch.isfinite(out["loss"])
    assert not torch.equal(before, tr.student_without_ddp.backbone.blocks[3].mlp.fc1.weight)


# ------------------------------------------------------------------------- torch.compile
# The compile tests run on aot_eager (dynamo's capture, its guards -- what decides a recompile
# -- and AOT autograd, without inductor's code generation: a cold inductor compile costs one
# to two minutes each on 2 CPU cores, over the suite's budget). IBOT_TEST_INDUCTOR=1 runs them
# on inductor too.
COMPILE_BACKENDS = [
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.skipif(
        os.environ.get("IBOT_TEST_INDUCTOR") != "1",
        reason="a cold inductor compile takes one to two minutes on 2 CPU cores; "
               "IBOT_TEST_INDUCTOR=1 runs it")),
]


@pytest.mark.slow
@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compiled_blocks_do_not_recompile(tmp_path, backend):
    """--compile true (tiny model): the first step compiles; four more steps with different
    masks (counts differ, shapes do not) compile nothing new, and the compiled step's loss
    equals the eager fast step's."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    eager = Trainer(fast_args(tmp_path / "e", "--precision", "fp32", "--fast_step", "true"))
    comp = Trainer(fast_args(tmp_path / "c", "--precision", "fp32", "--fast_step", "true",
                             "--compile", "true", "--compile_backend", backend))
    loader = iter(eager.loader)
    batches = [next(loader) for _ in range(4)] + [next(iter(eager.loader))]
    assert len({int(b[2].n_valid) for b in batches}) > 1  # the masks really differ
    torch._dynamo.reset()
    counters.clear()
    n = eager.iters_per_epoch
    try:
        for k, (images, _, masks) in enumerate(batches):
            if k == 1:  # everything compiled in step 0; a recompile now raises
                torch._dynamo.config.error_on_recompile = True
                graphs = counters["stats"]["unique_graphs"]
            torch.manual_seed(k)
            a = eager.train_step(images, masks, 1, n + k)
            torch.manual_seed(k)
            b = comp.train_step(images, masks, 1, n + k)
            torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-4, atol=1e-5)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert counters["stats"]["unique_graphs"] == graphs > 0
    assert not counters["recompiles"]


# ------------------------------------------------------------------------------ DDP (gloo)
def _torchrun(nproc, out, batch, tmp_path, *extra):
    _torchrun_tiny(nproc, out, batch, tmp_path, *extra, config=FAST_TINY)


@pytest.fixture(scope="module")
def reference_one(tmp_path_factory):
    """The reference step in one process with 4 images for two epochs: what every two-process
    run below is compared with, trained once for all of them (a test that continues it copies
    the directory)."""
    base = tmp_path_factory.mktemp("reference_one")
    _torchrun(1, base / "one", 4, base, "--step", "reference")
    return base / "one"


@pytest.mark.slow
def test_fast_step_two_process_gloo_equals_reference_one_process(tmp_path, reference_one):
    """The fast step under DDP (2 gloo processes x 2 images: its own DDP wrapper around the
    fast student forward) against the reference step in one process with 4 images."""
    _torchrun(2, tmp_path / "two", 2, tmp_path, "--fast_step", "true")
    assert_same_weights(tmp_path / "two" / "checkpoint.pth", reference_one / "checkpoint.pth")


# ------------------------------------------------------------------------------ FSDP2 (gloo)
def _checkpoint(path):
    return torch.load(path, weights_only=True)


def _assert_same_checkpoint(sa, sb):
    for key in ("student", "teacher", "ibot_loss"):
        assert sa[key].keys() == sb[key].keys(), key
        for k in sa[key]:
            torch.testing.assert_close(sa[key][k], sb[key][k], rtol=1e-8, atol=1e-10,
                                       msg=f"{key}.{k}")
    oa, ob = sa["optimizer"], sb["optimizer"]
    # the fast step's AdamW is fused=True, the reference's not: every other entry is equal
    plain = [[{k: v for k, v in g.items() if k != "fused"} for g in o["param_groups"]]
             for o in (oa, ob)]
    assert plain[0] == plain[1]
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for name in ob["state"][i]:
            torch.testing.assert_close(oa["state"][i][name].cpu(), ob["state"][i][name].cpu(),
                                       rtol=1e-8, atol=1e-10, msg=f"optimizer {i} {name}")


@pytest.mark.slow
def test_fsdp_two_process_gloo_equals_reference_and_checkpoints_interchange(tmp_path,
                                                                          reference_one):
    """--fsdp true on 2 gloo processes x 2 images (student and teacher sharded per block) for
    two epochs, against the reference step in one process with 4 images: weights, teacher,
    centres and the full AdamW state of the checkpoint. Then the FSDP checkpoint (a) loads in a
    one-process non-FSDP trainer and (b) is resumed by FSDP for a third epoch, which again
    equals the reference's third epoch (the sharded load path and the saved optimiser state)."""
    two, one = tmp_path / "two", tmp_path / "one"
    _torchrun(2, two, 2, tmp_path, "--fast_step", "true", "--fsdp", "true")
    shutil.copytree(reference_one, one)  # continued for a third epoch below
    sa, sb = _checkpoint(two / "checkpoint.pth"), _checkpoint(one / "checkpoint.pth")
    _assert_same_checkpoint(sa, sb)

    # (a) a checkpoint written under FSDP loads in a non-FSDP (here: reference) run
    tr = Trainer(fast_args(tmp_path / "load", "--precision", "fp64", "--drop_path", "0",
                       "--epochs", "3", "--step", "reference"))
    tr.load(str(two / "checkpoint.pth"))
    assert tr.start_epoch == 2
    for n, p in tr.student_without_ddp.named_parameters():
        assert torch.equal(p.detach(), sa["student"][n]), n
    for n, p in tr.teacher.named_parameters():
        assert torch.equal(p.detach(), sa["teacher"][n]), n

    # (b) FSDP resumes its own checkpoint (sharded load) and stays on the reference
    _torchrun(2, two, 2, tmp_path, "--fast_step", "true", "--fsdp", "true", "--epochs", "3")
    _torchrun(1, one, 4, tmp_path, "--epochs", "3", "--step", "reference")
    sa, sb = _checkpoint(two / "checkpoint.pth"), _checkpoint(one / "checkpoint.pth")
    assert sa["epoch"] == sb["epoch"] == 3
    _assert_same_checkpoint(sa, sb)


# The two-process compile tests below use COMPILE_BACKENDS too (the DDP / FSDP-wrapped code).


def _two_processes_equal_reference(tmp_path, reference_one, *flags):
    """The fast step with ``flags`` on 2 gloo processes x 2 images for two epochs: checkpoint
    (weights, teacher, centres, AdamW state) equal to the one-process reference run's."""
    two = tmp_path / "two"
    _torchrun(2, two, 2, tmp_path, "--fast_step", "true", *flags)
    _assert_same_checkpoint(_checkpoint(two / "checkpoint.pth"),
                            _checkpoint(reference_one / "checkpoint.pth"))


@pytest.mark.slow
@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_fsdp_with_compiled_blocks_two_process_gloo_equals_reference(tmp_path, reference_one,
                                                                     backend):
    """--fsdp true with --compile blocks (the compiled blocks are what fully_shard wraps) on 2
    gloo processes, two epochs, against the reference step in one process."""
    _two_processes_equal_reference(tmp_path, reference_one, "--fsdp", "true",
                                   "--compile", "blocks", "--compile_backend", backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_ddp_with_compiled_step_two_process_gloo_equals_reference(tmp_path, reference_one,
                                                                  backend):
    """--compile step (forward + loss as one graph, the student DDP-wrapped inside it) on 2
    gloo processes, two epochs, against the reference step in one process."""
    _two_processes_equal_reference(tmp_path, reference_one, "--compile", "step",
                                   "--compile_backend", backend)


def test_fsdp_needs_a_process_group(tmp_path, monkeypatch, capsys):
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group exists in this test process")
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # not under torchrun
    with pytest.raises(SystemExit) as exc:
        fast_args(tmp_path, "--precision", "fp64", "--fast_step", "true", "--fsdp", "true")
    assert exc.value.code == 2 and "torchrun" in capsys.readouterr().err


@pytest.mark.parametrize("extra, needle", [
    (["--step", "reference", "--fsdp", "true"], "--step reference"),
])
def test_fsdp_flag_needs_fast_step(tmp_path, extra, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        fast_args(tmp_path, "--precision", "fp64", *extra)
    assert exc.value.code == 2 and needle in capsys.readouterr().err
