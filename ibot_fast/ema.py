"""EMA teacher update: ``theta_t <- m * theta_t + (1 - m) * theta_s`` (reference §7.2 step 9).

Parameters are paired by name (only names present in both networks: ``masked_embed`` and, with a
separate student patch head but a shared teacher head, ``last_layer2`` are left out), buffers are
not averaged. The reference loops in Python with three kernels per tensor; here the same
arithmetic (multiply, scale, add — so the rounding is identical) runs as three foreach launches.
A flat-buffer Triton kernel comes with the fast-step issue; this stays its reference.
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
