"""DataLoaders: the distributed pre-training loader and the k-NN evaluation data.

Each epoch the trainer calls, before iterating:
    loader.sampler.set_epoch(epoch)   # a new shuffle, the same on every rank
    loader.dataset.set_epoch(epoch)   # mask schedule (pred_start_epoch) and per-sample seeds
Both work with persistent workers: the sampler runs in the main process and the dataset keeps
its epoch in shared memory.
"""

from __future__ import annotations

import functools
import os
import random
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ibot_fast.data.dataset import (_BAD_IMAGE_ERRORS, collate_multicrop, decode_image,
                                    list_image_folder)
from ibot_fast.data.transforms import to_tensor_normalize
from ibot_fast.reliability import (ResumableDistributedSampler, ignore_stop_signals,
                                   kill_loader_workers_at_exit)


def seed_worker(worker_id: int) -> None:
    """worker_init_fn: seed Python `random` and numpy from this worker's torch seed, and leave
    SIGTERM/SIGUSR1/SIGINT to the main process.

    The DataLoader has already set torch's seed (and Python's) to `base_seed + worker_id`, with a
    fresh `base_seed` for every epoch's iterator; we derive numpy's from it too so that no two
    workers (or epochs) share a numpy stream. A signal sent to the whole process group (Ctrl-C,
    `kill -TERM -<pgid>`, SLURM) would otherwise kill the workers (torch's worker handler dies on
    a SIGTERM from anyone but the parent) while the main process is still finishing its step and
    writing the preemption checkpoint; the main process shuts the workers down itself.
    """
    ignore_stop_signals()
    seed = torch.initial_seed()
    random.seed(seed)
    np.random.seed(seed % 2**32)


def build_pretrain_loader(dataset: Dataset, batch_size_per_gpu: int, num_workers: int,
                          rank: int = 0, world_size: int = 1, seed: int = 0,
                          drop_last: bool = True, pin_memory: bool = False,
                          persistent_workers: Optional[bool] = None,
                          prefetch_factor: Optional[int] = None) -> DataLoader:
    """DataLoader over this rank's shard: DistributedSampler(shuffle, seed) + multi-crop collate.

    `num_replicas`/`rank` are passed explicitly, so no process group is needed (tests, the
    single-process CPU demo). Every rank gets ceil(N / world_size) indices per epoch (the
    sampler pads by repeating indices), and `drop_last` drops the last incomplete batch.
    The loader's generator is seeded from (seed, rank): worker seeds are reproducible across
    runs and differ between ranks and epochs. `persistent_workers` defaults to on when there
    are workers (it saves re-forking every epoch; `set_epoch` still reaches them).
    """
    if batch_size_per_gpu < 1:
        raise ValueError(f"batch_size_per_gpu must be >= 1, got {batch_size_per_gpu}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    # DistributedSampler that can also start mid-epoch (resume from a preemption checkpoint)
    sampler = ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed)
    if drop_last and sampler.num_samples < batch_size_per_gpu:
        raise ValueError(
            f"the dataset has {len(dataset)} images, which gives {sampler.num_samples} per rank "
            f"over {world_size} rank(s): less than one batch of {batch_size_per_gpu} per GPU "
            f"(global batch {batch_size_per_gpu * world_size}), so an epoch would have no step. "
            f"Lower --batch_size_per_gpu or use more images.")
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    extra = {}
    if num_workers > 0:
        extra["persistent_workers"] = persistent_workers
        kill_loader_workers_at_exit()  # they ignore SIGTERM (seed_worker)
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    generator = torch.Generator()
    generator.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))
    return DataLoader(dataset, batch_size=batch_size_per_gpu, sampler=sampler,
                      num_workers=num_workers,
                      # masks -> MaskBatch (batch API) when the dataset has a mask_backend
                      collate_fn=functools.partial(
                          collate_multicrop, mask_batcher=getattr(dataset, "mask_batcher", None)),
                      pin_memory=pin_memory, drop_last=drop_last, worker_init_fn=seed_worker,
                      generator=generator, **extra)


# ---------------------------------------------------------------------------------------------
# k-NN evaluation data
# ---------------------------------------------------------------------------------------------

class EvalTransform:
    """Resize the shorter side (bicubic) -> center crop -> ToTensor + ImageNet normalisation.

    torchvision's `Resize(resize, bicubic)` + `CenterCrop(size)`: the longer side becomes
    int(resize * long / short), and the crop offset is round((side - size) / 2).
    """

    def __init__(self, size: int, resize: Optional[int] = None):
        self.size = size
        self.resize = resize if resize is not None else int(round(size * 256 / 224))
        if self.resize < size:
            raise ValueError(f"resize ({self.resize}) must be >= the crop size ({size})")

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.mode != "RGB":
            img = img.convert("RGB")
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        if short != self.resize:
            new_long = int(self.resize * long / short)
            new_w, new_h = (self.resize, new_long) if w <= h else (new_long, self.resize)
            img = img.resize((new_w, new_h), Image.BICUBIC)
        w, h = img.size
        top = int(round((h - self.size) / 2.0))
        left = int(round((w - self.size) / 2.0))
        img = img.crop((left, top, left + self.size, top + self.size))
        return to_tensor_normalize(img)

    def __repr__(self):
        return f"EvalTransform(resize={self.resize}, center_crop={self.size})"


def build_eval_transform(size: int, resize: Optional[int] = None) -> EvalTransform:
    """PIL -> float32 [3, size, size]; `resize` defaults to round(size * 256 / 224): 256 for 224."""
    return EvalTransform(size, resize)


class ImageFolderEval(Dataset):
    """(image tensor, label) over an ImageFolder tree, for k-NN evaluation.

    Unreadable files raise (naming the file) rather than being skipped: silently changing the
    evaluation set would change the accuracy being reported.
    """

    def __init__(self, root, transform):
        self.root = os.fspath(root)
        self.samples, self.classes = list_image_folder(self.root)
        self.targets = [label for _, label in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int):
        path, label = self.samples[idx]
        try:
            img = decode_image(path)  # 16-bit, alpha, EXIF: as the training loader decodes
        except _BAD_IMAGE_ERRORS as err:
            raise RuntimeError(f"cannot read evaluation image {path} ({type(err).__name__}: "
                               f"{err}). Remove or replace the file.") from err
        return self.transform(img), label
