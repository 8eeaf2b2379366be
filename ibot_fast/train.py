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
evaluation at the end. This is the reference path (plain PyTorch, reference semantics,
reference-semantics.md §7); fast paths plug in behind flags.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
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
from ibot_fast.schedules import cosine_scheduler


class NonFiniteLossError(RuntimeError):
    pass


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
                  seed=args.seed)
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
        self.dataset = dataset
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
        if self.info.world_size > 1:
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

    # ------------------------------------------------------------------------------------------
    def autocast(self):
        if self.args.precision in ("fp32", "fp64"):
            return contextlib.nullcontext()
        dtype = torch.float16 if self.args.precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self, images, masks, epoch: int, it: int) -> dict:
        """One iteration; returns device tensors (no host sync here)."""
        args, ng = self.args, self.args.global_crops_number
        set_schedules(self.optimizer, self.lr_schedule[it], self.wd_schedule[it])
        images = [im.to(self.device, self.param_dtype, non_blocking=True) for im in images]
        masks = [m.to(self.device, non_blocking=True) for m in masks]

        with self.autocast():
            with torch.no_grad():  # the reference builds no graph here either
                teacher_output = self.teacher(images[:ng])
            student_output = self.student(images[:ng], mask=masks[:ng])
            student_local_cls = self.student(images[ng:])[0] if len(images) > ng else None
            terms = self.ibot_loss(student_output, teacher_output, student_local_cls, masks,
                                   epoch)
        loss = terms["loss"]
        if not torch.isfinite(loss):  # the reference's per-step check (one sync)
            raise NonFiniteLossError(
                f"loss is {loss.item()} at epoch {epoch}, iteration {it} (cls "
                f"{terms['cls'].item():.4g}, patch {terms['patch'].item():.4g}). Training "
                f"stopped before this step changed any weight. Try a lower --lr, "
                f"--precision bf16 or fp32 instead of fp16, or a smaller --clip_grad.")

        self.optimizer.zero_grad(set_to_none=True)
        params = self.student_without_ddp.parameters
        if self.scaler is None:
            loss.backward()
            if args.clip_grad:
                clip_gradients_per_tensor(list(params()), args.clip_grad)
            cancel_gradients_last_layer(epoch, self.student_without_ddp, args.freeze_last_layer)
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            if args.clip_grad:
                self.scaler.unscale_(self.optimizer)
                clip_gradients_per_tensor(list(params()), args.clip_grad)
            cancel_gradients_last_layer(epoch, self.student_without_ddp, args.freeze_last_layer)
            self.scaler.step(self.optimizer)
            self.scaler.update()

        self.ema(float(self.momentum_schedule[it]))
        # Logging statistic of the reference: teacher crop-0 vs student crop-1 [CLS] argmax.
        b = images[0].shape[0]
        acc = (teacher_output[0][:b].argmax(-1) == student_output[0][b:2 * b].argmax(-1))
        return {"loss": loss.detach(), "cls": terms["cls"].detach(),
                "patch": terms["patch"].detach(), "acc": acc.float().mean()}

    # ------------------------------------------------------------------------------------------
    def state_dict(self, epoch: int) -> dict:
        return {
            "student": self.student_without_ddp.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": epoch,
            "args": ckpt.args_to_dict(self.args),
            "ibot_loss": self.ibot_loss.state_dict(),
            "fp16_scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def save(self, epoch: int, path: str | None = None):
        if not self.info.is_main:
            return
        out = self.args.output_dir
        state = self.state_dict(epoch)
        ckpt.atomic_save(state, path or os.path.join(out, "checkpoint.pth"))
        freq = self.args.saveckp_freq
        if path is None and freq and epoch % freq == 0:
            ckpt.atomic_save(state, os.path.join(out, f"checkpoint{epoch:04}.pth"))

    def load(self, path: str):
        state = ckpt.load_checkpoint(path, map_location=self.device)
        self.student_without_ddp.load_state_dict(ckpt.strip_prefix(state["student"]))
        self.teacher.load_state_dict(ckpt.strip_prefix(state["teacher"]))
        self.optimizer.load_state_dict(state["optimizer"])
        self.ibot_loss.load_state_dict(state["ibot_loss"])
        if self.scaler is not None and state.get("fp16_scaler"):
            self.scaler.load_state_dict(state["fp16_scaler"])
        self.start_epoch = int(state["epoch"])
        log(f"resumed from {path} at epoch {self.start_epoch}", self.info)

    # ------------------------------------------------------------------------------------------
    def _log_files(self):
        out = self.args.output_dir
        return os.path.join(out, "log.txt"), os.path.join(out, "steps.jsonl")

    def _truncate_logs(self):
        """Drop records of epochs that will be re-run (a crash after the last checkpoint)."""
        for path in self._log_files():
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                keep = [ln for ln in f if ln.strip()
                        and json.loads(ln).get("epoch", 0) < self.start_epoch]
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
        resume_path = ckpt.find_resume_path(args.output_dir, args.load_from, args.resume)
        if resume_path:
            self.load(resume_path)
        if info.is_main:
            self._truncate_logs()
        epoch_log, step_log = self._log_files()
        global_batch = args.batch_size_per_gpu * info.world_size
        log(f"{args.arch}/{args.patch_size} on {info.world_size} process(es) "
            f"({self.device.type}), {len(self.dataset)} images, global batch {global_batch}, "
            f"{self.iters_per_epoch} steps/epoch, epochs {self.start_epoch}..{args.epochs - 1}",
            info)
        for epoch in range(self.start_epoch, args.epochs):
            self.train_one_epoch(epoch, epoch_log, step_log)
            self.save(epoch + 1)
        if is_distributed():
            dist.barrier()

    def train_one_epoch(self, epoch: int, epoch_log: str, step_log: str):
        args, info = self.args, self.info
        seed_everything(epoch_seed(args.seed, epoch, info.rank))
        self.loader.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        self.student.train()
        bar = None
        if info.is_main and args.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.iters_per_epoch, desc=f"epoch {epoch}", dynamic_ncols=True,
                       mininterval=1.0, file=sys.stderr)
        # loss, cls, patch, acc: summed on the device in fp64 (no sync per step)
        sums = torch.zeros(4, device=self.device, dtype=torch.float64)
        t_last, n_last = time.perf_counter(), 0
        n_images = args.batch_size_per_gpu * info.world_size
        steps = 0
        for i, (images, _labels, masks) in enumerate(self.loader):
            if i >= self.iters_per_epoch:
                break
            it = epoch * self.iters_per_epoch + i
            try:
                out = self.train_step(images, masks, epoch, it)
            except NonFiniteLossError as err:
                self.save(epoch, os.path.join(args.output_dir, "checkpoint_nonfinite.pth"))
                raise SystemExit(
                    f"[ibot_fast] {err}\nThe last good epoch checkpoint is "
                    f"{os.path.join(args.output_dir, 'checkpoint.pth')} (untouched); the state "
                    f"at the failure is in checkpoint_nonfinite.pth for inspection.") from err
            sums += torch.stack([out[k].double() for k in ("loss", "cls", "patch", "acc")])
            steps += 1
            if bar is not None:
                bar.update(1)
            if (i + 1) % args.log_freq == 0 or i + 1 == self.iters_per_epoch:
                now = time.perf_counter()
                img_s = (steps - n_last) * n_images / max(now - t_last, 1e-9)
                t_last, n_last = now, steps
                rec = {"epoch": epoch, "it": it, "loss": out["loss"].item(),
                       "cls": out["cls"].item(), "patch": out["patch"].item(),
                       "acc": out["acc"].item(), "lr": float(self.lr_schedule[it]),
                       "wd": float(self.wd_schedule[it]), "img_s": img_s}
                if info.is_main:
                    self._append(step_log, rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}",
                                        img_s=f"{img_s:.1f}")
        if bar is not None:
            bar.close()
        if is_distributed():
            dist.all_reduce(sums)
            sums /= info.world_size
        avg = (sums / max(steps, 1)).tolist()
        stats = {"train_loss": avg[0], "train_cls": avg[1], "train_patch": avg[2],
                 "train_acc": avg[3], "train_lr": float(self.lr_schedule[it]),
                 "train_wd": float(self.wd_schedule[it]), "epoch": epoch}
        if info.is_main:
            self._append(epoch_log, stats)
        log(f"epoch {epoch}: loss {avg[0]:.4f} (cls {avg[1]:.4f}, patch {avg[2]:.4f})", info)
        return stats


def plot_loss_curve(output_dir: str) -> str | None:
    path = os.path.join(output_dir, "steps.jsonl")
    if not os.path.isfile(path):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        recs = [json.loads(ln) for ln in f if ln.strip()]
    if not recs:
        return None
    it = [r["it"] for r in recs]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for key in ("loss", "cls", "patch"):
        ax.plot(it, [r[key] for r in recs], label=key)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title("iBOT training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = os.path.join(output_dir, "loss_curve.png")
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv=None):
    args = parse_args(argv)
    info = init_distributed(args.device)
    try:
        trainer = Trainer(args, info)
        trainer.train()
        if info.is_main:
            png = plot_loss_curve(args.output_dir)
            if png:
                log(f"loss curve: {png}")
            if args.knn_eval:
                from ibot_fast.eval.knn import evaluate_run
                evaluate_run(trainer)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
