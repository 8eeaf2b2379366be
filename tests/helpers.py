"""Helpers shared by several test files (import them: ``from helpers import ...``)."""
import inspect
import os

import pytest
import torch

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
