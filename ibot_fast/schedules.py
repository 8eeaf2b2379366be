"""Per-iteration and per-epoch schedules, with the reference's exact values.

* `cosine_scheduler` -- learning rate, weight decay and teacher momentum, one value per
  iteration (reference `utils.cosine_scheduler`; docs/reference-semantics.md#schedules).
* `teacher_temp_schedule` -- the teacher temperatures of the loss, one value per epoch
  (reference `iBOTLoss.__init__`; docs/reference-semantics.md#temperatures).

Both return float64 numpy arrays, like the reference, so indexing them gives the same numbers.
"""
from __future__ import annotations

import numpy as np

__all__ = ["cosine_scheduler", "teacher_temp_schedule"]


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """One value per iteration: a linear warm-up, then a half-cosine from `base_value` down
    (or up) towards `final_value`.

    With ``W = warmup_epochs * niter_per_ep`` and ``L = epochs * niter_per_ep - W``:

    * ``s[:W] = linspace(start_warmup_value, base_value, W)`` (endpoint included, so the
      peak appears at the last warm-up iteration *and* at the first cosine one);
    * ``s[W + i] = final + 0.5 * (base - final) * (1 + cos(pi * i / L))`` for ``i < L``,
      so the last value is just above (for a decay) `final_value`, never equal to it.

    With the default ``start_warmup_value=0`` the first value is exactly 0.
    """
    if epochs < 0 or niter_per_ep < 0 or warmup_epochs < 0:
        raise ValueError(f"cosine_scheduler: epochs ({epochs}), niter_per_ep ({niter_per_ep}) and "
                         f"warmup_epochs ({warmup_epochs}) must be non-negative")
    if warmup_epochs > epochs:
        raise ValueError(f"cosine_scheduler: warmup_epochs ({warmup_epochs}) is longer than the "
                         f"whole schedule ({epochs} epochs); lower --warmup_epochs")
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int, nepochs: int,
                          start_epoch: int = 0) -> np.ndarray:
    """One teacher temperature per epoch (length `nepochs`).

    * epochs ``[0, start_epoch)``: `warmup_temp` (the patch schedule holds it until MIM starts);
    * the next `warmup_epochs` epochs: ``linspace(warmup_temp, temp, warmup_epochs)``, endpoint
      included, so the ramp reaches `temp` at epoch ``start_epoch + warmup_epochs - 1``;
    * then `temp` for the remaining epochs.

    E.g. 0.04 -> 0.07 over 30 epochs: epoch 0 = 0.04, epoch 1 = 0.0410345, epoch 29 = 0.07.
    The reference's [CLS] schedule is ``start_epoch=0``; its patch schedule uses
    ``start_epoch=mim_start_epoch`` (for 0 that is the same ramp).
    """
    if warmup_epochs < 0 or start_epoch < 0:
        raise ValueError(f"teacher_temp_schedule: warmup_epochs ({warmup_epochs}) and start_epoch "
                         f"({start_epoch}) must be non-negative")
    if nepochs < warmup_epochs + start_epoch:
        raise ValueError(
            f"teacher temperature schedule does not fit: {start_epoch} epoch(s) before the "
            f"warm-up (mim_start_epoch / pred_start_epoch) + {warmup_epochs} warm-up epoch(s) "
            f"(warmup_teacher_temp_epochs) > {nepochs} epoch(s) in total (epochs); lower "
            f"--warmup_teacher_temp_epochs or --pred_start_epoch, or train longer")
    return np.concatenate((
        np.full(start_epoch, warmup_temp, dtype=np.float64),
        np.linspace(warmup_temp, temp, warmup_epochs),
        np.full(nepochs - warmup_epochs - start_epoch, temp, dtype=np.float64),
    ))
