"""What a resume changes: this run's flags against the ``args`` stored in the checkpoint.

``compare_flags`` sorts every flag that differs into one of three kinds:

* **model**: the flag builds another network (``--arch``, head sizes, ...). Refused with
  ``IncompatibleCheckpointError``; loading would either fail on the shapes or silently train
  another model than the one the checkpoint's weights belong to.
* **accepted with a warning**: schedules (``--epochs``, ``--lr``, temperatures, ...), data order
  (``--seed``, ``--data_path`` of the same size) and batch (``--batch_size_per_gpu``). Each gets
  one line naming the old and the new value and what it does to the run from here on.
* **a mid-epoch position that cannot be honoured**: a checkpoint written mid-epoch stores a
  sample position in that epoch's permutation of the dataset; a dataset of another size has
  another permutation, so the position means nothing. A usage error naming ``--data_path``.

Flags that only say how the run is carried out (workers, logging, back ends, where the output
goes) are not compared.
"""
from __future__ import annotations

import json
import os

from ibot_fast.checkpoint import IncompatibleCheckpointError

MODEL_FLAGS = ("arch", "patch_size", "out_dim", "patch_out_dim", "shared_head",
               "shared_head_teacher", "norm_last_layer", "head_hidden_dim",
               "head_bottleneck_dim", "use_masked_im_modeling", "global_crops_size")

SCHEDULE_FLAGS = {
    "epochs": "the lr/wd/momentum and teacher-temperature schedules are rebuilt for {new} "
              "epochs from epoch {epoch}",
    "lr": "the lr schedule is rebuilt from epoch {epoch}",
    "min_lr": "the lr schedule is rebuilt from epoch {epoch}",
    "warmup_epochs": "the lr schedule is rebuilt from epoch {epoch}",
    "weight_decay": "the weight-decay schedule is rebuilt from epoch {epoch}",
    "weight_decay_end": "the weight-decay schedule is rebuilt from epoch {epoch}",
    "momentum_teacher": "the teacher EMA momentum schedule is rebuilt from epoch {epoch}",
    "teacher_temp": "the teacher temperature changes from epoch {epoch}",
    "warmup_teacher_temp": "the teacher temperature changes from epoch {epoch}",
    "warmup_teacher_temp_epochs": "the teacher temperature changes from epoch {epoch}",
    "teacher_patch_temp": "the teacher patch temperature changes from epoch {epoch}",
    "warmup_teacher_patch_temp": "the teacher patch temperature changes from epoch {epoch}",
    "freeze_last_layer": "the last layer is frozen for another number of epochs",
    "max_steps_per_epoch": "the steps per epoch (and with them the schedules) change from "
                           "epoch {epoch}",
}

# How the run is carried out, not what it computes: never compared.
NOT_COMPARED = frozenset({
    "output_dir", "resume", "load_from", "num_workers", "progress", "log_freq", "device",
    "data_backend", "keep_checkpoints", "saveckp_freq", "knn_eval", "knn_train_path",
    "knn_val_path", "knn_every", "tensorboard", "trust_pickle", "deterministic", "dist_url",
    "local_rank", "preset", "compile", "attn_backend", "loss_backend", "mask_backend",
    "fast_step", "fsdp", "threads", "config", "ema_backend", "fused_head_loss", "head_tokens",
    "packed_crops", "on_nan",
})


class ResumeUsageError(ValueError):
    """The run's flags cannot continue the checkpoint's mid-epoch position (exit code 2)."""


def _fmt(v) -> str:
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v)
    return str(v)


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def compare_flags(old: dict | None, new: dict, *, path: str, epoch: int,
                  position: dict | None = None, dataset_size: int | None = None,
                  world_size: int = 1) -> list[str]:
    """Warnings (one line each) for the flags that differ from the checkpoint's ``old`` args;
    raises ``IncompatibleCheckpointError`` (model flags) or ``ResumeUsageError`` (a mid-epoch
    position that cannot be honoured). ``epoch``: the epoch the resume starts in."""
    if not old:
        return []
    changed = [k for k in new if k in old and k not in NOT_COMPARED and not _same(old[k], new[k])]
    model = [k for k in changed if k in MODEL_FLAGS]
    if model:
        what = ", ".join(f"--{k} {_fmt(old[k])} -> {_fmt(new[k])}" for k in model)
        raise IncompatibleCheckpointError(
            f"checkpoint {path} was written by another model ({what}): resuming would train a "
            f"different network on its weights. Use the checkpoint's values, or another "
            f"--output_dir / --resume false to start over.")

    mid = position is not None and int(position.get("epoch", -1)) == epoch
    if mid:
        old_size = position.get("dataset_size")
        known = old_size is not None and dataset_size is not None
        if (int(old_size) != dataset_size) if known else "data_path" in changed:
            size = f"a {old_size}-image dataset" if old_size is not None else "its dataset"
            raise ResumeUsageError(
                f"checkpoint {path} stopped in the middle of epoch {epoch}, at sample "
                f"{position['samples']} of {size} (--data_path {_fmt(old.get('data_path'))}); "
                f"this run's --data_path {_fmt(new.get('data_path'))} has "
                f"{dataset_size} images, so that position cannot be continued. Use "
                f"--data_path {_fmt(old.get('data_path'))} at least to the end of epoch "
                f"{epoch}, or start over with --resume false or another --output_dir.")

    lines = []
    for k in changed:
        o, n = _fmt(old[k]), _fmt(new[k])
        head = f"--{k} {o} -> {n}: "
        if k in SCHEDULE_FLAGS:
            lines.append(head + SCHEDULE_FLAGS[k].format(new=n, epoch=epoch))
        elif k == "seed":
            lines.append(head + "the data order, crops, masks and drop-path draws differ from "
                         "here on" + (f"; the rest of epoch {epoch} comes from another shuffle, "
                                      f"so some of its images are seen twice and others not at "
                                      f"all" if mid else ""))
        elif k == "batch_size_per_gpu":
            gb_old, gb_new = int(old[k]) * world_size, int(new[k]) * world_size
            msg = (f"the global batch is {gb_new} instead of {gb_old}: the steps per epoch, the "
                   f"lr (scaled by global batch / 256) and the schedules are rebuilt from "
                   f"epoch {epoch}")
            if mid and dataset_size is not None:
                start = int(position["samples"])
                rest = (dataset_size - start) % gb_new
                msg += (f"; epoch {epoch} goes on from sample {start} (step {start // gb_new} "
                        f"of the new batch)" + (f", and its last {rest} sample(s), less than "
                                                f"a batch, are dropped" if rest else ""))
            lines.append(head + msg)
        elif k == "data_path":
            lines.append(head + f"the epochs from {epoch} train on the other data"
                         + (f" ({dataset_size} images)" if dataset_size is not None else ""))
        else:
            lines.append(head + f"training from epoch {epoch} on differs from the "
                         f"checkpoint's run")
    return lines


def steps_logged_after(step_log: str, resume_it: int) -> tuple[int, int | None]:
    """(records in ``steps.jsonl`` at iteration >= ``resume_it``, the last such iteration):
    the steps the interrupted run did after its checkpoint, which this run redoes."""
    if not os.path.isfile(step_log):
        return 0, None
    n, last = 0, None
    with open(step_log) as f:
        for ln in f:
            if not ln.strip():
                continue
            try:
                it = json.loads(ln).get("it")
            except ValueError:
                continue
            if isinstance(it, int) and it >= resume_it:
                n, last = n + 1, it if last is None else max(last, it)
    return n, last
