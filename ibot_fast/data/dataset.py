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

Decoding (`decode_image`): every file becomes the 8-bit RGB image a viewer shows, whatever
its mode. The reference's `convert("RGB")` is kept where it is faithful (RGB, L, 1, P without
transparency, CMYK, YCbCr), so ordinary photos decode bit for bit as there; the rest differ:
* 16-bit grey (`I;16`, `I;16B`, ...; `I` holding 0..65535) is scaled, v -> round(v / 257),
  instead of clipped to 255 (which turns most 16-bit images pure white);
* alpha (`RGBA`, `LA`, `P` or `RGB`/`L` with a transparency key) is composited on white, the
  background a viewer or a web page puts behind a transparent image: the colour stored under
  a fully transparent pixel is arbitrary (often black) and is not what the image shows;
* an EXIF orientation tag is applied (the reference ignores it, so phone photos lie on their
  side);
* pixels without a defined 8-bit rendering (`F` float images, `I` outside 0..65535) raise
  `UnfaithfulImageError` and count as unreadable rather than being clipped silently.
ICC profiles are not applied (as in the reference): CMYK uses PIL's formula
R = (255 - C)(255 - K) / 255.

Bad images: a file that cannot be decoded (`decode_image` raises) is skipped and the next
index (idx + 1 mod len) is returned instead, up to `max_bad_retries` times; `skip_bad=False`
raises instead. The bookkeeping lives in shared memory created with the dataset, before any
DataLoader worker starts, so it crosses worker processes: one flag per sample (a file known to
be bad is not decoded again, in any worker) and one skip counter per worker slot.
`bad_images_this_epoch()` (main process) sums the counters since the last `set_epoch` and
names each newly found file once, in one warning per file, at the moment the caller chooses
(the trainer: after the epoch's progress bar is closed), not once per worker and not from inside
the workers. `bad_paths` / `num_bad` list every file found so far, by any process.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset, default_collate, get_worker_info

from ibot_fast.data.transforms import global_python_rng
from ibot_fast.masking import MaskBatch, MaskBatcher

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

# What PIL raises for garbage, truncated or hostile files (UnidentifiedImageError is an OSError;
# UnfaithfulImageError is a ValueError).
_BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# ---------------------------------------------------------------------------------------------
# Decoding: any image mode -> the RGB image it shows
# ---------------------------------------------------------------------------------------------

ALPHA_BACKGROUND = (255, 255, 255)  # what transparent pixels are composited on (see module doc)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the PIL operation that undoes it (as PIL.ImageOps.exif_transpose)
_ORIENTATION_FIX = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                    8: Image.Transpose.ROTATE_90}


class UnfaithfulImageError(ValueError):
    """The file decodes, but its pixels have no defined 8-bit RGB rendering (float images,
    32-bit integers outside the 16-bit range): training on a clipped version would be silent
    garbage, so such files count as unreadable."""


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1..8) of an opened image; 1 when absent or unreadable.

    Broken metadata must not make a good image unreadable, hence the broad except (PIL raises
    assorted errors for malformed EXIF blocks)."""
    try:
        value = int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - metadata only; the pixels are decoded separately
        return 1
    return value if value in _ORIENTATION_FIX else 1


def to_rgb(img: Image.Image, notes: Optional[list] = None) -> Image.Image:
    """Decode `img` fully and return the 8-bit RGB image it shows (rules in the module doc).

    Appends the conversions beyond the reference's `convert("RGB")` (and CMYK) to `notes` (e.g.
    "16-bit scaled to 8-bit"), for `python -m ibot_fast.data.check`. Raises `UnfaithfulImageError` for pixels without an 8-bit
    rendering.
    """
    note = notes.append if notes is not None else (lambda _: None)
    orientation = exif_orientation(img)
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES:
        a = np.asarray(img)  # decodes; uint16 (either byte order) or int32 for "I"
        if mode == "I" and a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise UnfaithfulImageError(
                f"32-bit integer pixels in [{int(a.min())}, {int(a.max())}], outside the 16-bit "
                f"range 0..65535: no defined 8-bit rendering. Convert the file to 8 or 16 bits")
        # round(v / 257) = round(v * 255 / 65535), no ties for integer v
        rgb = Image.fromarray(((a.astype(np.uint32) + 128) // 257).astype(np.uint8), "L")
        rgb = rgb.convert("RGB")
        note("16-bit scaled to 8-bit")
    elif mode == "F":
        raise UnfaithfulImageError(
            "32-bit float pixels: no defined 8-bit range. Convert the file to an 8- or 16-bit "
            "format")
    elif mode in ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        rgb = Image.alpha_composite(background, rgba).convert("RGB")
        note("alpha composited on white")
    else:
        rgb = img.convert("RGB")  # also decodes an RGB image fully (a copy)
        if mode == "CMYK":
            note("CMYK converted to RGB (no ICC profile applied)")
    if orientation != 1:
        rgb = rgb.transpose(_ORIENTATION_FIX[orientation])
        note(f"EXIF orientation {orientation} applied")
    return rgb


def decode_image(fp, notes: Optional[list] = None) -> Image.Image:
    """Open a path or file object and decode it to RGB with `to_rgb` (raises what PIL raises for
    unreadable files, or `UnfaithfulImageError`)."""
    with Image.open(fp) as img:
        return to_rgb(img, notes)


class BadImageLog:
    """Undecodable images, shared by the main process and every DataLoader worker.

    Created with the dataset (before workers are forked or spawned), in shared memory:
    ``flags`` uint8 [N] (0 good or unknown, 1 found bad, 2 found bad and named) and ``skips``
    int64 [SLOTS], one counter per worker slot (slot 0: the main process; worker k: slot
    1 + k mod (SLOTS - 1)), so no two processes add to the same number. Only the main process
    zeroes the counters and names files (`take_epoch_count`).
    """

    SLOTS = 256

    def __init__(self, num_samples: int):
        self.flags = torch.zeros(num_samples, dtype=torch.uint8).share_memory_()
        self.skips = torch.zeros(self.SLOTS, dtype=torch.int64).share_memory_()

    def is_bad(self, idx: int) -> bool:
        return bool(self.flags[idx])

    def mark_bad(self, idx: int) -> None:
        if not self.flags[idx]:
            self.flags[idx] = 1

    def add_skips(self, n: int) -> None:
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % (self.SLOTS - 1)
        self.skips[slot] += n

    def reset_epoch(self) -> None:
        self.skips.zero_()

    def epoch_count(self) -> int:
        return int(self.skips.sum())

    def bad_indices(self) -> list[int]:
        return self.flags.nonzero().flatten().tolist()

    def unnamed_indices(self) -> list[int]:
        """Bad files not named yet; marks them named."""
        new = (self.flags == 1).nonzero().flatten()
        self.flags[new] = 2
        return new.tolist()


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
        self.bad_images = BadImageLog(len(self.samples))
        # The epoch lives in shared memory so that persistent DataLoader workers (which keep the
        # copy of the dataset they were started with) still see `set_epoch` from the main process.
        self._epoch_shared = torch.zeros((), dtype=torch.int64).share_memory_()
        self._seen_epoch = 0

    # ---- epoch -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer every epoch (with `sampler.set_epoch`); forwards to the masks
        and restarts the count of `bad_images_this_epoch`."""
        self._epoch_shared.fill_(int(epoch))
        self.bad_images.reset_epoch()
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
        return decode_image(path), label  # decodes fully here, inside the try of the caller

    @property
    def bad_paths(self) -> list[str]:
        """Every undecodable file found so far, by this process or any DataLoader worker."""
        return [self.sample_name(j) for j in self.bad_images.bad_indices()]

    @property
    def num_bad(self) -> int:
        """Distinct undecodable files found so far (all processes)."""
        return len(self.bad_images.bad_indices())

    def bad_images_this_epoch(self) -> int:
        """Images skipped as undecodable since the last `set_epoch`, summed over all DataLoader
        workers (in a distributed run: this rank's). Also names, in one warning per file, the
        files found since the last call; call it from the main process, outside progress
        bars."""
        for j in self.bad_images.unnamed_indices():
            logger.warning("skipping unreadable image %s (%s); the next image was used instead. "
                           "python -m ibot_fast.data.check DIR lists every such file",
                           self.sample_name(j), self._why_bad(j))
        return self.bad_images.epoch_count()

    def _why_bad(self, idx: int) -> str:
        """The decoding error of a file found bad (decoded again: only bad files, once each)."""
        try:
            self.load_sample(idx)
        except _BAD_IMAGE_ERRORS as err:
            return f"{type(err).__name__}: {err}"
        return "it could not be read earlier"

    def _load_good(self, idx: int) -> tuple[Image.Image, int]:
        n = len(self)
        tried = []
        for k in range(min(self.max_bad_retries + 1, n)):
            j = (idx + k) % n
            if self.bad_images.is_bad(j):  # found before (maybe by another worker): skip it
                tried.append(self.sample_name(j))
                continue
            try:
                sample = self.load_sample(j)
            except _BAD_IMAGE_ERRORS as err:
                name = self.sample_name(j)
                if not self.skip_bad:
                    raise RuntimeError(
                        f"cannot read image {name} ({type(err).__name__}: {err}). Remove or "
                        f"replace the file, or enable skip_bad to skip unreadable images."
                    ) from err
                self.bad_images.mark_bad(j)
                tried.append(name)
                continue
            if k:
                self.bad_images.add_skips(k)
            return sample
        self.bad_images.add_skips(len(tried))
        shown = ", ".join(tried[:5]) + (f", ... ({len(tried)} in all)" if len(tried) > 5 else "")
        raise RuntimeError(
            f"{len(tried)} consecutive images starting at index {idx} could not be read: {shown}. "
            f"The dataset looks broken (wrong format, truncated copy?); check these files "
            f"(python -m ibot_fast.data.check DIR lists all of them).")

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
