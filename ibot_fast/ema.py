"""EMA teacher update after each optimiser step: ``theta_t <- m * theta_t + (1 - m) * theta_s``.

Parameters are paired by name (only names present in both networks: ``masked_embed`` and, with a
separate student patch head but a shared teacher head, ``last_layer2`` are left out), buffers are
not averaged. The reference loops in Python with three kernels per tensor; here the same
arithmetic (multiply, scale, add — so the rounding is identical) runs as three foreach launches.
:class:`FlatEMA` (the fast step's flat-buffer EMA) is tested against this one.
"""
from __future__ import annotations

import torch
from torch import nn


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


class EMATeacherUpdate:
    def __init__(self, student: nn.Module, teacher: nn.Module):
        s_params = dict(_unwrap(student).named_parameters())
        t_params = dict(_unwrap(teacher).named_parameters())
        # Keep the teacher's order; the reference zips both lists after filtering to common names.
        names = [n for n in t_params if n in s_params]
        self.names = names
        self.student_params = [s_params[n] for n in names]
        self.teacher_params = [t_params[n] for n in names]

    @torch.no_grad()
    def __call__(self, momentum: float):
        t, s = self.teacher_params, self.student_params
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, torch._foreach_mul(s, 1.0 - momentum))


EMA_BACKENDS = ("auto", "triton", "torch")


def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:
        return False


def check_ema_backend(backend: str, device_type: str) -> None:
    """Raise ValueError (naming the fix) when ``--ema_backend backend`` cannot run on a
    ``device_type`` device; the flag validation calls it before any work."""
    import os
    if backend not in EMA_BACKENDS:
        raise ValueError(f"--ema_backend must be one of {EMA_BACKENDS}, got {backend!r}")
    if backend == "triton":
        if not _triton_installed():
            raise ValueError("--ema_backend triton: triton is not installed; use --ema_backend "
                             "torch (or auto)")
        if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("--ema_backend triton needs a CUDA device (or TRITON_INTERPRET=1 "
                             "set before triton is imported, for CPU tests); use --ema_backend "
                             "torch (or auto)")


def _resolve_ema_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    check_ema_backend(backend, device.type)
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_installed() else "torch"
    if backend == "triton" and dtype not in (torch.float32, torch.float64):
        raise ValueError(f"--ema_backend triton updates fp32/fp64 buffers, got {dtype}")
    return backend


def flatten_parameters_(params: list[nn.Parameter]) -> torch.Tensor:
    """Make ``params`` views of one new contiguous buffer (values kept); returns the buffer.

    ``p.data = view`` keeps every Parameter object (optimisers, DDP and module references stay
    valid); only where its values live changes. All params must share dtype and device.
    """
    if not params:
        raise ValueError("flatten_parameters_ got no parameters")
    dtypes = {(p.dtype, p.device) for p in params}
    if len(dtypes) != 1:
        raise ValueError(f"flat EMA buffers need one dtype and device, got "
                         f"{sorted(map(str, dtypes))}")
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    off = 0
    for p in params:
        n = p.numel()
        p.data = flat[off:off + n].view_as(p)
        off += n
    return flat


class FlatEMA:
    """The EMA over one flat parameter buffer per network (the fast step's teacher update).

    Same pairing and maths as :class:`EMATeacherUpdate` (``t <- m·t + (1-m)·s`` over the
    parameters whose names both networks have), but the paired teacher parameters are views of
    one buffer ``teacher_flat`` and the student's of the leading part of ``student_flat`` (in the
    same order), so one ``lerp_`` -- or one Triton kernel (``kernels/ema_triton.py``) -- updates
    the whole teacher. ``bf16_copy=True`` also keeps ``teacher_bf16_flat``, a bf16 copy written
    by the same pass, for a bf16 teacher forward (:meth:`bf16_parameters`).

    Construction re-homes the parameters (see :func:`flatten_parameters_`); call it before
    anything captures ``p.data`` storage by pointer, and after the models are on their device
    in their final dtype.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, backend: str = "auto",
                 bf16_copy: bool = False):
        ref = EMATeacherUpdate(student, teacher)
        self.names = ref.names
        paired_s, paired_t = ref.student_params, ref.teacher_params
        seen = {id(p) for p in paired_s}
        rest_s = [p for p in dict.fromkeys(_unwrap(student).parameters()) if id(p) not in seen]
        self.student_flat = flatten_parameters_(paired_s + rest_s)
        self.teacher_flat = flatten_parameters_(paired_t)
        self.n = self.teacher_flat.numel()
        self.backend = _resolve_ema_backend(backend, self.teacher_flat.device,
                                            self.teacher_flat.dtype)
        self.teacher_params = paired_t
        self.teacher_bf16_flat = (torch.empty_like(self.teacher_flat, dtype=torch.bfloat16)
                                  .copy_(self.teacher_flat) if bf16_copy else None)

    @torch.no_grad()
    def __call__(self, momentum: float):
        s = self.student_flat[:self.n]
        if self.backend == "triton":
            from ibot_fast.kernels.ema_triton import ema_flat_
            ema_flat_(self.teacher_flat, s, momentum, self.teacher_bf16_flat)
        else:
            self.teacher_flat.lerp_(s, 1.0 - momentum)
            if self.teacher_bf16_flat is not None:
                self.teacher_bf16_flat.copy_(self.teacher_flat)

    def bf16_parameters(self) -> dict[str, torch.Tensor]:
        """``{teacher parameter name: bf16 view}`` for ``torch.func.functional_call``."""
        if self.teacher_bf16_flat is None:
            raise ValueError("FlatEMA was built without bf16_copy=True")
        out, off = {}, 0
        for name, p in zip(self.names, self.teacher_params):
            out[name] = self.teacher_bf16_flat[off:off + p.numel()].view(p.shape)
            off += p.numel()
        return out
