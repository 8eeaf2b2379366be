"""iBOT pre-training: ``torchrun [--nproc_per_node G] -m ibot_fast.train [flags]``.

One file a newcomer can read top to bottom: build data, models, loss and the step path from the
flags (``ibot_fast/config.py``), then for every step (``Trainer.train_step``, the one skeleton
of both step paths)

1. set lr / weight decay from the schedules,
2. the step path's forward and loss (``ibot_fast/step.py``): teacher (EMA, no grad) on the
   unmasked global crops, student on the masked global crops and the local crops, the iBOT
   loss ([CLS] across views + masked patch tokens within a view; updates the centres),
3. backward, per-tensor clipping, last layer frozen in the first epoch(s), optimiser step,
4. EMA of the teacher,

with logging every ``--log_freq`` steps (the only place a step waits for the device), an atomic
checkpoint every epoch, resume from the output directory, a loss curve and an optional k-NN
evaluation at the end. Faults (ibot_fast/reliability.py): SIGTERM/SIGUSR1 write a mid-epoch
checkpoint and exit 75; a non-finite step stops the run (exit 3) or is skipped (``--on_nan``);
a corrupt newest checkpoint falls back to the previous one.
``--step fast`` (default, ``ibot_fast/fast_step.py``) and ``--step reference`` (the reference's
computation order) give the same numbers; the tests compare them.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from ibot_fast import checkpoint as ckpt
from ibot_fast.config import parse_args
from ibot_fast.dist import DistInfo, cleanup, init_distributed, is_distributed
from ibot_fast.loss import IBOTLoss
from ibot_fast.masking import MaskGenerator
from ibot_fast.models import build_ibot_models, is_swin
from ibot_fast.models.swin import SWIN_MASK_CELL
from ibot_fast.optim import set_schedules
from ibot_fast.reliability import (EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_USAGE,
                                   MAX_SKIPPED_SHARE, NonFiniteMonitor, OutputDirLock,
                                   PreemptionHandler, TrainingStopped, any_rank, gather_objects,
                                   rng_state, set_rng_state)
from ibot_fast.resume import ResumeUsageError, compare_flags, steps_logged_after
from ibot_fast.schedules import cosine_scheduler
from ibot_fast.step import build_step_path

# the per-step metrics an epoch averages (log.txt: train_<name>; koleo only with --koleo_weight)
EPOCH_METRICS = ("loss", "cls", "patch", "acc", "koleo")


def log(msg: str, info: DistInfo | None = None):
    if info is None or info.is_main:
        print(f"[ibot_fast] {msg}", flush=True)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Every (epoch, rank) draws from its own stream, so a resumed run replays exactly."""
    return (seed * 1_000_003 + epoch * 10_007 + rank) % 2**31


def resolve_data(args, info: DistInfo):
    """Returns (dataset, knn_train_dir, knn_val_dir)."""
    from ibot_fast.data import (ImageFolderMask, MultiCropAugmentation, SyntheticImageDataset,
                                default_demo_root, prepare_mnist_folder)

    transform = MultiCropAugmentation(
        global_crops_scale=tuple(args.global_crops_scale),
        local_crops_scale=tuple(args.local_crops_scale),
        global_crops_number=args.global_crops_number,
        local_crops_number=args.local_crops_number,
        global_crops_size=args.global_crops_size, local_crops_size=args.local_crops_size)
    mask_generator = MaskGenerator(
        args.pred_ratio, args.pred_ratio_var, pred_shape=args.pred_shape,
        pred_start_epoch=args.pred_start_epoch)
    # masks live on the patch grid (ViT) or on Swin's 32-px grid of final-stage tokens (the
    # reference hands its mask generator patch_size * 8 for Swin)
    mask_cell = SWIN_MASK_CELL if is_swin(args.arch) else args.patch_size
    common = dict(transform=transform, patch_size=mask_cell,
                  mask_generator=mask_generator, num_masked_crops=args.global_crops_number,
                  # crops and masks are a function of (seed, epoch, image index): the same
                  # whatever the number of workers or ranks, and replayed exactly on resume
                  seed=args.seed,
                  # python | cpp | cuda: the collate returns a MaskBatch (ibot_fast.masking)
                  mask_backend=args.mask_backend)
    path = args.data_path
    knn_train, knn_val = args.knn_train_path, args.knn_val_path
    if path == "mnist_5k":
        root = default_demo_root()
        if info.is_main:
            train_dir, val_dir = prepare_mnist_folder(root)
        if is_distributed():
            dist.barrier()  # other ranks wait until rank 0 has written the folder
        if not info.is_main:
            train_dir, val_dir = prepare_mnist_folder(root)  # already there: returns paths
        dataset = ImageFolderMask(train_dir, **common)
        knn_train, knn_val = knn_train or train_dir, knn_val or val_dir
    elif path.startswith("synthetic"):
        n = int(path.split(":", 1)[1]) if ":" in path else 256
        dataset = SyntheticImageDataset(n, **common)
    else:
        dataset = ImageFolderMask(path, **common)
        knn_train = knn_train or path
    return dataset, knn_train, knn_val


class Trainer:
    """Everything one training run holds; ``train_step`` is the unit the tests check."""

    def __init__(self, args, info: DistInfo | None = None, dataset=None):
        self.args = args
        self.info = info or DistInfo()
        self.device = self.info.device
        torch.set_num_threads(args.threads)  # --threads (config: cores shared between ranks)
        seed_everything(args.seed)  # same initial weights on every rank, as the reference
        if args.deterministic:
            torch.use_deterministic_algorithms(True)

        # ---- data ----
        if dataset is None:
            dataset, self.knn_train_dir, self.knn_val_dir = resolve_data(args, self.info)
        else:
            self.knn_train_dir, self.knn_val_dir = args.knn_train_path, args.knn_val_path
        from ibot_fast.data import build_pretrain_loader
        from ibot_fast.data.dali import build_dali_pretrain_loader, resolve_data_backend
        self.dataset = dataset
        # resolved by the flag validation (auto -> dali or torch); checked again for callers
        # that bring their own args
        self.data_backend = resolve_data_backend(args.data_backend, self.device.type)
        if self.data_backend == "dali":  # decode + augment in DALI (GPU, or CPU threads)
            gpu = self.device.type == "cuda"
            self.loader = build_dali_pretrain_loader(
                dataset, args.batch_size_per_gpu, rank=self.info.rank,
                world_size=self.info.world_size, seed=args.seed, device="gpu" if gpu else "cpu",
                device_id=self.device.index or 0 if gpu else None,
                num_threads=max(1, args.num_workers))
        else:
            self.loader = build_pretrain_loader(
                dataset, args.batch_size_per_gpu, args.num_workers, rank=self.info.rank,
                world_size=self.info.world_size, seed=args.seed, drop_last=True,
                pin_memory=self.device.type == "cuda")
        self.iters_per_epoch = len(self.loader)
        if args.max_steps_per_epoch:
            self.iters_per_epoch = min(self.iters_per_epoch, args.max_steps_per_epoch)

        # ---- models, loss ----
        student, self.teacher = build_ibot_models(
            args.arch, args.patch_size, img_size=args.global_crops_size, out_dim=args.out_dim,
            patch_out_dim=args.patch_out_dim, shared_head=args.shared_head,
            shared_head_teacher=args.shared_head_teacher, norm_last_layer=args.norm_last_layer,
            drop_path=args.drop_path, use_masked_im_modeling=args.use_masked_im_modeling,
            head_hidden_dim=args.head_hidden_dim, head_bottleneck_dim=args.head_bottleneck_dim,
            window_size=args.window_size)
        # fp64 is for verification (e.g. DDP vs one process): Adam turns last-bit gradient noise
        # into visible updates, so fp32 runs of different reduction orders drift apart slowly.
        self.param_dtype = torch.float64 if args.precision == "fp64" else torch.float32
        # the student network itself (never a DDP/FSDP wrapper: that is self.path.module);
        # student_without_ddp is the same object under the reference's name
        self.student = self.student_without_ddp = student.to(self.device, self.param_dtype)
        self.teacher.to(self.device, self.param_dtype)
        self.ibot_loss = IBOTLoss(
            args.out_dim, args.patch_out_dim, args.global_crops_number, args.local_crops_number,
            args.warmup_teacher_temp, args.teacher_temp, args.warmup_teacher_patch_temp,
            args.teacher_patch_temp, args.warmup_teacher_temp_epochs, args.epochs,
            lambda1=args.lambda1, lambda2=args.lambda2, mim_start_epoch=args.pred_start_epoch,
            backend=args.loss_backend).to(self.device, self.param_dtype)

        # ---- the step path (--step): student module (DDP / FSDP), optimiser, EMA, built once ----
        self.path = build_step_path(args, self.student, self.teacher, self.ibot_loss,
                                    self.device, self.info.world_size)
        self.optimizer, self.ema = self.path.optimizer, self.path.ema
        self.scaler = torch.amp.GradScaler(self.device.type) if args.precision == "fp16" else None

        # ---- schedules ----
        global_batch = args.batch_size_per_gpu * self.info.world_size
        n = self.iters_per_epoch
        self.lr_schedule = cosine_scheduler(args.lr * global_batch / 256.0, args.min_lr,
                                            args.epochs, n, warmup_epochs=args.warmup_epochs)
        self.wd_schedule = cosine_scheduler(args.weight_decay, args.weight_decay_end,
                                            args.epochs, n)
        self.momentum_schedule = cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, n)
        self.start_epoch = 0

        # ---- faults (reliability.py) ----
        self.on_nan = args.on_nan
        self.nonfinite = NonFiniteMonitor(self.device, self.info.rank, self.info.world_size)
        self.preemption = PreemptionHandler()
        self.skipped = 0  # steps skipped by --on_nan skip in the current epoch
        self._resume_pos: dict | None = None  # mid-epoch position of the loaded checkpoint
        log(self.describe(), self.info)

    def describe(self) -> str:
        """The start-up line: what runs where, every value as the flag validation resolved it."""
        a = self.args
        return (f"step {a.step} on {self.device.type} x {self.info.world_size} process(es): "
                f"precision {a.precision}, attention {a.attn_backend}, loss {a.loss_backend}, "
                f"data {self.data_backend} ({a.num_workers} workers), masks {a.mask_backend}, "
                f"{torch.get_num_threads()} thread(s)")

    @property
    def _fsdp(self) -> bool:
        """--fsdp true: parameters are shards; checkpoints are collectives (fsdp.py)."""
        return self.path.sharded

    # ------------------------------------------------------------------------------------------
    def autocast(self):
        if self.args.precision in ("fp32", "fp64"):
            return contextlib.nullcontext()
        dtype = torch.float16 if self.args.precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self, images, masks, epoch: int, it: int) -> dict:
        """One iteration of either step path; returns device tensors (no host sync here)."""
        args = self.args
        set_schedules(self.optimizer, self.lr_schedule[it], self.wd_schedule[it])
        images = [im.to(self.device, self.param_dtype, non_blocking=True) for im in images]
        # MaskBatch / MaskRequest (--mask_backend) move as one; MaskRequest is generated on the GPU
        masks = (masks.to(self.device, non_blocking=True) if hasattr(masks, "to")
                 else [m.to(self.device, non_blocking=True) for m in masks])
        skip_mode = self.on_nan == "skip"
        if skip_mode:  # the loss updates the centres in its forward: keep them to undo a skip
            centres = {k: v.clone() for k, v in self.ibot_loss.state_dict().items()}

        with self.autocast():
            terms, teacher_cls, student_cls = self.path.forward_loss(images, masks, epoch)
        loss = terms["loss"]

        self.optimizer.zero_grad(set_to_none=True)
        params = self.path.params
        if self.scaler is None:
            loss.backward()
            norms = self.path.clip_gradients(args.clip_grad) if args.clip_grad else None
            grads_ok = self.nonfinite.grads_finite(params, norms)
        else:
            self.scaler.scale(loss).backward()
            if args.clip_grad:
                self.scaler.unscale_(self.optimizer)
                self.path.clip_gradients(args.clip_grad)
            grads_ok = None  # GradScaler skips inf/nan-gradient steps itself (and backs off)
        # Non-finite check on the device, read at the next sync point (--on_nan stop) ...
        bad = self.nonfinite.record(it, terms, grads_ok)
        if skip_mode:  # ... or now: skipping must happen before the optimiser step
            where = self.nonfinite.global_bad_ranks(bad)
            if where:
                return self._skip_step(epoch, it, terms, where, centres)
        if epoch < args.freeze_last_layer:  # the reference's cancel_gradients_last_layer
            for p in self.path.last_layer_params:
                p.grad = None
        self.optimizer_step()

        self.ema(float(self.momentum_schedule[it]))
        # Logging statistic of the reference: teacher crop-0 vs student crop-1 [CLS] argmax.
        b = images[0].shape[0]
        acc = (teacher_cls[:b].argmax(-1) == student_cls[b:2 * b].argmax(-1))
        return {"loss": loss.detach(), "cls": terms["cls"].detach(),
                "patch": terms["patch"].detach(), "acc": acc.float().mean(),
                "koleo": self._koleo(terms), "skipped": False}

    @staticmethod
    def _koleo(terms: dict) -> torch.Tensor:
        """The KoLeo term of a step (``--koleo_weight``), 0 without one."""
        koleo = terms.get("koleo")
        return terms["loss"].new_zeros(()) if koleo is None else koleo.detach()

    def _koleo_record(self, value, prefix: str = "") -> dict:
        """The koleo entry of a log record: ``{prefix + 'koleo': value}`` with
        ``--koleo_weight``, nothing without (the logs keep the reference's fields)."""
        if not self.args.koleo_weight:
            return {}
        return {prefix + "koleo": float(value)}

    def optimizer_step(self) -> None:
        """The optimiser step (through the GradScaler with fp16)."""
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()

    def _skip_step(self, epoch, it, terms, where: str, centres) -> dict:
        """--on_nan skip: every rank leaves weights, optimiser, teacher and centres as they
        were (all ranks got the same all-reduced verdict, so DDP stays in step)."""
        self.ibot_loss.load_state_dict(centres)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:  # what GradScaler does on an inf gradient: back off
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        self.skipped += 1
        self.nonfinite.reset()
        log(f"skipped non-finite step: epoch {epoch}, iteration {it}: {where} (rank "
            f"{self.info.rank}: loss {terms['loss'].item():.6g}, cls {terms['cls'].item():.6g}, "
            f"patch {terms['patch'].item():.6g}); {self.skipped} skipped this epoch", self.info)
        nan = torch.full((), math.nan, dtype=torch.float64, device=self.device)
        return {"loss": terms["loss"].detach(), "cls": terms["cls"].detach(),
                "patch": terms["patch"].detach(), "acc": nan, "koleo": self._koleo(terms),
                "skipped": True}

    # ------------------------------------------------------------------------------------------
    def state_dict(self, epoch: int, position: dict | None = None) -> dict:
        """``position``: where a mid-epoch (preemption) checkpoint stopped; None at epoch end.
        Under ``--fsdp`` a collective (every rank calls it; full tensors on rank 0)."""
        nets = self.path.network_state()
        return {
            "position": position,
            **nets,
            "epoch": epoch,
            "args": ckpt.args_to_dict(self.args),
            "ibot_loss": self.ibot_loss.state_dict(),
            "fp16_scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def save(self, epoch: int, path: str | None = None, position: dict | None = None):
        """Rank 0 writes. A state with a non-finite tensor is never written, whatever
        ``--on_nan`` says: every rank checks its replica (the same verdict everywhere) and the
        run stops with exit code 3."""
        state = self.state_dict(epoch, position)  # --fsdp: every rank gathers the shards
        if self.info.is_main or not self._fsdp:  # FSDP: only rank 0 holds full tensors
            bad = ckpt.nonfinite_tensor(state)
            if bad:
                where = (f"after step {position['steps']} of epoch {epoch}" if position
                         else f"at the end of epoch {epoch - 1}")
                msg = (f"non-finite values in {bad} {where} (the steps' losses and gradients "
                       f"were finite: the optimiser state or the weights went bad). This state "
                       f"was not saved. {self._kept()}Look for a damaged checkpoint or lower "
                       f"--lr. Exit code {EXIT_NONFINITE}.")
                log(msg, self.info)
                raise TrainingStopped(EXIT_NONFINITE, msg)
        if not self.info.is_main:
            return
        out = self.args.output_dir
        if path is not None:
            ckpt.atomic_save(state, path)
            return
        ckpt.save_rotating(state, os.path.join(out, "checkpoint.pth"),
                           keep=self.args.keep_checkpoints,
                           log=lambda m: log(m, self.info))
        freq = self.args.saveckp_freq
        if position is None and freq and epoch % freq == 0:
            ckpt.atomic_save(state, os.path.join(out, f"checkpoint{epoch:04}.pth"))

    def load(self, path: str | list[str]):
        """Resume from ``path``, or from the newest usable of a list (newest first)."""
        paths = [path] if isinstance(path, str) else list(path)
        expected = {"student": self.student_without_ddp.state_dict(),
                    "teacher": self.teacher.state_dict(),
                    "ibot_loss": self.ibot_loss.state_dict()}
        from ibot_fast.convert import to_ibot_fast  # bytedance/ibot checkpoints (convert.py)
        self._rejected = []  # corrupt files newer than the one used: moved aside in train()
        path, state = ckpt.load_verified(paths, expected, map_location=self.device,
                                         log=lambda m: log(m, self.info),
                                         run_args=ckpt.args_to_dict(self.args),
                                         convert=to_ibot_fast,  # verified after conversion
                                         rejected=self._rejected)
        old_args = state.get("args")
        old_args = vars(old_args) if hasattr(old_args, "__dict__") else old_args
        try:  # model flags refused, schedule / data / batch changes named (ibot_fast/resume.py)
            changes = compare_flags(old_args, ckpt.args_to_dict(self.args), path=path,
                                    epoch=int(state["epoch"]), position=state.get("position"),
                                    dataset_size=len(self.dataset),
                                    world_size=self.info.world_size)
        except ResumeUsageError as err:
            log(f"error: {err}", self.info)
            raise TrainingStopped(EXIT_USAGE, str(err)) from err
        for line in changes:
            log(f"WARNING: resuming with a changed flag: {line}", self.info)
        self.path.load_network_state(state)  # --fsdp: split into this rank's shards
        self.ibot_loss.load_state_dict(state["ibot_loss"])
        if self.scaler is not None and state.get("fp16_scaler"):
            self.scaler.load_state_dict(state["fp16_scaler"])
        self.start_epoch = int(state["epoch"])
        self._resume_pos = state.get("position")
        where = ""
        if self._resume_pos:
            p = self._resume_pos
            where = f", step {p['steps']} (sample {p['samples']} of the epoch)"
            if p["world_size"] != self.info.world_size:
                log(f"world size changed from {p['world_size']} to {self.info.world_size}: the "
                    f"epoch goes on from its sample {p['samples']} with global batch "
                    f"{self.args.batch_size_per_gpu * self.info.world_size}; drop-path draws are "
                    f"re-seeded (see README, 'Faults')", self.info)
        first_it = self._old_numbering_it()  # steps.jsonl numbers as the interrupted run did
        n, last = steps_logged_after(self._log_files()[1], first_it)
        redone = (f"; the interrupted run had got to iteration {last}: {last - first_it + 1} "
                  f"step(s) after the checkpoint are redone and their {n} steps.jsonl "
                  f"record(s) replaced" if last is not None else "")
        log(f"resumed from {path} at epoch {self.start_epoch}{where}{redone}", self.info)

    # ------------------------------------------------------------------------------------------
    def _log_files(self):
        out = self.args.output_dir
        return os.path.join(out, "log.txt"), os.path.join(out, "steps.jsonl")

    def _truncate_logs(self):
        """Drop records of epochs that will be re-run (a crash after the last checkpoint)."""
        for path in self._log_files():
            if not os.path.isfile(path):
                continue
            # a mid-epoch resume keeps the step records of the steps already done
            resume_it = self._old_numbering_it() if self._resume_pos else -1
            with open(path) as f:
                recs = [json.loads(ln) for ln in f if ln.strip()]
            keep = [json.dumps(r) + "\n" for r in recs if r.get("epoch", 0) < self.start_epoch
                    or r.get("it", math.inf) < resume_it]
            with open(path, "w") as f:
                f.writelines(keep)

    def _old_numbering_it(self) -> int:
        """The first iteration after the checkpoint, numbered as the run that wrote it did
        (its steps per epoch: another --batch_size_per_gpu or world size changes them)."""
        pos = self._resume_pos
        if not pos:
            return self.start_epoch * self.iters_per_epoch
        ipe = int(pos.get("iters_per_epoch", self.iters_per_epoch))
        steps = int(pos["steps"]) if "iters_per_epoch" in pos else self._start_step(pos)
        return self.start_epoch * ipe + steps

    def _kept(self) -> str:
        newest = ckpt.resume_candidates(self.args.output_dir,
                                        self.args.keep_checkpoints)
        return (f"The newest checkpoint, {newest[0]}, is finite and untouched. " if newest
                else "No checkpoint was written yet. ")

    def _append(self, path: str, record: dict):
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def train(self) -> bool:
        """Train to ``--epochs``; False when the checkpoint had already got there."""
        args, info = self.args, self.info
        if info.is_main:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, "args.json"), "w") as f:
                json.dump(ckpt.args_to_dict(args), f, indent=1)
            stale = ckpt.remove_stale_tmp(args.output_dir)
            if stale:
                log(f"removed {len(stale)} temporary file(s) of an interrupted checkpoint write",
                    info)
        keep = args.keep_checkpoints
        self._rejected = []
        if args.load_from:
            self.load(ckpt.find_resume_path(args.output_dir, args.load_from, args.resume))
            self._rejected = []  # an explicit file: the directory's files are left as they are
        elif args.resume:
            candidates = ckpt.resume_candidates(args.output_dir, keep)
            if candidates:
                self.load(candidates)
        if self._rejected:  # after every rank has read its file: rotation never keeps these
            if is_distributed():
                dist.barrier()
            if info.is_main:
                ckpt.quarantine(self._rejected, log=lambda m: log(m, info))
                base = os.path.join(args.output_dir, "checkpoint.pth")
                for a, b in ckpt.compact(base, keep):
                    log(f"renamed {a} to {b}: the good checkpoints are numbered from the newest",
                        info)
        if self.start_epoch >= args.epochs:
            log(f"already trained to epoch {self.start_epoch} (--epochs {args.epochs}); nothing "
                f"to do", info)
            return False
        if info.is_main:
            self._truncate_logs()
            ckpt.ensure_space(os.path.join(args.output_dir, "checkpoint.pth"), keep,
                              log=lambda m: log(m, info))
        epoch_log, step_log = self._log_files()
        global_batch = args.batch_size_per_gpu * info.world_size
        log(f"{args.arch}/{args.patch_size} on {info.world_size} process(es) "
            f"({self.device.type}), {len(self.dataset)} images, global batch {global_batch}, "
            f"{self.iters_per_epoch} steps/epoch, epochs {self.start_epoch}..{args.epochs - 1}",
            info)
        from ibot_fast.eval.monitor import TrainingMonitor  # --knn_every, --tensorboard
        monitor = TrainingMonitor(self)
        monitor.start(self.start_epoch)
        with self.preemption:  # SIGTERM/SIGUSR1/SIGINT only set a flag while we train
            if any_rank(self.preemption.requested, self.device):  # during the set-up
                # nothing new to save
                self._exit_preempted(None, "before the first step")
            for epoch in range(self.start_epoch, args.epochs):
                stats = self.train_one_epoch(epoch, epoch_log, step_log)
                if self.skipped > MAX_SKIPPED_SHARE * self.iters_per_epoch:
                    self._stop_skipped(epoch)
                self.save(epoch + 1)
                # a signal during the epoch's last step or its save: the epoch checkpoint is
                # the resume point
                _, stop = self.nonfinite.sync(self.preemption.requested)
                if stop:
                    self._exit_preempted(os.path.join(args.output_dir, "checkpoint.pth"),
                                         f"after epoch {epoch}" if epoch + 1 < args.epochs
                                         else f"of the finished run (epoch {epoch + 1}); the "
                                              f"end-of-run work (k-NN, loss curve) was skipped")
                monitor.epoch_end(epoch, stats)
        monitor.close()
        if is_distributed():
            dist.barrier()
        return True

    # ------------------------------------------------------------------------------------------
    def _start_step(self, pos: dict) -> int:
        """Steps of the epoch already done at ``pos``, in this run's global batch."""
        if pos["world_size"] == self.info.world_size and \
                pos["batch_size_per_gpu"] == self.args.batch_size_per_gpu:
            return int(pos["steps"])
        return int(pos["samples"]) // (self.args.batch_size_per_gpu * self.info.world_size)

    def _exit_preempted(self, path: str | None, where: str, lost: str = ""):
        """Exit 75 (130 for SIGINT) naming what is on disk; ``path`` None: nothing was written
        by this run (``lost`` says why, e.g. a full disk)."""
        sig = self.preemption.signum
        by = signal.Signals(sig).name if sig else "a signal on another rank"
        code = self.preemption.exit_code
        if path is not None:
            kept = f"checkpoint {path} holds the state {where}. Run the same command again to " \
                   f"resume exactly there."
        else:
            kept = (f"stopped {where}{lost}. {self._kept()}Run the same command again to "
                    f"resume from it." if ckpt.resume_candidates(self.args.output_dir, 64)
                    else f"stopped {where}{lost}; no checkpoint exists yet. Run the same "
                         f"command again to start.")
        msg = f"{'interrupted' if code == EXIT_INTERRUPTED else 'preempted'} ({by}): {kept} " \
              f"Exit code {code}."
        log(msg, self.info)
        raise TrainingStopped(code, msg)

    def _preempt(self, epoch: int, steps_done: int, sums: torch.Tensor, steps: int):
        """Write a mid-epoch checkpoint (weights after ``steps_done`` steps of ``epoch``, the
        global sample position, every rank's RNG states, the epoch's running sums) and exit."""
        b, w = self.args.batch_size_per_gpu, self.info.world_size
        sums = sums.clone()
        if is_distributed():
            dist.all_reduce(sums)
            sums /= w
        position = {"epoch": epoch, "steps": steps_done, "samples": steps_done * b * w,
                    "world_size": w, "batch_size_per_gpu": b, "metric_sums": sums.tolist(),
                    "metric_steps": steps, "skipped": self.skipped,
                    "rng": gather_objects(rng_state(self.device), w),
                    # what a resume checks: the same data (ibot_fast/resume.py) and numbering
                    "dataset_size": len(self.dataset), "iters_per_epoch": self.iters_per_epoch}
        try:
            self.save(epoch, position=position)
        except OSError as err:  # a full disk: the previous checkpoint is intact, say so
            if ckpt.full_disk_cause(err) is None:
                raise
            self._exit_preempted(None, f"after step {steps_done} of epoch {epoch}",
                                 lost=f", but its mid-epoch checkpoint could not be written "
                                      f"({os.strerror(err.errno)}; free some space)")
        self._exit_preempted(os.path.join(self.args.output_dir, "checkpoint.pth"),
                             f"after step {steps_done} of epoch {epoch}")

    def _stop_skipped(self, epoch: int):
        msg = (f"--on_nan skip skipped {self.skipped} of the {self.iters_per_epoch} steps of "
               f"epoch {epoch} (more than {MAX_SKIPPED_SHARE:.0%}): this run is not learning. "
               f"Training stopped; this epoch was not saved. {self._kept()}Look for a damaged "
               f"checkpoint or data, try a lower --lr or --precision fp32. Exit code "
               f"{EXIT_NONFINITE}.")
        log(msg, self.info)
        raise TrainingStopped(EXIT_NONFINITE, msg)

    def _stop_nonfinite(self, bad: dict, epoch: int):
        msg = self.nonfinite.describe(bad, epoch, self.iters_per_epoch)
        msg = (f"{msg}. Training stopped (--on_nan stop); this state was not saved. {self._kept()}"
               f"Try a lower --lr, --precision bf16 or fp32 instead of fp16, a smaller "
               f"--clip_grad, or --on_nan skip. Exit code {EXIT_NONFINITE}.")
        log(msg, self.info)
        raise TrainingStopped(EXIT_NONFINITE, msg)

    def train_one_epoch(self, epoch: int, epoch_log: str, step_log: str):
        args, info = self.args, self.info
        seed_everything(epoch_seed(args.seed, epoch, info.rank))
        if self.data_backend == "dali":
            self.loader.set_epoch(epoch)  # shuffles like DistributedSampler, keyed draws
        else:
            self.loader.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        self.student.train()
        # loss, cls, patch, acc, koleo: summed on the device in fp64 (no sync per step)
        sums = torch.zeros(len(EPOCH_METRICS), device=self.device, dtype=torch.float64)
        steps, start, self.skipped = 0, 0, 0
        pos, self._resume_pos = self._resume_pos, None
        if pos is not None and pos["epoch"] == epoch:  # a mid-epoch checkpoint: go on from it
            start = self._start_step(pos)
            if self.data_backend == "dali":
                self.loader.load_state_dict({"epoch": epoch,
                                             "samples_consumed": int(pos["samples"])})
            else:
                self.loader.sampler.set_start(int(pos["samples"]))
            kept = pos["metric_sums"]  # a checkpoint from before the koleo metric has 4
            sums[:len(kept)] += torch.tensor(kept, dtype=torch.float64, device=self.device)
            steps, self.skipped = int(pos["metric_steps"]), int(pos["skipped"])
            rngs = pos["rng"]
            if len(rngs) == info.world_size:
                set_rng_state(rngs[info.rank], self.device)
            else:  # another world size: fresh drop-path streams, still reproducible
                seed_everything(epoch_seed(args.seed, epoch, info.rank) + 7919 * start)
        bar = None
        if info.is_main and args.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.iters_per_epoch, initial=start, desc=f"epoch {epoch}",
                       dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
        t_last, n_last = time.perf_counter(), steps
        t_epoch, postfix = t_last, {}
        n_images = args.batch_size_per_gpu * info.world_size
        steps_left = (args.epochs - epoch) * self.iters_per_epoch - start  # of the whole run
        single = not is_distributed()
        for i, (images, _labels, masks) in enumerate(self.loader, start=start):
            if i >= self.iters_per_epoch:
                break
            it = epoch * self.iters_per_epoch + i
            out = self.train_step(images, masks, epoch, it)
            if not out["skipped"]:  # a skipped step is logged, not averaged
                sums += torch.stack([out[k].double() for k in EPOCH_METRICS])
                steps += 1
            # img/s and ETA on the host clock from the first step (no device sync; on a GPU
            # the host runs a few steps ahead, so the first figures are rough)
            done = i + 1 - start
            per_step = (time.perf_counter() - t_epoch) / done
            eta_s = per_step * (steps_left - done)
            if bar is not None:
                bar.update(1)
                postfix.update(img_s=f"{n_images / per_step:.1f}", eta=_hms(eta_s))
                bar.set_postfix(postfix, refresh=False)
            at_log = (i + 1) % args.log_freq == 0 or i + 1 == self.iters_per_epoch
            stop = False
            # The sync point: all ranks agree on non-finite steps and on preemption. A single
            # process can also act on a signal at once (no other rank to agree with).
            if at_log or (single and self.preemption.requested):
                bad, stop = self.nonfinite.sync(self.preemption.requested)
                if bad:
                    self._stop_nonfinite(bad, epoch)
            if at_log:
                now = time.perf_counter()
                img_s = (steps - n_last) * n_images / max(now - t_last, 1e-9)
                t_last, n_last = now, steps
                rec = {"epoch": epoch, "it": it, "loss": out["loss"].item(),
                       "cls": out["cls"].item(), "patch": out["patch"].item(),
                       "acc": out["acc"].item(), **self._koleo_record(out["koleo"]),
                       "lr": float(self.lr_schedule[it]),
                       "wd": float(self.wd_schedule[it]), "img_s": img_s,
                       "eta_s": eta_s, "skipped": self.skipped}
                if info.is_main:
                    self._append(step_log, rec)
                    if bar is not None:
                        postfix.update(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}")
                        bar.set_postfix(postfix)
            # at the epoch's last step the epoch checkpoint comes next and serves as well
            if stop and i + 1 < self.iters_per_epoch:
                if bar is not None:
                    bar.close()
                self._preempt(epoch, i + 1, sums, steps)
        it = (epoch + 1) * self.iters_per_epoch - 1
        if bar is not None:
            bar.close()
        # undecodable images skipped this epoch (each file named once, now the bar is closed)
        bad_images = torch.tensor((self.loader if self.data_backend == "dali" else self.dataset)
                                  .bad_images_this_epoch(), device=self.device)
        if is_distributed():
            dist.all_reduce(sums)
            sums /= info.world_size
            dist.all_reduce(bad_images)
        avg = (sums / max(steps, 1)).tolist()
        stats = {"train_loss": avg[0], "train_cls": avg[1], "train_patch": avg[2],
                 "train_acc": avg[3], **self._koleo_record(avg[4], "train_"),
                 "train_lr": float(self.lr_schedule[it]),
                 "train_wd": float(self.wd_schedule[it]), "train_skipped": self.skipped,
                 "train_bad_images": int(bad_images), "epoch": epoch}
        if info.is_main:
            self._append(epoch_log, stats)
        koleo = f", koleo {avg[4]:.4f}" if args.koleo_weight else ""
        log(f"epoch {epoch}: loss {avg[0]:.4f} (cls {avg[1]:.4f}, patch {avg[2]:.4f}{koleo})",
            info)
        return stats


def _hms(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s // 60 % 60:02}:{s % 60:02}"


def plot_loss_curve(output_dir: str) -> str | None:
    """loss_curve.png: loss terms, teacher k-NN, lr / wd and teacher temperatures
    (ibot_fast/viz/curves.py)."""
    from ibot_fast.viz.curves import plot_training_curves
    return plot_training_curves(output_dir)


def main(argv=None):
    args = parse_args(argv)
    lock = None
    if int(os.environ.get("RANK", "0")) == 0:  # one trainer per --output_dir, before any work
        os.makedirs(args.output_dir, exist_ok=True)
        try:
            lock = OutputDirLock(args.output_dir).acquire(log=log)
        except TrainingStopped as err:
            print(f"[ibot_fast] error: {err}", file=sys.stderr, flush=True)
            raise
    # From here a signal is a clean stop (before the loop, in it and after it), not a kill.
    handler = PreemptionHandler()
    trainer = None
    try:
        with handler:
            info = init_distributed(args.device)
            trainer = Trainer(args, info)
            trainer.preemption = handler
            trained = trainer.train()
            if trained and info.is_main:
                handler.immediate = lambda: _stop_after_training(handler, args)
                if handler.requested:  # it came during the final barrier
                    _stop_after_training(handler, args)
                if args.knn_eval:  # first: the curves draw the random init's k-NN from knn.json
                    from ibot_fast.eval.knn import evaluate_run
                    evaluate_run(trainer)
                png = plot_loss_curve(args.output_dir)
                if png:
                    log(f"loss curve: {png}")
    except KeyboardInterrupt:  # Ctrl-C twice (or before the handler existed)
        newest = ckpt.resume_candidates(args.output_dir, 64)
        kept = (f"the newest checkpoint on disk is {newest[0]}; run the same command again to "
                f"resume from it" if newest else "no checkpoint was written")
        log(f"interrupted again: stopped at once, the current step and its checkpoint were "
            f"dropped; {kept}. Exit code {EXIT_INTERRUPTED}.")
        raise SystemExit(EXIT_INTERRUPTED) from None
    finally:
        # Free the models and their communication state (FSDP keeps gloo work objects holding
        # tensors) while the interpreter is fully alive, then the process group: freed during
        # interpreter finalisation they can abort the process ("terminate called without an
        # active exception", seen once in CI on a 2-process FSDP resume; pytorch#179291).
        del trainer
        gc.collect()
        cleanup()
        if lock is not None:
            lock.release()


def _stop_after_training(handler: PreemptionHandler, args):
    """A signal after the last epoch: the final checkpoint is on disk; skip the rest."""
    name = signal.Signals(handler.signum).name
    msg = (f"{name} after the last epoch: {os.path.join(args.output_dir, 'checkpoint.pth')} "
           f"holds the finished run (epoch {args.epochs}); the loss curve / k-NN evaluation "
           f"were skipped. Exit code {handler.exit_code}.")
    log(msg)
    raise TrainingStopped(handler.exit_code, msg)


if __name__ == "__main__":
    main()
