"""iBOT pre-training: ``torchrun [--nproc_per_node G] -m ibot_fast.train [flags]``.

One file a newcomer can read top to bottom: build data, models, loss and optimiser from the
flags (``ibot_fast/config.py``), then for every step

1. set lr / weight decay from the schedules,
2. teacher (EMA, no grad) on the unmasked global crops; student on the masked global crops and,
   in a second pass, the local crops,
3. ``IBOTLoss`` ([CLS] across views + masked patch tokens within a view; updates the centres),
4. backward, per-tensor clipping, last layer frozen in the first epoch(s), optimiser step,
5. EMA of the teacher,

with logging every ``--log_freq`` steps (the only place a step waits for the device), an atomic
checkpoint every epoch, resume from the output directory, a loss curve and an optional k-NN
evaluation at the end. Faults (ibot_fast/reliability.py): SIGTERM/SIGUSR1 write a mid-epoch
checkpoint and exit 75; a non-finite step stops the run (exit 3) or is skipped (``--on_nan``);
a corrupt newest checkpoint falls back to the previous one.
This is the reference path (plain PyTorch, reference semantics,
reference-semantics.md §7); fast paths plug in behind flags.
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
from torch import nn

from ibot_fast import checkpoint as ckpt
from ibot_fast.config import parse_args
from ibot_fast.dist import DistInfo, cleanup, init_distributed, is_distributed
from ibot_fast.ema import EMATeacherUpdate
from ibot_fast.loss import IBOTLoss
from ibot_fast.masking import MaskGenerator
from ibot_fast.models import build_ibot_models
from ibot_fast.optim import (build_optimizer, cancel_gradients_last_layer,
                             clip_gradients_per_tensor, get_params_groups, set_schedules)
from ibot_fast.reliability import (EXIT_NONFINITE, EXIT_PREEMPTED, NonFiniteMonitor,
                                   PreemptionHandler, TrainingStopped, gather_objects,
                                   rng_state, set_rng_state)
from ibot_fast.schedules import cosine_scheduler


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
    common = dict(transform=transform, patch_size=args.patch_size,
                  mask_generator=mask_generator, num_masked_crops=args.global_crops_number,
                  # crops and masks are a function of (seed, epoch, image index): the same
                  # whatever the number of workers or ranks, and replayed exactly on resume
                  seed=args.seed,
                  # python | cpp | cuda: the collate returns a MaskBatch (ibot_fast.masking)
                  mask_backend=getattr(args, "mask_backend", None))
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
        backend = getattr(args, "data_backend", "torch")
        if backend == "auto" and str(getattr(dataset, "root", "")).startswith("synthetic"):
            backend = "torch"  # generated images: no files for DALI to decode
        self.data_backend = resolve_data_backend(backend, self.device.type)
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

        # ---- models ----
        self.student, self.teacher = build_ibot_models(
            args.arch, args.patch_size, img_size=args.global_crops_size, out_dim=args.out_dim,
            patch_out_dim=args.patch_out_dim, shared_head=args.shared_head,
            shared_head_teacher=args.shared_head_teacher, norm_last_layer=args.norm_last_layer,
            drop_path=args.drop_path, use_masked_im_modeling=args.use_masked_im_modeling,
            head_hidden_dim=args.head_hidden_dim, head_bottleneck_dim=args.head_bottleneck_dim)
        # fp64 is for verification (e.g. DDP vs one process): Adam turns last-bit gradient noise
        # into visible updates, so fp32 runs of different reduction orders drift apart slowly.
        self.param_dtype = torch.float64 if args.precision == "fp64" else torch.float32
        self.student.to(self.device, self.param_dtype)
        self.teacher.to(self.device, self.param_dtype)
        self.student_without_ddp = self.student
        # --fast_step wraps its own student module (DDP or FSDP2): building the reference's DDP
        # wrapper first would broadcast and allocate gradient buckets for nothing.
        if self.info.world_size > 1 and not getattr(args, "fast_step", False):
            self.student = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda"
                else None)
        self.ema = EMATeacherUpdate(self.student_without_ddp, self.teacher)

        # ---- loss, optimiser, schedules ----
        self.ibot_loss = IBOTLoss(
            args.out_dim, args.patch_out_dim, args.global_crops_number, args.local_crops_number,
            args.warmup_teacher_temp, args.teacher_temp, args.warmup_teacher_patch_temp,
            args.teacher_patch_temp, args.warmup_teacher_temp_epochs, args.epochs,
            lambda1=args.lambda1, lambda2=args.lambda2,
            mim_start_epoch=args.pred_start_epoch).to(self.device, self.param_dtype)
        self.optimizer = build_optimizer(args.optimizer,
                                         get_params_groups(self.student_without_ddp))
        self.scaler = torch.amp.GradScaler(self.device.type) if args.precision == "fp16" else None
        global_batch = args.batch_size_per_gpu * self.info.world_size
        n = self.iters_per_epoch
        self.lr_schedule = cosine_scheduler(args.lr * global_batch / 256.0, args.min_lr,
                                            args.epochs, n, warmup_epochs=args.warmup_epochs)
        self.wd_schedule = cosine_scheduler(args.weight_decay, args.weight_decay_end,
                                            args.epochs, n)
        self.momentum_schedule = cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, n)
        self.start_epoch = 0

        # ---- faults (reliability.py) ----
        self.on_nan = getattr(args, "on_nan", "stop")
        self.nonfinite = NonFiniteMonitor(self.device, self.info.rank, self.info.world_size)
        self.preemption = PreemptionHandler()
        self.skipped = 0  # steps skipped by --on_nan skip in the current epoch
        self._resume_pos: dict | None = None  # mid-epoch position of the loaded checkpoint

        # ---- --fast_step (ibot_fast/fast_step.py): None keeps this file's reference step ----
        from ibot_fast.fast_step import setup_fast_step
        self.fast_step = setup_fast_step(self)  # also applies --attn_backend to both paths

    @property
    def _fsdp(self) -> bool:
        """--fsdp true (fast step): parameters are shards; checkpoints go through fsdp.py."""
        return getattr(self.fast_step, "fsdp", False)

    # ------------------------------------------------------------------------------------------
    def autocast(self):
        if self.args.precision in ("fp32", "fp64"):
            return contextlib.nullcontext()
        dtype = torch.float16 if self.args.precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self, images, masks, epoch: int, it: int) -> dict:
        """One iteration; returns device tensors (no host sync here)."""
        if self.fast_step is not None:  # --fast_step true: same numbers, less work
            return self.fast_step(images, masks, epoch, it)
        args, ng = self.args, self.args.global_crops_number
        set_schedules(self.optimizer, self.lr_schedule[it], self.wd_schedule[it])
        images = [im.to(self.device, self.param_dtype, non_blocking=True) for im in images]
        # MaskBatch / MaskRequest (--mask_backend) move as one; MaskRequest is generated on the GPU
        masks = (masks.to(self.device, non_blocking=True) if hasattr(masks, "to")
                 else [m.to(self.device, non_blocking=True) for m in masks])
        skip_mode = self.on_nan == "skip"
        if skip_mode:  # the loss updates the centres in its forward: keep them to undo a skip
            centres = {k: v.clone() for k, v in self.ibot_loss.state_dict().items()}

        with self.autocast():
            with torch.no_grad():  # the reference builds no graph here either
                teacher_output = self.teacher(images[:ng])
            student_output = self.student(images[:ng], mask=masks[:ng])
            student_local_cls = self.student(images[ng:])[0] if len(images) > ng else None
            terms = self.ibot_loss(student_output, teacher_output, student_local_cls, masks,
                                   epoch)
        loss = terms["loss"]

        self.optimizer.zero_grad(set_to_none=True)
        params = self.student_without_ddp.parameters
        if self.scaler is None:
            loss.backward()
            norms = (clip_gradients_per_tensor(list(params()), args.clip_grad)
                     if args.clip_grad else None)
            grads_ok = self.nonfinite.grads_finite(params(), norms)
        else:
            self.scaler.scale(loss).backward()
            if args.clip_grad:
                self.scaler.unscale_(self.optimizer)
                clip_gradients_per_tensor(list(params()), args.clip_grad)
            grads_ok = None  # GradScaler skips inf/nan-gradient steps itself (and backs off)
        # Non-finite check on the device, read at the next sync point (--on_nan stop) ...
        bad = self.nonfinite.record(it, terms, grads_ok)
        if skip_mode:  # ... or now: skipping must happen before the optimiser step
            where = self.nonfinite.global_bad_ranks(bad)
            if where:
                return self._skip_step(epoch, it, terms, where, centres)
        cancel_gradients_last_layer(epoch, self.student_without_ddp, args.freeze_last_layer)
        self.optimizer_step()

        self.ema(float(self.momentum_schedule[it]))
        # Logging statistic of the reference: teacher crop-0 vs student crop-1 [CLS] argmax.
        b = images[0].shape[0]
        acc = (teacher_output[0][:b].argmax(-1) == student_output[0][b:2 * b].argmax(-1))
        return {"loss": loss.detach(), "cls": terms["cls"].detach(),
                "patch": terms["patch"].detach(), "acc": acc.float().mean(), "skipped": False}

    def optimizer_step(self) -> None:
        """The optimiser step of both step paths (through the GradScaler with fp16)."""
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
                "patch": terms["patch"].detach(), "acc": nan, "skipped": True}

    # ------------------------------------------------------------------------------------------
    def state_dict(self, epoch: int, position: dict | None = None) -> dict:
        """``position``: where a mid-epoch (preemption) checkpoint stopped; None at epoch end.
        Under ``--fsdp`` a collective (every rank calls it; full tensors on rank 0)."""
        nets = (self.fast_step.full_state() if self._fsdp else
                {"student": self.student_without_ddp.state_dict(),
                 "teacher": self.teacher.state_dict(),
                 "optimizer": self.optimizer.state_dict()})
        return {
            "position": position,
            **nets,
            "epoch": epoch,
            "args": ckpt.args_to_dict(self.args),
            "ibot_loss": self.ibot_loss.state_dict(),
            "fp16_scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def save(self, epoch: int, path: str | None = None, position: dict | None = None):
        """Rank 0 writes; callers make sure the state is finite (a sync point came first)."""
        if not self.info.is_main and not self._fsdp:
            return
        state = self.state_dict(epoch, position)  # --fsdp: every rank gathers the shards
        if not self.info.is_main:
            return
        out = self.args.output_dir
        if path is not None:
            ckpt.atomic_save(state, path)
            return
        ckpt.save_rotating(state, os.path.join(out, "checkpoint.pth"),
                           keep=getattr(self.args, "keep_checkpoints", 1))
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
        path, state = ckpt.load_verified(paths, expected, map_location=self.device,
                                         log=lambda m: log(m, self.info),
                                         run_args=ckpt.args_to_dict(self.args),
                                         convert=to_ibot_fast)  # verified after conversion
        if self._fsdp:  # full (DDP-format) state, split into this rank's shards
            self.fast_step.load_full_state(state)
        else:
            self.student_without_ddp.load_state_dict(ckpt.strip_prefix(state["student"]))
            self.teacher.load_state_dict(ckpt.strip_prefix(state["teacher"]))
            self.optimizer.load_state_dict(state["optimizer"])
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
        log(f"resumed from {path} at epoch {self.start_epoch}{where}", self.info)

    # ------------------------------------------------------------------------------------------
    def _log_files(self):
        out = self.args.output_dir
        return os.path.join(out, "log.txt"), os.path.join(out, "steps.jsonl")

    def _truncate_logs(self):
        """Drop records of epochs that will be re-run (a crash after the last checkpoint)."""
        for path in self._log_files():
            if not os.path.isfile(path):
                continue
            pos = self._resume_pos
            # a mid-epoch resume keeps the step records of the steps already done
            resume_it = (self.start_epoch * self.iters_per_epoch + self._start_step(pos)
                         if pos else -1)
            with open(path) as f:
                recs = [json.loads(ln) for ln in f if ln.strip()]
            keep = [json.dumps(r) + "\n" for r in recs if r.get("epoch", 0) < self.start_epoch
                    or r.get("it", math.inf) < resume_it]
            with open(path, "w") as f:
                f.writelines(keep)

    def _append(self, path: str, record: dict):
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def train(self):
        args, info = self.args, self.info
        if info.is_main:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, "args.json"), "w") as f:
                json.dump(ckpt.args_to_dict(args), f, indent=1)
            stale = ckpt.remove_stale_tmp(args.output_dir)
            if stale:
                log(f"removed {len(stale)} temporary file(s) of an interrupted checkpoint write",
                    info)
        if args.load_from:
            self.load(ckpt.find_resume_path(args.output_dir, args.load_from, args.resume))
        elif args.resume:
            candidates = ckpt.resume_candidates(args.output_dir,
                                                getattr(args, "keep_checkpoints", 1))
            if candidates:
                self.load(candidates)
        if info.is_main:
            self._truncate_logs()
        epoch_log, step_log = self._log_files()
        global_batch = args.batch_size_per_gpu * info.world_size
        log(f"{args.arch}/{args.patch_size} on {info.world_size} process(es) "
            f"({self.device.type}), {len(self.dataset)} images, global batch {global_batch}, "
            f"{self.iters_per_epoch} steps/epoch, epochs {self.start_epoch}..{args.epochs - 1}",
            info)
        from ibot_fast.eval.monitor import TrainingMonitor  # --knn_every, --tensorboard
        monitor = TrainingMonitor(self)
        monitor.start(self.start_epoch)
        with self.preemption:  # SIGTERM/SIGUSR1 only set a flag while we train
            for epoch in range(self.start_epoch, args.epochs):
                stats = self.train_one_epoch(epoch, epoch_log, step_log)
                self.save(epoch + 1)
                # a signal during the epoch's last step or its save: the epoch checkpoint is
                # the resume point
                _, stop = self.nonfinite.sync(self.preemption.requested)
                if stop and epoch + 1 < args.epochs:
                    self._exit_preempted(os.path.join(args.output_dir, "checkpoint.pth"),
                                         f"after epoch {epoch}")
                monitor.epoch_end(epoch, stats)
        monitor.close()
        if is_distributed():
            dist.barrier()

    # ------------------------------------------------------------------------------------------
    def _start_step(self, pos: dict) -> int:
        """Steps of the epoch already done at ``pos``, in this run's global batch."""
        if pos["world_size"] == self.info.world_size and \
                pos["batch_size_per_gpu"] == self.args.batch_size_per_gpu:
            return int(pos["steps"])
        return int(pos["samples"]) // (self.args.batch_size_per_gpu * self.info.world_size)

    def _exit_preempted(self, path: str, where: str):
        sig = self.preemption.signum
        by = signal.Signals(sig).name if sig else "a signal on another rank"
        msg = (f"preempted ({by}): checkpoint {path} holds the state {where}. Run the same "
               f"command again to resume exactly there. Exit code {EXIT_PREEMPTED}.")
        log(msg, self.info)
        raise TrainingStopped(EXIT_PREEMPTED, msg)

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
                    "rng": gather_objects(rng_state(self.device), w)}
        self.save(epoch, position=position)
        self._exit_preempted(os.path.join(self.args.output_dir, "checkpoint.pth"),
                             f"after step {steps_done} of epoch {epoch}")

    def _stop_nonfinite(self, bad: dict, epoch: int):
        msg = self.nonfinite.describe(bad, epoch, self.iters_per_epoch)
        newest = ckpt.resume_candidates(self.args.output_dir,
                                        getattr(self.args, "keep_checkpoints", 1))
        kept = (f"The newest checkpoint, {newest[0]}, is finite and untouched. " if newest
                else "No checkpoint was written yet. ")
        msg = (f"{msg}. Training stopped (--on_nan stop); this state was not saved. {kept}"
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
        # loss, cls, patch, acc: summed on the device in fp64 (no sync per step)
        sums = torch.zeros(4, device=self.device, dtype=torch.float64)
        steps, start, self.skipped = 0, 0, 0
        pos, self._resume_pos = self._resume_pos, None
        if pos is not None and pos["epoch"] == epoch:  # a mid-epoch checkpoint: go on from it
            start = self._start_step(pos)
            if self.data_backend == "dali":
                self.loader.load_state_dict({"epoch": epoch,
                                             "samples_consumed": int(pos["samples"])})
            else:
                self.loader.sampler.set_start(int(pos["samples"]))
            sums += torch.tensor(pos["metric_sums"], dtype=torch.float64, device=self.device)
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
        n_images = args.batch_size_per_gpu * info.world_size
        single = not is_distributed()
        for i, (images, _labels, masks) in enumerate(self.loader, start=start):
            if i >= self.iters_per_epoch:
                break
            it = epoch * self.iters_per_epoch + i
            out = self.train_step(images, masks, epoch, it)
            if not out["skipped"]:  # a skipped step is logged, not averaged
                sums += torch.stack([out[k].double() for k in ("loss", "cls", "patch", "acc")])
                steps += 1
            if bar is not None:
                bar.update(1)
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
                       "acc": out["acc"].item(), "lr": float(self.lr_schedule[it]),
                       "wd": float(self.wd_schedule[it]), "img_s": img_s,
                       "skipped": self.skipped}
                if info.is_main:
                    self._append(step_log, rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}",
                                        img_s=f"{img_s:.1f}")
            # at the epoch's last step the epoch checkpoint comes next and serves as well
            if stop and i + 1 < self.iters_per_epoch:
                if bar is not None:
                    bar.close()
                self._preempt(epoch, i + 1, sums, steps)
        it = (epoch + 1) * self.iters_per_epoch - 1
        if bar is not None:
            bar.close()
        if is_distributed():
            dist.all_reduce(sums)
            sums /= info.world_size
        avg = (sums / max(steps, 1)).tolist()
        stats = {"train_loss": avg[0], "train_cls": avg[1], "train_patch": avg[2],
                 "train_acc": avg[3], "train_lr": float(self.lr_schedule[it]),
                 "train_wd": float(self.wd_schedule[it]), "train_skipped": self.skipped,
                 "epoch": epoch}
        if info.is_main:
            self._append(epoch_log, stats)
        log(f"epoch {epoch}: loss {avg[0]:.4f} (cls {avg[1]:.4f}, patch {avg[2]:.4f})", info)
        return stats


def plot_loss_curve(output_dir: str) -> str | None:
    """loss_curve.png: loss terms, teacher k-NN, lr / wd and teacher temperatures
    (ibot_fast/viz/curves.py)."""
    from ibot_fast.viz.curves import plot_training_curves
    return plot_training_curves(output_dir)


def main(argv=None):
    args = parse_args(argv)
    info = init_distributed(args.device)
    trainer = None
    try:
        trainer = Trainer(args, info)
        trainer.train()
        if info.is_main:
            if args.knn_eval:  # first: the curves draw the random init's k-NN from knn.json
                from ibot_fast.eval.knn import evaluate_run
                evaluate_run(trainer)
            png = plot_loss_curve(args.output_dir)
            if png:
                log(f"loss curve: {png}")
    finally:
        # Free the models and their communication state (FSDP keeps gloo work objects holding
        # tensors) while the interpreter is fully alive, then the process group: freed during
        # interpreter finalisation they can abort the process ("terminate called without an
        # active exception", seen once in CI on a 2-process FSDP resume; pytorch#179291).
        del trainer
        gc.collect()
        cleanup()


if __name__ == "__main__":
    main()
