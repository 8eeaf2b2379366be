"""Pre-training datasets: ImageFolder + multi-crop + MIM masks (the reference's `ImageFolderMask`).

`__getitem__(idx)` returns `(crops, label, masks)`:
  crops  list of float32 [3, S, S] tensors (whatever the transform returns, globals first);
  label  int class index (unused by pre-training, used by k-NN monitoring);
  masks  one bool [H, W] numpy array per *masked* crop: the first `num_masked_crops` crops (the
         global crops), H = crop_h // patch_size, W = crop_w // patch_size.

Differences from the reference, all invisible to the loss:
* The reference also draws masks for the local crops, which are collated and never used; we
  skip them (less work, fewer tensors through the worker queue). Hence masks follow the crop
  order for the first `num_masked_crops` crops only.
* Unreadable images do not kill the run (see "Bad images" below).
* An optional `seed` makes every sample a pure function of (seed, epoch, index), independent of
  the number of workers or ranks; without it, randomness comes from the global torch / Python
  RNGs exactly as in the reference (see transforms.py).

Bad images: a file that PIL cannot decode is logged once (warning naming the file), recorded
in `bad_paths` / `num_bad`, and the next index (idx + 1 mod len) is returned instead, up to
`max_bad_retries` times. DataLoader workers hold their own copies of the dataset, so these
counters and the once-per-file warning are per worker process; the trainer reports the
warnings as the workers log them. `skip_bad=False` raises instead.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset, default_collate

from ibot_fast.data.transforms import global_python_rng
from ibot_fast.masking import MaskBatch, MaskBatcher

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

# What PIL raises for garbage, truncated or hostile files (UnidentifiedImageError is an OSError).
_BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def list_image_folder(root) -> tuple[list[tuple[str, int]], list[str]]:
    """Scan an ImageFolder tree `root/<class>/<image>`.

    Returns `(samples, classes)`: `classes` are the sorted sub-folder names, `samples` the sorted
    `(path, class_index)` pairs of files with an image extension (case-insensitive). Files
    directly in `root` and nested sub-folders are ignored, as in torchvision's ImageFolder only
    one level is a class (nested folders are walked inside a class).
    """
    root = os.fspath(root)
    if not os.path.exists(root):
        raise FileNotFoundError(
            f"dataset folder {root!r} does not exist. Pass --data_path pointing to an ImageFolder "
            f"tree (root/<class>/<image>), or run the MNIST demo which prepares one.")
    if not os.path.isdir(root):
        raise ValueError(
            f"dataset path {root!r} is a file, not a folder. Pass the folder that holds one "
            f"sub-folder per class (root/<class>/<image>).")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(
            f"dataset folder {root!r} has no class sub-folders. Expected root/<class>/<image>; "
            f"put the images in at least one sub-folder (a single dummy class is fine for "
            f"pre-training).")
    samples = []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls), followlinks=True):
            dirnames.sort()  # deterministic walk order
            for name in sorted(filenames):
                if name.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(dirpath, name), label))
    if not samples:
        raise ValueError(
            f"no images found under {root!r} (looked in {len(classes)} class folders for "
            f"{', '.join(IMG_EXTENSIONS)}). Check the path and the file extensions.")
    return samples, classes


class ImageFolderMask(Dataset):
    """ImageFolder images -> multi-crop transform -> block masks for the global crops.

    Args:
      root: ImageFolder tree.
      transform: `transform(img)` (or `transform(img, rng=...)` when `seed` is set, as
        `MultiCropAugmentation` accepts) returning a list of [3, h, w] tensors, globals first.
      patch_size: the backbone's patch size; the mask grid of a crop is (h // p, w // p).
      mask_generator: `mask_generator(H, W, rng) -> bool [H, W]` with an optional
        `set_epoch(epoch)` (ibot_fast.masking provides the reference's block/rand masking).
      num_masked_crops: masks are made for the first this-many crops (the global ones).
      max_bad_retries: how many following indices to try when an image cannot be read.
      skip_bad: False raises on the first unreadable image instead of skipping it.
      seed: None -> global RNGs (reference behaviour); an int -> each sample uses its own
        `random.Random` keyed on (seed, epoch, index), so data are reproducible whatever the
        number of workers.
      mask_backend: None -> masks as above, collated into a plain list (any mask_generator).
        'python' | 'cpp' | 'cuda' (needs a `MaskGenerator`) -> the collate returns a
        `MaskBatch` (masks + padded masked-token selection, ibot_fast.masking). 'python' draws
        the masks in `__getitem__` exactly as with None; 'cpp' draws the whole batch in the
        collate (C++ extension, keyed on (seed, epoch, index, crop)); 'cuda' makes the collate
        return a `MaskRequest` that `.to(cuda)` turns into a MaskBatch on the GPU.
    """

    def __init__(self, root, transform: Callable, patch_size: int, mask_generator: Callable,
                 num_masked_crops: int = 2, max_bad_retries: int = 100, skip_bad: bool = True,
                 seed: Optional[int] = None, mask_backend: Optional[str] = None):
        self.root = os.fspath(root)
        self.samples, self.classes = list_image_folder(self.root)
        self._setup(transform, patch_size, mask_generator, num_masked_crops, max_bad_retries,
                    skip_bad, seed, mask_backend)

    def _setup(self, transform, patch_size, mask_generator, num_masked_crops, max_bad_retries,
               skip_bad, seed, mask_backend=None):
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.transform = transform
        self.patch_size = patch_size
        self.mask_generator = mask_generator
        self.num_masked_crops = num_masked_crops
        self.max_bad_retries = max_bad_retries
        self.skip_bad = skip_bad
        self.seed = seed
        # The batch API (ibot_fast.masking.MaskBatcher) used by the collate; None: plain lists.
        self.mask_batcher = (None if mask_backend is None
                             else MaskBatcher(mask_generator, mask_backend, seed=seed))
        self.targets = [label for _, label in self.samples]
        self.bad_paths: list[str] = []
        self._bad_set: set[str] = set()
        # The epoch lives in shared memory so that persistent DataLoader workers (which keep the
        # copy of the dataset they were started with) still see `set_epoch` from the main process.
        self._epoch_shared = torch.zeros((), dtype=torch.int64).share_memory_()
        self._seen_epoch = 0

    # ---- epoch -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer every epoch (with `sampler.set_epoch`); forwards to the masks."""
        self._epoch_shared.fill_(int(epoch))
        self._seen_epoch = int(epoch)
        if hasattr(self.mask_generator, "set_epoch"):
            self.mask_generator.set_epoch(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch_shared)

    def _sync_epoch(self) -> int:
        # In a persistent worker the shared epoch may have moved on since this copy last looked.
        epoch = int(self._epoch_shared)
        if epoch != self._seen_epoch:
            self._seen_epoch = epoch
            if hasattr(self.mask_generator, "set_epoch"):
                self.mask_generator.set_epoch(epoch)
        return epoch

    # ---- loading (overridden by SyntheticImageDataset) ----------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def sample_name(self, idx: int) -> str:
        return self.samples[idx][0]

    def load_sample(self, idx: int) -> tuple[Image.Image, int]:
        path, label = self.samples[idx]
        with open(path, "rb") as f:
            img = Image.open(f)
            img = img.convert("RGB")  # decodes fully here, inside the try of the caller
        return img, label

    @property
    def num_bad(self) -> int:
        """Distinct unreadable files met by *this process* (each worker counts its own)."""
        return len(self.bad_paths)

    def _note_bad(self, name: str, err: Exception) -> None:
        if name in self._bad_set:
            return
        self._bad_set.add(name)
        self.bad_paths.append(name)
        logger.warning("skipping unreadable image %s (%s: %s); using the next image instead",
                       name, type(err).__name__, err)

    def _load_good(self, idx: int) -> tuple[Image.Image, int]:
        n = len(self)
        tried = []
        for k in range(min(self.max_bad_retries + 1, n)):
            j = (idx + k) % n
            try:
                return self.load_sample(j)
            except _BAD_IMAGE_ERRORS as err:
                name = self.sample_name(j)
                if not self.skip_bad:
                    raise RuntimeError(
                        f"cannot read image {name} ({type(err).__name__}: {err}). Remove or "
                        f"replace the file, or enable skip_bad to skip unreadable images."
                    ) from err
                self._note_bad(name, err)
                tried.append(name)
        shown = ", ".join(tried[:5]) + (f", ... ({len(tried)} in all)" if len(tried) > 5 else "")
        raise RuntimeError(
            f"{len(tried)} consecutive images starting at index {idx} could not be read: {shown}. "
            f"The dataset looks broken (wrong format, truncated copy?); check these files.")

    # ---- the sample --------------------------------------------------------------------------
    def _rng_for(self, idx: int, epoch: int) -> Optional[random.Random]:
        if self.seed is None:
            return None
        # A str seed is hashed with SHA-512 by `random`, so it is stable across processes.
        return random.Random(f"ibot_fast/{self.seed}/{epoch}/{idx}")

    def __getitem__(self, idx: int):
        epoch = self._sync_epoch()
        rng = self._rng_for(idx, epoch)
        img, label = self._load_good(idx)
        crops = self.transform(img) if rng is None else self.transform(img, rng=rng)

        if self.mask_batcher is not None and self.mask_batcher.backend != "python":
            # The collate draws the whole batch at once from (seed, epoch, index, crop).
            H, W = crops[0].shape[-2] // self.patch_size, crops[0].shape[-1] // self.patch_size
            return crops, label, DeferredMasks(idx, epoch, H, W, self.num_masked_crops)

        mask_rng = global_python_rng() if rng is None else rng
        masks = []
        for crop in crops[: self.num_masked_crops]:
            H, W = crop.shape[-2] // self.patch_size, crop.shape[-1] // self.patch_size
            mask = np.asarray(self.mask_generator(H, W, mask_rng), dtype=bool)
            if mask.shape != (H, W):
                raise ValueError(f"mask_generator returned shape {mask.shape} for a {H}x{W} "
                                 f"patch grid (crop {tuple(crop.shape)}, patch {self.patch_size})")
            masks.append(mask)
        return crops, label, masks


class SyntheticImageDataset(ImageFolderMask):
    """Deterministic generated RGB images with a learnable class signal, for tests and smoke runs.

    Image `i` has class `i % num_classes`: a filled shape whose kind (ellipse, rectangle,
    triangle) and colour (hue) depend on the class, at a random position and size, on a noisy
    background. The pixels depend only on (data_seed, i). Same transform/mask machinery and
    `__getitem__` contract as ImageFolderMask.
    """

    def __init__(self, num_samples: int, num_classes: int = 10, image_size: int = 64, *,
                 transform: Callable, patch_size: int, mask_generator: Callable,
                 num_masked_crops: int = 2, seed: Optional[int] = None, data_seed: int = 0,
                 mask_backend: Optional[str] = None):
        if num_samples < 1 or num_classes < 1 or image_size < 4:
            raise ValueError(f"need num_samples >= 1, num_classes >= 1, image_size >= 4; got "
                             f"{num_samples}, {num_classes}, {image_size}")
        self.root = f"synthetic({num_samples}x{image_size}px, {num_classes} classes)"
        self.num_samples, self.num_classes, self.image_size = num_samples, num_classes, image_size
        self.data_seed = data_seed
        self.classes = [str(c) for c in range(num_classes)]
        self.samples = [(f"synthetic:{i}", i % num_classes) for i in range(num_samples)]
        self._setup(transform, patch_size, mask_generator, num_masked_crops,
                    max_bad_retries=0, skip_bad=False, seed=seed, mask_backend=mask_backend)

    def load_sample(self, idx: int) -> tuple[Image.Image, int]:
        label = idx % self.num_classes
        g = np.random.default_rng([self.data_seed, idx])
        s = self.image_size
        background = g.integers(0, 256, size=3)
        noise = g.normal(0.0, 20.0, size=(s, s, 3))
        img = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8), "RGB")

        # Class signal: shape kind and a hue spread evenly over classes (fixed saturation/value).
        hue = int(255 * label / self.num_classes)
        color = Image.new("HSV", (1, 1), (hue, 220, 230)).convert("RGB").getpixel((0, 0))
        extent = int(s * g.uniform(0.4, 0.7))
        x0, y0 = (int(v) for v in g.integers(0, s - extent + 1, size=2))
        box = (x0, y0, x0 + extent - 1, y0 + extent - 1)
        draw = ImageDraw.Draw(img)
        kind = label % 3
        if kind == 0:
            draw.ellipse(box, fill=color)
        elif kind == 1:
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(x0 + extent // 2, y0), (box[2], box[3]), (x0, box[3])], fill=color)
        return img, label


class DeferredMasks(tuple):
    """A sample's masks left to the collate: (index, epoch, height, width, n_crops)."""

    def __new__(cls, index, epoch, height, width, n_crops):
        return super().__new__(cls, (index, epoch, height, width, n_crops))


def collate_multicrop(batch, mask_batcher: Optional[MaskBatcher] = None):
    """[(crops, label, masks)] * B -> (crops, labels, masks), crop-major.

    crops: one [B, 3, S, S] tensor per crop; labels: LongTensor [B]; masks: one bool [B, H, W]
    tensor per masked crop -- a plain list without `mask_batcher`, else a `MaskBatch` (a list
    of the same tensors plus the padded masked-token selection), or a `MaskRequest` for the
    cuda back end (see ImageFolderMask's `mask_backend`).

    Crop-major, like default_collate of the reference's tuples. `default_collate` is used per
    crop because inside a worker it stacks straight into shared memory (no extra copy on the way
    to the main process).
    """
    n_crops = len(batch[0][0])
    deferred = isinstance(batch[0][2], DeferredMasks)
    n_masks = batch[0][2][4] if deferred else len(batch[0][2])
    for crops, _, masks in batch:
        if (len(crops) != n_crops or isinstance(masks, DeferredMasks) != deferred
                or (not deferred and len(masks) != n_masks)):
            raise ValueError(f"samples in a batch disagree on crop/mask counts: "
                             f"{n_crops}/{n_masks} vs {len(crops)}/{len(masks)}")
    crops = [default_collate([sample[0][k] for sample in batch]) for k in range(n_crops)]
    labels = torch.tensor([sample[1] for sample in batch], dtype=torch.long)
    if deferred:
        if mask_batcher is None:
            raise ValueError("samples defer their masks to the collate, but no mask_batcher "
                             "was given (use the dataset's: dataset.mask_batcher)")
        _, epoch, H, W, _ = batch[0][2]
        ids = torch.tensor([sample[2][0] for sample in batch], dtype=torch.long)
        if mask_batcher.backend == "cuda":  # no CUDA in DataLoader workers: the trainer makes them
            return crops, labels, mask_batcher.request(ids, epoch, H, W, n_masks)
        return crops, labels, mask_batcher.generate(ids, epoch, H, W, n_masks)
    masks = [default_collate([torch.as_tensor(sample[2][k], dtype=torch.bool) for sample in batch])
             for k in range(n_masks)]
    if mask_batcher is not None and masks:
        masks_CBHW = torch.stack(masks)
        return crops, labels, MaskBatch.from_masks(
            masks_CBHW, mask_batcher.max_masked(*masks_CBHW.shape[-2:]))
    return crops, labels, masks
