"""Helpers shared by several test files (import them: ``from helpers import ...``)."""
import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ibot_fast.config import parse_args
from ibot_fast.masking import MaskBatch
from ibot_fast.train import Trainer

# =================================================================================================
# Loss stack (tests/test_loss_*.py, tests/test_soft_ce.py)
# =================================================================================================


def rel_err(actual, expected):
    """max |a - e| / max |e|: 'relative' for scalars, scale-relative for tensors."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def device_for(backend):
    """Triton runs on CUDA tensors where a GPU exists, else under TRITON_INTERPRET=1 on CPU."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


@pytest.fixture
def small_blocks(monkeypatch):
    """Several K blocks (Triton) and several row chunks (the op's torch back end, Sinkhorn-Knopp)
    even at tiny shapes. Patched where the functions live (an attribute missing there fails)."""
    import ibot_fast.loss.sinkhorn as sk
    from ibot_fast.fused_loss import soft_ce
    monkeypatch.setattr(inspect.getmodule(soft_ce), "_default_chunk_rows", lambda K: 5)
    monkeypatch.setattr(sk, "_chunk_rows", lambda K: 5)
    try:
        import ibot_fast.kernels.soft_ce_triton as ks
    except ImportError:  # pragma: no cover - triton missing: torch back end only
        return
    monkeypatch.setattr(ks, "default_block_k", lambda K: 16)


@pytest.fixture
def interpreter_tests_need_the_interpreter(request):
    """Tests that feed CPU tensors to backend="triton": on a GPU machine triton compiles for
    real and rejects them, unless TRITON_INTERPRET=1 was set by hand; the gpu-marked tests
    cover the compiled kernels there. Use it with ``pytestmark = usefixtures(...)``."""
    callspec = getattr(request.node, "callspec", None)
    if (callspec is not None and callspec.params.get("backend") == "triton"
            and "gpu" not in request.keywords and torch.cuda.is_available()
            and os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("CPU interpreter test: run with TRITON_INTERPRET=1")


def make_masks(seed, B=5, H=3):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, H, H, generator=g) < 0.4
    m[0] = False  # no masked token
    m[1] = True  # all masked
    m[2] = False
    m[2, 1, 2] = True  # exactly one
    return m


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


def linear_logits(seed, rows, K_out, D=6):
    """Student logits from a Linear, as in iBOT's head: the op upstream of the loss whose
    parameter (and input) gradients must not change when the logits are overwritten."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(D, K_out).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(K_out, D, generator=g) * 0.7)
        lin.bias.copy_(torch.randn(K_out, generator=g) * 0.1)
    return lin, torch.randn(*rows, D, generator=g, dtype=torch.float64)


# ---- an independent fp64 transcription of the iBOT loss ---------------------------------------
# Written from the maths (the docstring of ibot_fast/loss/reference.py) as plain loops over the
# teacher crop q, the student crop v and the image b; it shares no code with ibot_fast.loss.
TR_RTOL = 1e-5
TR_K, TR_K2, TR_N = 64, 37, 16  # K2 deliberately not a power of two; N = 4x4 patch grid


def transcribed_ibot_loss(s_cls, s_patch, s_local, t_cls, t_patch, masks, center, center2,
                          tau, tau2, ng, nl, lambda1=1.0, lambda2=1.0, student_temp=0.1,
                          m=0.9, m2=0.9):
    """The [CLS] and patch terms and the centre update as loops. Crop-major rows:
    row = crop * B + b.

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


def transcription_batch(seed, ng, nl, B, mask_shape="grid", special_masks=True):
    """Random logits (crop-major), masks for all crops (locals get 2x2 masks, never read)."""
    g = torch.Generator().manual_seed(seed)
    batch = dict(
        s_cls=torch.randn(ng * B, TR_K, generator=g) * 2.0,
        s_patch=torch.randn(ng * B, TR_N, TR_K2, generator=g) * 2.0,
        s_local=torch.randn(nl * B, TR_K, generator=g) * 2.0 if nl > 0 else None,
        t_cls=torch.randn(ng * B, TR_K, generator=g) * 0.3 + 0.1,
        t_patch=torch.randn(ng * B, TR_N, TR_K2, generator=g) * 0.3 - 0.05,
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
        masks.append(mk.reshape(B, TR_N) if mask_shape == "flat" else mk)
    masks += [torch.ones(B, 2, 2, dtype=torch.bool) for _ in range(nl)]
    batch["masks"] = masks
    return batch


def run_module(loss_fn, batch, epoch, dtype=torch.float32):
    """A loss module (IBOTLoss, IBOTLossReference) on leaf copies of the student inputs;
    returns (out, grads dict)."""
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
        assert rel_err(out[key], ref[key]) < TR_RTOL, (key, out[key].item(), ref[key].item())
    assert set(grads) == set(ref_grads)
    for key in ref_grads:
        assert grads[key] is not None and grads[key].shape == ref_grads[key].shape
        assert rel_err(grads[key], ref_grads[key]) < TR_RTOL, key
    assert rel_err(loss_fn.center.reshape(-1), ref_c) < TR_RTOL
    assert rel_err(loss_fn.center2.reshape(-1), ref_c2) < TR_RTOL
    assert loss_fn.center.shape == (1, TR_K) and loss_fn.center2.shape == (1, 1, TR_K2)
    return out


# =================================================================================================
# Moved from tests/test_train.py
# =================================================================================================


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# A tiny but complete configuration: 16-px global / 8-px local crops, patch 8 (2x2 / 1x1 grids).
TINY = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "16",
        "--local_crops_size", "8", "--local_crops_number", "2", "--out_dim", "64",
        "--head_hidden_dim", "32", "--head_bottleneck_dim", "16", "--batch_size_per_gpu", "4",
        "--precision", "fp32", "--warmup_teacher_temp_epochs", "1", "--warmup_epochs", "1",
        "--num_workers", "0", "--progress", "false", "--log_freq", "1",
        "--pred_ratio", "0", "0.3", "--pred_ratio_var", "0", "0.2", "--lr", "0.05"]


# The same run on a Swin (swin_nano, window 7): 64-px globals give a 16x16 first stage (padded to
# 21x21 and shifted; a 2x2 MIM grid), 32-px locals. argparse keeps the last value of a flag.
SWIN_FLAGS = ["--arch", "swin_nano", "--patch_size", "4", "--global_crops_size", "64",
              "--local_crops_size", "32"]
SWIN_TINY = TINY + SWIN_FLAGS


def tiny_args(tmp_path, *extra):
    return parse_args(TINY + ["--data_path", "synthetic:16", "--output_dir", str(tmp_path),
                              *extra])


# ------------------------------------------------------------------------ resume
def read_jsonl(path):
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


# --------------------------------------------------------------------------- DDP
def torchrun_tiny(nproc, out, batch, tmp_path, *extra, config=TINY):
    """``torchrun -m ibot_fast.train`` on ``config`` for two fp64 epochs without drop path."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(nproc), "-m", "ibot_fast.train", *config,
           "--data_path", "synthetic:16", "--output_dir", str(out), "--epochs", "2",
           "--batch_size_per_gpu", str(batch), "--drop_path", "0", "--precision", "fp64",
           *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def assert_same_weights(path_a, path_b):
    """Student, teacher and centres of two checkpoints agree to 1e-8 (fp64 runs)."""
    sa = torch.load(path_a, weights_only=True)
    sb = torch.load(path_b, weights_only=True)
    for key in ("student", "teacher", "ibot_loss"):
        for k in sa[key]:
            torch.testing.assert_close(sa[key][k], sb[key][k], rtol=1e-8, atol=1e-10,
                                       msg=f"{key}.{k}")


# =================================================================================================
# Moved from tests/test_knn.py
# =================================================================================================


def write_image_folder(root, n_per_class=6, size=20):
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(n_per_class):
            img = np.zeros((size, size, 3), np.uint8)
            img[..., c] = 200 + rng.integers(0, 50)
            Image.fromarray(img).save(root / f"c{c}" / f"{i}.png")


# =================================================================================================
# Moved from tests/test_fast_step.py
# =================================================================================================


# The fast-step tests' model: vit_nano (4 blocks, width 128), 16-px globals / 8-px locals with 8-px patches (2x2 / 1x1
# grids), 2 local crops, drop path 0.1 (the coins matter), clipping that bites.
FAST_TINY = ["--arch", "vit_nano", "--patch_size", "8", "--global_crops_size", "16",
        "--local_crops_size", "8", "--local_crops_number", "2", "--out_dim", "64",
        "--head_hidden_dim", "32", "--head_bottleneck_dim", "16", "--batch_size_per_gpu", "4",
        "--warmup_teacher_temp_epochs", "1", "--warmup_epochs", "1", "--num_workers", "0",
        "--progress", "false", "--log_freq", "1", "--pred_ratio", "0", "0.3",
        "--pred_ratio_var", "0", "0.2", "--lr", "0.05", "--epochs", "3",
        "--freeze_last_layer", "1", "--clip_grad", "0.05", "--drop_path", "0.1"]


def fast_args(tmp_path, *extra):
    """Args of the fast-step tests (FAST_TINY on synthetic data)."""
    return parse_args(FAST_TINY + ["--data_path", "synthetic:16", "--output_dir", str(tmp_path),
                              *extra])


def run_steps(trainer, batches, dtype, steps):
    """Steps (epoch, it): one in the frozen first epoch, then epoch 1 (lr > 0). Returns the
    losses, the gradients after each step, and the trainer."""
    n = trainer.iters_per_epoch
    out = []
    for k, (epoch, it) in enumerate([(0, 1), (1, n), (1, n + 1)][:steps]):
        images, _, masks = batches[k % len(batches)]
        images = [im.to(dtype) for im in images]
        torch.manual_seed(100 + k)  # the same drop-path coins on both sides
        res = trainer.train_step(images, masks, epoch, it)
        grads = {name: None if p.grad is None else p.grad.clone()
                 for name, p in trainer.student_without_ddp.named_parameters()}
        out.append((res, grads))
    return out


_REFERENCE_RUNS: dict = {}  # the reference trajectory of a configuration, computed once


def reference_run(tmp_path, precision, ref_extra, steps, dtype):
    key = (precision, tuple(ref_extra), steps)
    if key not in _REFERENCE_RUNS:
        ref = Trainer(fast_args(tmp_path / "ref", "--precision", precision, "--step", "reference",
                            *ref_extra))
        assert ref.path.name == "reference"
        loader = iter(ref.loader)
        batches = [next(loader) for _ in range(2)]
        assert all(isinstance(b[2], MaskBatch) for b in batches)
        _REFERENCE_RUNS[key] = (ref, batches, run_steps(ref, batches, dtype, steps))
    return _REFERENCE_RUNS[key]


def assert_same_runs(ta, ra, tb, rb, precision):
    """Trainer ``tb``'s step results (``rb`` from :func:`run_steps`) equal ``ta``'s: loss terms, every
    gradient, student and teacher weights, both centres."""
    if precision == "fp64":
        tight = params = dict(rtol=1e-9, atol=1e-12)
    else:  # see test_train: Adam turns last-bit gradient noise into fractions of an lr step
        tight = dict(rtol=1e-5, atol=1e-6)
        params = dict(rtol=0, atol=0.02 * float(ta.lr_schedule[ta.iters_per_epoch]))
    for (xa, ga), (xb, gb) in zip(ra, rb):
        for key in ("loss", "cls", "patch", "acc", "koleo"):
            torch.testing.assert_close(xb[key], xa[key], **tight, msg=key)
        for name in ga:
            assert (ga[name] is None) == (gb[name] is None), name
            if ga[name] is not None:
                torch.testing.assert_close(gb[name], ga[name], **tight, msg=f"grad {name}")
    for net in ("student_without_ddp", "teacher"):
        for (n, p), (_, q) in zip(getattr(ta, net).named_parameters(),
                                  getattr(tb, net).named_parameters()):
            torch.testing.assert_close(q, p, **params, msg=f"{net} {n}")
    for key in ("center", "center2"):
        torch.testing.assert_close(getattr(tb.ibot_loss, key), getattr(ta.ibot_loss, key),
                                   **tight, msg=key)


def compare_with_reference(tmp_path, extra, ref_extra=(), precision="fp64", steps=3):
    dtype = torch.float64 if precision == "fp64" else torch.float32
    ref, batches, r = reference_run(tmp_path, precision, ref_extra, steps, dtype)
    fast = Trainer(fast_args(tmp_path / "fast", "--precision", precision, *ref_extra, *extra))
    assert fast.path.name == "fast"  # the default
    f = run_steps(fast, batches, dtype, steps)
    assert_same_runs(ref, r, fast, f, precision)
    # the frozen epoch left the last layer untouched and without optimiser state
    v = fast.student_without_ddp.head.last_layer.weight_v
    assert fast.optimizer.state[v]["step"] == steps - 1
    return ref, fast


# =================================================================================================
# Moved from tests/test_masking.py
# =================================================================================================


def assert_union_of_rectangles(mask, rects, height, width):
    """``mask`` [H, W] is exactly the union of the accepted ``rects`` (top, left, h, w), each
    strictly smaller than the grid, inside it, and adding at least one cell."""
    union = np.zeros((height, width), dtype=bool)
    for top, left, h, w in rects:
        assert 1 <= h < height and 1 <= w < width  # strict: never a full side
        assert 0 <= top <= height - h and 0 <= left <= width - w
        before = union.sum()
        union[top:top + h, left:left + w] = True
        assert union.sum() > before  # every accepted block adds cells
    np.testing.assert_array_equal(union, mask)


# =================================================================================================
# Moved from tests/test_checkpoint.py
# =================================================================================================


def load_checkpoint(path):
    return torch.load(path, weights_only=True)


def flip_bit(path, part: str, key: str):
    """Flip one bit in the middle of the stored bytes of ``state[part][key]`` (found by its
    content, so wherever its storage lies) and check that ``torch.load`` returns the change."""
    before = load_checkpoint(path)
    t = before[part][key].contiguous()
    clean = open(path, "rb").read()
    raw, at = t.numpy().tobytes(), -1
    while True:  # a fresh teacher equals the student: find the occurrence that is the teacher's
        at = clean.find(raw, at + 1)
        assert at >= 0, f"the bytes of {part}.{key} are not in {path}"
        data = bytearray(clean)
        data[at + len(raw) // 2] ^= 0x10
        open(path, "wb").write(bytes(data))
        after = torch.load(path, weights_only=True)  # torch itself does not notice
        if not torch.equal(after[part][key], before[part][key]):
            return


def spawn_ranks(target, world: int, store: str, out_dir: str, timeout: float = 90):
    """Start ``target(rank, store, out_dir)`` in ``world`` spawned processes and wait up to
    ``timeout`` s; processes still alive then are terminated. Returns (processes, hung)."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, store, out_dir), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.terminate()
        p.join(5)
    return procs, hung


# =================================================================================================
# Parity with a reference checkout (tests/test_reference_repo.py, tests/test_swin.py)
# =================================================================================================
FP64 = dict(rtol=1e-9, atol=1e-12)


def _reference_steps(trainer_or_ref, batches, schedule):
    out = []
    for k, (epoch, it) in enumerate(schedule):
        images, _, masks = batches[k]
        images = [im.double() for im in images]
        # drop path: the reference draws one torch.rand per residual branch in block order,
        # teacher (none), student globals, student locals; the reference path and the fast
        # step draw the same numbers in the same order (tests/test_fast_step.py), so seeding
        # each step makes the coins equal on all three sides
        torch.manual_seed(100 + k)
        if not hasattr(trainer_or_ref, "train_step"):
            res = trainer_or_ref(images, list(masks), epoch, it)
            student = trainer_or_ref.student
        else:
            res = trainer_or_ref.train_step(images, masks, epoch, it)
            student = trainer_or_ref.student_without_ddp
        grads = {n: None if p.grad is None else p.grad.clone()
                 for n, p in student.named_parameters()}
        out.append(({k: v.detach().clone() for k, v in res.items() if k != "skipped"}, grads))
    return out


def compare_train_steps_with_reference(ref, argv, tmp_path):
    """Two training steps of the reference (``ReferenceTrainStep``: its networks, loss,
    clipping, last-layer freeze, AdamW, EMA) against ``Trainer.train_step`` on ``--step
    reference`` and the default step, from the same weights on the same batches, in fp64
    (``argv`` must hold ``--precision fp64``): loss terms, gradients, student and teacher
    weights, centres (tests/test_reference_repo.py, tests/test_swin.py)."""
    argv = list(argv) + ["--output_dir", str(tmp_path)]
    from ibot_fast.reference_repo import ReferenceTrainStep

    ours = Trainer(parse_args(argv + ["--step", "reference"]))
    fast = Trainer(parse_args(argv))  # the default step
    assert ours.path.name == "reference" and fast.path.name == "fast"
    theirs = ReferenceTrainStep(ref, ours.args, ours.iters_per_epoch)
    theirs.load_weights(ours.student_without_ddp.state_dict(), ours.teacher.state_dict())
    for name, p in fast.student_without_ddp.state_dict().items():  # same seed, same init
        assert torch.equal(p, ours.student_without_ddp.state_dict()[name]), name
    # the reference computed its own schedules: they must be ours
    for s in ("lr_schedule", "wd_schedule", "momentum_schedule"):
        torch.testing.assert_close(torch.as_tensor(getattr(ours, s)),
                                   torch.as_tensor(getattr(theirs, s)), rtol=1e-12, atol=1e-15)

    init = {k: v.clone() for k, v in theirs.student.state_dict().items()}
    loader = iter(ours.loader)
    batches = [next(loader) for _ in range(2)]
    n = ours.iters_per_epoch
    schedule = [(0, 1), (1, n)]  # frozen last layer (and lr 0 warm-up start), then lr > 0
    r = _reference_steps(theirs, batches, schedule)
    assert theirs.metrics["lr"] > 0 and theirs.metrics["loss"] == pytest.approx(
        float(r[-1][0]["loss"]))
    for label, trainer in (("reference path", ours), ("fast step", fast)):
        o = _reference_steps(trainer, batches, schedule)
        for k, ((rr, rg), (oo, og)) in enumerate(zip(r, o)):
            for key in ("loss", "cls", "patch", "acc"):
                torch.testing.assert_close(oo[key].double(), rr[key].double(), **FP64,
                                           msg=f"{label}: {key}, step {k}")
            assert rg.keys() == og.keys()
            for name in rg:
                assert (rg[name] is None) == (og[name] is None), f"{label}: grad {name}"
                if rg[name] is not None:
                    torch.testing.assert_close(og[name], rg[name], **FP64,
                                               msg=f"{label}: grad {name}, step {k}")
        for net in ("student", "teacher"):
            r_net = theirs.student if net == "student" else theirs.teacher
            o_net = trainer.student_without_ddp if net == "student" else trainer.teacher
            r_params = dict(r_net.named_parameters())
            o_params = dict(o_net.named_parameters())
            assert r_params.keys() == o_params.keys()
            for name, p in r_params.items():
                torch.testing.assert_close(o_params[name], p, **FP64,
                                           msg=f"{label}: {net} {name}")
        for key in ("center", "center2"):
            torch.testing.assert_close(getattr(trainer.ibot_loss, key).double(),
                                       getattr(theirs.ibot_loss, key).double(), **FP64,
                                       msg=f"{label}: {key}")
    # the steps moved the student (lr > 0 in step 2): the comparison above was not vacuous
    moved = max((v - init[k]).abs().max().item() for k, v in theirs.student.state_dict().items())
    assert moved > 1e-4
