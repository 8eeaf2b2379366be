"""The two step paths behind ``--step fast|reference`` and what they share.

``Trainer.train_step`` (train.py) is the one skeleton of a training iteration: move the batch,
snapshot the centres for a possible skip, the path's forward and loss, backward, clipping, the
device-side finiteness record, skip, last-layer freeze, optimiser step, EMA, metrics. What
differs between the paths is a :class:`StepPath`: it builds, once, the student module the step
calls (DDP- or FSDP-wrapped when distributed), the optimiser and the EMA, and it provides
``forward_loss``.

* :class:`ReferencePath` (``--step reference``): the reference's computation order -- teacher
  and student ``MultiCropWrapper`` forwards (head on every token, local crops in a second pass),
  the dense ``IBOTLoss.forward``, AdamW, the foreach EMA. The ground truth of the tests.
* :class:`ibot_fast.fast_step.FastPath` (``--step fast``, the default): the same numbers with
  less work (selected-token head, packed crops, fused loss, fused AdamW, flat EMA).

Both leave checkpoints in the same format (:meth:`StepPath.network_state`).
"""
from __future__ import annotations

import torch
from torch import nn

from ibot_fast.ema import EMATeacherUpdate
from ibot_fast.loss.koleo import koleo_views
from ibot_fast.optim import build_optimizer, clip_gradients_per_tensor, get_params_groups

STEP_PATHS = ("fast", "reference")


class StepPath:
    """What a step path builds once and what the skeleton asks of it.

    Attributes set by each constructor: ``module`` (what the step calls for the student
    forward; the DDP / FSDP wrapper when distributed), ``optimizer``, ``ema`` (called with the
    momentum after the optimiser step), ``params`` (the student parameters that train, for
    clipping and the finiteness check) and ``last_layer_params`` (the ones frozen during the
    first ``--freeze_last_layer`` epochs). ``sharded``: the parameters are FSDP shards, so
    :meth:`network_state` is a collective.
    """

    name = ""
    sharded = False

    def __init__(self, student: nn.Module, teacher: nn.Module, ibot_loss: nn.Module,
                 ngcrops: int, koleo_weight: float = 0.0):
        self.student, self.teacher, self.ibot_loss = student, teacher, ibot_loss
        self.ng = ngcrops
        self.koleo_weight = koleo_weight  # 0: the reference's loss, no KoLeo term

    def add_koleo(self, terms: dict, z_cls: torch.Tensor) -> dict:
        """``--koleo_weight``: the KoLeo term of the student's global [CLS] bottleneck vectors
        ``z_cls`` [ng·B, bottleneck] in ``terms["koleo"]``, weighted into ``terms["loss"]``."""
        koleo = koleo_views(z_cls, self.ng)
        return dict(terms, koleo=koleo, loss=terms["loss"] + self.koleo_weight * koleo)

    def _collect_params(self) -> None:
        """Called by the constructors once the parameters are final (after FSDP sharding)."""
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.last_layer_params = [p for n, p in self.student.named_parameters()
                                  if "last_layer" in n and p.requires_grad]

    def forward_loss(self, images: list, masks, epoch: int):
        """Teacher and student forward and the loss, under the caller's autocast. Returns
        ``(loss terms, teacher [CLS] logits of the global crops, student [CLS] logits of the
        global crops)``; the terms hold ``loss``, ``cls`` and ``patch`` (and ``koleo`` with
        ``--koleo_weight``)."""
        raise NotImplementedError

    def clip_gradients(self, clip: float) -> torch.Tensor | None:
        """The reference's per-tensor clipping; returns the norms (device, no sync)."""
        return clip_gradients_per_tensor(self.params, clip)

    def network_state(self) -> dict:
        """``student``, ``teacher`` and ``optimizer`` state dicts in the checkpoint format."""
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_network_state(self, state: dict) -> None:
        from ibot_fast.checkpoint import strip_prefix
        self.student.load_state_dict(strip_prefix(state["student"]))
        self.teacher.load_state_dict(strip_prefix(state["teacher"]))
        self.optimizer.load_state_dict(state["optimizer"])


def ddp(module: nn.Module, device: torch.device) -> nn.Module:
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None)


class ReferencePath(StepPath):
    """``--step reference``: the reference's step, plain PyTorch."""

    name = "reference"

    def __init__(self, args, student, teacher, ibot_loss, device: torch.device,
                 world_size: int = 1):
        super().__init__(student, teacher, ibot_loss, args.global_crops_number,
                         args.koleo_weight)
        for m in (student, teacher):
            m.backbone.set_attn_backend(args.attn_backend)
        self.module = ddp(student, device) if world_size > 1 else student
        self.ema = EMATeacherUpdate(student, teacher)
        self.optimizer = build_optimizer(args.optimizer, get_params_groups(student))
        self._collect_params()

    def forward_loss(self, images, masks, epoch):
        ng = self.ng
        with torch.no_grad():  # the reference builds no graph here either
            teacher_output = self.teacher(images[:ng])
        koleo = self.koleo_weight > 0
        student_output = self.module(images[:ng], mask=masks[:ng], return_cls_bottleneck=koleo)
        if koleo:
            student_output, z_cls = student_output
        student_local_cls = self.module(images[ng:])[0] if len(images) > ng else None
        terms = self.ibot_loss(student_output, teacher_output, student_local_cls, masks, epoch)
        if koleo:
            terms = self.add_koleo(terms, z_cls)
        return terms, teacher_output[0], student_output[0]


def build_step_path(args, student, teacher, ibot_loss, device: torch.device,
                    world_size: int = 1) -> StepPath:
    """The path ``--step`` names, built once over the trainer's networks and loss."""
    if args.step == "reference":
        return ReferencePath(args, student, teacher, ibot_loss, device, world_size)
    from ibot_fast.fast_step import FastPath
    return FastPath(args, student, teacher, ibot_loss, device, world_size)


__all__ = ["STEP_PATHS", "ReferencePath", "StepPath", "build_step_path"]
