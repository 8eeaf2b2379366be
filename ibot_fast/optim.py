"""Optimiser pieces with the reference's semantics.

* Parameter groups: names ending in ``.bias`` or 1-D tensors are not weight-decayed; everything
  else is, including ``cls_token``, ``pos_embed``, ``masked_embed`` and the last layer's
  ``weight_g``/``weight_v``. Frozen tensors are left out. Group 0 is the decayed one: the
  weight-decay schedule is written to group 0 only.
* Clipping is per tensor (``coef = clip / (norm + 1e-6)``, applied when < 1), not a global norm.
  The reference calls ``.item()`` on every norm; we get identical numbers with foreach kernels
  and no host synchronisation.
* The last layer(s) get ``grad = None`` during the first ``freeze_last_layer`` epochs, so AdamW
  skips them entirely (no moment state, no decay): ``Trainer.train_step`` drops them from the
  step path's ``last_layer_params``.
"""
from __future__ import annotations

import torch
from torch import nn


def get_params_groups(model: nn.Module) -> list[dict]:
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def build_optimizer(name: str, groups: list[dict]) -> torch.optim.Optimizer:
    if name == "adamw":
        # PyTorch defaults (betas 0.9/0.999, eps 1e-8) as in the reference; lr and wd are
        # overwritten every iteration from the schedules.
        return torch.optim.AdamW(groups)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}; choose adamw or sgd")


@torch.no_grad()
def clip_gradients_per_tensor(params, clip: float) -> torch.Tensor | None:
    """Scale each gradient whose L2 norm exceeds ``clip`` down to ``clip/(norm+1e-6)``.

    Returns the per-tensor norms (a device tensor, for logging) without synchronising.
    Multiplying by ``min(coef, 1)`` equals the reference's "multiply when coef < 1" exactly,
    because multiplying by 1.0 is exact.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or clip <= 0:
        return None
    norms = torch.stack(torch._foreach_norm(grads))
    coefs = (clip / (norms + 1e-6)).clamp_(max=1.0)
    torch._foreach_mul_(grads, list(coefs.to(grads[0].dtype).unbind()))
    return norms


def set_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float):
    # plain floats: numpy scalars in the optimiser state would not load with weights_only=True
    lr, wd = float(lr), float(wd)
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if i == 0:  # only the regularised group is decayed
            group["weight_decay"] = wd
