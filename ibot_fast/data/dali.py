"""iBOT multi-crop views with NVIDIA DALI: decode once, crop and augment every view in DALI.

The same pipeline runs on the GPU (``device="gpu"``: "mixed" nvJPEG decoding, every op on the
GPU) and CPU-only (``device="cpu"``, ``device_id=None``: how CI tests it). It produces the views
of docs/reference-semantics.md#crops, in the torch loader's batch structure
(``collate_multicrop``)::

    crops   list of [B, 3, S, S] tensors, crop-major: global 1, global 2..ng, locals
    labels  int64 [B]
    masks   list of bool [B, H, W], one per global crop (H = W = global_crops_size // patch)

Where the randomness lives
--------------------------
Every random decision is drawn in Python, vectorised over the batch, as a pure function of
(seed, epoch, image index) (`draw_view_params`), and enters the pipeline as a per-sample float
table [V, K] (one row per view, columns named by the ``P_*`` constants). DALI's own RNG is not
used, so a batch does not depend on the number of ranks, on prefetching, or on where a resumed
run restarts, and the decisions of any sample can be recomputed (the tests measure the
probabilities this way and check the pixels follow them). The shuffle and sharding are
DistributedSampler's (same seed -> the same images per rank and step as the torch loader).

The views, op by op (reference -> here)
---------------------------------------
* RandomResizedCrop(bicubic): torchvision's box algorithm (10 attempts, area ~ U(scale),
  log-uniform aspect ratio in (3/4, 4/3), central fallback) on the header size of the image,
  then ``fn.resize`` of that box with cubic interpolation and antialiasing (as PIL's bicubic
  resize), kept in float (PIL rounds to uint8 after every op; we round nowhere).
* Flip: ``crop_mirror_normalize(mirror=...)`` at the end. Every op between the crop and the
  normalisation is per-pixel or mirror-symmetric (a symmetric Gaussian with a symmetric border),
  so flipping last gives the same image as flipping first.
* ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8, its four ops in a random order: each of the four
  positions applies ``clip(a x + b gray(x) + c mean(gray(x)))`` with the coefficients of the op
  drawn for that position (identity elsewhere): brightness f is (f, 0, 0), contrast f is
  (f, 0, 1 - f) (PIL blends with the mean grey level), saturation f is (f, 1 - f, 0) (PIL blends
  with the luma image L); where the position holds the hue op, a DALI conditional rotates the
  HSV hue exactly as PIL does (`_hsv_hue_shift`, shift int(255 h) / 255 of the circle).
  DALI's own ``fn.hue`` (a rotation about the grey axis in YIQ, in degrees: 360 h) is not used:
  on real photos it lands further from PIL's result than no hue change at all.
* RandomGrayscale(0.2): replaced by the luma (0.299, 0.587, 0.114) on all three channels.
* GaussianBlur(radius ~ U(0.1, 2)): ``fn.gaussian_blur(sigma=radius)`` (PIL's radius is the
  standard deviation), run inside a DALI conditional so only the blurred samples pay for it;
  ``window_size`` is left to DALI (it follows sigma). Global 1 always, global 2.. p=0.1,
  locals p=0.5.
* Solarization(p=0.2, threshold 128) on global 2..ng: x -> 255 - x where round(x) >= 128.
* ToTensor + Normalize: ``crop_mirror_normalize`` to CHW in the output dtype (float32 or
  float16 in DALI; other training dtypes are cast by torch afterwards).

Masks: with ``mask_batcher`` of the ``cpp`` back end (the default when the extension is built)
the external source hands each batch's image indices to a background thread as soon as it has
them, ``prefetch`` batches ahead, and the C++ generator (which releases the GIL) draws the
batch's ``MaskBatch`` there; the training thread only collects it (``masks_ahead=False`` draws
it on the training thread instead). ``cuda`` defers them to the GPU in the trainer; ``python``
or no batcher draws them per sample with `MaskGenerator` inside the source (`make_masks`).

Decoding: DALI decodes the files it renders as the torch loader's `decode_image` does: 8-bit
RGB and grey without transparency, with the EXIF orientation applied (``adjust_orientation``,
for JPEG, where DALI and PIL were checked to agree on all eight orientations). Every other file
(16-bit samples, alpha or a transparency key, palette, CMYK, 1-bit, a PNG with an eXIf chunk,
another format with an orientation tag) is decoded by the source with `decode_image` and handed
to DALI as an uncompressed PPM of the RGB result (`decoder_input`), so both loaders see the
same pixels: DALI drops alpha instead of compositing it, and what nvJPEG makes of CMYK was not
verified. Those files cost a PIL decode on the source's thread; ordinary photos do not.

Bad files: the external source reads every file and parses its header (cached after the first
time); a file that cannot be identified is replaced by the next readable index and counted, as
the torch loader does, or raises naming it when ``skip_bad=False``. A file whose header parses
but whose data DALI cannot decode (truncated JPEG) stops the pipeline: the loader then decodes
that batch's files with PIL to find the culprit, records it as bad, rebuilds the pipeline at the
same batch and carries on (or raises naming it). `bad_images_this_epoch()` counts the images
skipped in the batches yielded this epoch and names each bad file once (one warning, from the
caller, e.g. after the trainer's progress bar is closed); `bad_paths` / `num_bad` list them all.
``python -m ibot_fast.data.check DIR`` lists such files before a run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ibot_fast.data.dataset import _BAD_IMAGE_ERRORS, decode_image, exif_orientation
from ibot_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

__all__ = [
    "MultiCropSpec", "DALIMultiCropLoader", "build_dali_pretrain_loader", "dali_available",
    "resolve_data_backend", "draw_view_params", "rrc_boxes", "epoch_indices", "make_masks",
    "uniforms",
]

# --------------------------------------------------------------------------------------------
# Columns of the per-view parameter table [V, K] (one row per view, globals first)
# --------------------------------------------------------------------------------------------
P_TOP, P_LEFT, P_HEIGHT, P_WIDTH = 0, 1, 2, 3  # crop box in source pixels
P_FLIP = 4                                     # 1: mirrored
P_JITTER = 5                                   # 1: colour jitter applied
P_BRIGHTNESS, P_CONTRAST, P_SATURATION, P_HUE = 6, 7, 8, 9  # drawn factors (hue: circle fraction)
P_ORDER = 10                                   # 10..13: jitter op ids (0 b, 1 c, 2 s, 3 h) in order
P_GRAY = 14                                    # 1: grayscale
P_BLUR = 15                                    # 1: blurred
P_SIGMA = 16                                   # blur standard deviation (pixels)
P_SOLARIZE = 17                                # 1: solarized
P_SLOT_C = 18                                  # 18..23: mean coefficient c of jitter slot j
P_HUE_SHIFT = 24                               # hue rotation between slots 2 and 3, in sixths
NUM_PARAMS = 25
NUM_SLOTS = 6   # jitter slots: 3 before the hue rotation, 3 after (see `_jitter_slots`)
M_GRAY = NUM_SLOTS  # index of the grayscale matrix in the per-view matrices [V, 7, 3, 3]

# Uniform draws per view; every decision has its own column, so changing one probability never
# shifts another decision's draw (the tests rely on this to switch single ops off).
_ATTEMPTS = 10  # torchvision's RandomResizedCrop attempts
_U_AREA, _U_RATIO = 0, _ATTEMPTS
_U_TOP, _U_LEFT = 2 * _ATTEMPTS, 2 * _ATTEMPTS + 1
_U_FLIP, _U_JITTER, _U_ORDER, _U_FACTORS = 22, 23, 24, 28  # order: 4 keys, factors: 4
_U_GRAY, _U_BLUR, _U_SIGMA, _U_SOLARIZE = 32, 33, 34, 35
NUM_DRAWS = 36

_LUMA = (0.299, 0.587, 0.114)  # PIL's convert("L") (ITU-R 601-2), also DALI's YIQ Y row

# fn.decoders.image arguments of the pipeline (and of `python -m ibot_fast.data.check --dali`)
DECODER_ARGS = dict(adjust_orientation=True)
_DALI_NATIVE_MODES = ("RGB", "L")  # 8-bit, decoded by DALI as decode_image does


def _rawmode(img: Image.Image) -> str:
    """The raw sample layout PIL will unpack (e.g. "RGB;16B" for a 48-bit PNG), or ""."""
    if not img.tile:
        return ""
    args = img.tile[0].args
    raw = args[0] if isinstance(args, tuple) and args else args
    return raw if isinstance(raw, str) else ""


def needs_pil_decode(img: Image.Image, data: bytes) -> bool:
    """Whether DALI's decoder would render this opened (not decoded) file differently from
    `decode_image` (see the module doc), so the source must decode it with PIL."""
    if img.mode not in _DALI_NATIVE_MODES or "transparency" in img.info:
        return True
    if ";16" in _rawmode(img):  # 16-bit samples PIL reads as 8-bit RGB/L
        return True
    if img.format == "PNG" and b"eXIf" in data:  # PIL finds a late eXIf chunk only on load
        return True
    return img.format != "JPEG" and exif_orientation(img) != 1


def decoder_input(data: bytes) -> tuple[np.ndarray, tuple[int, int], bool]:
    """What the pipeline's decoder gets for a file's bytes: (bytes, (width, height) of the image
    DALI will produce, decoded by PIL?). Raises what PIL raises for an unreadable header."""
    with Image.open(io.BytesIO(data)) as img:
        if not needs_pil_decode(img, data):
            w, h = img.size
            if exif_orientation(img) in (5, 6, 7, 8):  # DALI turns these by 90 degrees
                w, h = h, w
            return np.frombuffer(data, dtype=np.uint8), (w, h), False
        rgb = decode_image(io.BytesIO(data))
    buf = io.BytesIO()
    rgb.save(buf, "PPM")  # uncompressed and lossless: DALI returns exactly these pixels
    return np.frombuffer(buf.getvalue(), dtype=np.uint8), rgb.size, True


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia") is not None and \
        importlib.util.find_spec("nvidia.dali") is not None


def resolve_data_backend(requested: str, device_type: str) -> str:
    """`auto` -> "dali" on a CUDA device when DALI is installed, "torch" otherwise."""
    if requested not in ("auto", "dali", "torch"):
        raise ValueError(f"data_backend must be auto, dali or torch, got {requested!r}")
    if requested == "auto":
        return "dali" if device_type == "cuda" and dali_available() else "torch"
    if requested == "dali" and not dali_available():
        raise ValueError("--data_backend dali needs NVIDIA DALI: pip install ibot_fast[dali] "
                         "(nvidia-dali-cuda130), or use --data_backend torch")
    return requested


# --------------------------------------------------------------------------------------------
# Randomness: a pure function of (seed, epoch, index, view, draw)
# --------------------------------------------------------------------------------------------
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function: a bijective 64-bit mixer (uint64 arithmetic wraps)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epoch: int, indices, shape: Sequence[int]) -> np.ndarray:
    """float64 [B, *shape] in [0, 1): draw k of sample `indices[b]` hashes (seed, epoch, index, k).

    Counter-based (SplitMix64 of a keyed counter), so any sample's draws can be recomputed
    without replaying a stream, vectorised over the batch.
    """
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + _GOLDEN)
        key = _splitmix64(key ^ np.uint64(epoch & 0xFFFFFFFFFFFFFFFF))
        key = _splitmix64(key[0] ^ (idx * _GOLDEN))  # [B]
        n = int(np.prod(shape))
        ctr = (np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN)[None, :]
        bits = _splitmix64(key[:, None] + ctr)
    return ((bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53).reshape(len(idx), *shape)


def rrc_boxes(width, height, u_area, u_ratio, u_top, u_left, scale,
              ratio=(3.0 / 4.0, 4.0 / 3.0)) -> np.ndarray:
    """torchvision's RandomResizedCrop.get_params, vectorised: int64 [..., 4] = top, left, h, w.

    `width`/`height` broadcast against the leading dims of the draws; `u_area`/`u_ratio` have a
    trailing axis of attempts (the first box that fits wins), `u_top`/`u_left` place it. When no
    attempt fits: the largest central box with the aspect ratio clamped into `ratio`.
    """
    W = np.asarray(width, dtype=np.float64)[..., None]
    H = np.asarray(height, dtype=np.float64)[..., None]
    area = W * H
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    aspect = np.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w = np.round(np.sqrt(target * aspect))  # round half to even, as Python's round()
    h = np.round(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = np.argmax(fits, axis=-1)[..., None]
    any_fit = fits.any(axis=-1)
    w_ok = np.take_along_axis(w, first, -1)[..., 0]
    h_ok = np.take_along_axis(h, first, -1)[..., 0]
    W, H = W[..., 0], H[..., 0]
    top_ok = np.floor(u_top * (H - h_ok + 1))
    left_ok = np.floor(u_left * (W - w_ok + 1))
    # central fallback
    in_ratio = W / H
    w_fb = np.where(in_ratio < ratio[0], W, np.where(in_ratio > ratio[1],
                                                     np.round(H * ratio[1]), W))
    h_fb = np.where(in_ratio < ratio[0], np.round(W / ratio[0]), H)
    top_fb, left_fb = np.floor((H - h_fb) / 2), np.floor((W - w_fb) / 2)
    out = np.stack([np.where(any_fit, top_ok, top_fb), np.where(any_fit, left_ok, left_fb),
                    np.where(any_fit, h_ok, h_fb), np.where(any_fit, w_ok, w_fb)], axis=-1)
    return out.astype(np.int64)


@dataclass(frozen=True)
class MultiCropSpec:
    """The views: counts, sizes, scales and per-view probabilities (reference defaults)."""

    global_crops_number: int = 2
    local_crops_number: int = 0
    global_crops_size: int = 224
    local_crops_size: int = 96
    global_crops_scale: tuple = (0.14, 1.0)
    local_crops_scale: tuple = (0.05, 0.4)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: tuple = (1.0, 0.1, 0.5)  # global 1, global 2.., locals
    solarize_p: float = 0.2          # global 2.. only
    blur_sigma: tuple = (0.1, 2.0)
    jitter: tuple = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue

    def __post_init__(self):
        if self.global_crops_number < 1:
            raise ValueError(f"global_crops_number must be >= 1, got {self.global_crops_number}")
        if self.local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {self.local_crops_number}")
        for name in ("global_crops_size", "local_crops_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("global_crops_scale", "local_crops_scale"):
            sc = getattr(self, name)
            if not (len(sc) == 2 and 0 < sc[0] <= sc[1] <= 1):
                raise ValueError(f"{name} must be (min, max) with 0 < min <= max <= 1, got {sc}")
        probs = [self.flip_p, self.jitter_p, self.gray_p, self.solarize_p, *self.blur_p]
        if len(self.blur_p) != 3 or not all(0.0 <= p <= 1.0 for p in probs):
            raise ValueError(f"probabilities must lie in [0, 1] (blur_p has 3), got flip "
                             f"{self.flip_p} jitter {self.jitter_p} gray {self.gray_p} "
                             f"solarize {self.solarize_p} blur {self.blur_p}")

    @classmethod
    def from_augmentation(cls, aug, **overrides) -> "MultiCropSpec":
        """The spec of a `MultiCropAugmentation` (the torch path's transform)."""
        cj = aug.color_jitter
        jitter = (0.0 if cj.brightness is None else cj.brightness[1] - 1.0,
                  0.0 if cj.contrast is None else cj.contrast[1] - 1.0,
                  0.0 if cj.saturation is None else cj.saturation[1] - 1.0,
                  0.0 if cj.hue is None else cj.hue[1])
        kw = dict(global_crops_number=aug.global_crops_number,
                  local_crops_number=aug.local_crops_number,
                  global_crops_size=aug.global_crops_size, local_crops_size=aug.local_crops_size,
                  global_crops_scale=tuple(aug.global_crops_scale),
                  local_crops_scale=tuple(aug.local_crops_scale), jitter=jitter)
        kw.update(overrides)
        return cls(**kw)

    @property
    def num_views(self) -> int:
        return self.global_crops_number + self.local_crops_number

    def view_kind(self, v: int) -> int:
        """0: global 1, 1: global 2..ng, 2: local."""
        return 0 if v == 0 else (1 if v < self.global_crops_number else 2)


def draw_view_params(spec: MultiCropSpec, seed: int, epoch: int, indices, widths,
                     heights) -> tuple[np.ndarray, np.ndarray]:
    """Every random decision of every view of the batch.

    Returns float32 `params` [B, V, NUM_PARAMS] (columns `P_*`) and `mats` [B, V, 7, 3, 3]:
    the colour matrices of the six jitter slots and of the grayscale step.
    """
    B, V, ng = len(indices), spec.num_views, spec.global_crops_number
    u = uniforms(seed, epoch, indices, (V, NUM_DRAWS))
    P = np.zeros((B, V, NUM_PARAMS), dtype=np.float64)
    W = np.asarray(widths, dtype=np.float64)[:, None]
    H = np.asarray(heights, dtype=np.float64)[:, None]
    for views, scale in ((slice(0, ng), spec.global_crops_scale),
                         (slice(ng, V), spec.local_crops_scale)):
        uv = u[:, views]
        if uv.shape[1] == 0:
            continue
        P[:, views, P_TOP:P_WIDTH + 1] = rrc_boxes(
            W, H, uv[..., _U_AREA:_U_AREA + _ATTEMPTS], uv[..., _U_RATIO:_U_RATIO + _ATTEMPTS],
            uv[..., _U_TOP], uv[..., _U_LEFT], scale)
    P[..., P_FLIP] = u[..., _U_FLIP] < spec.flip_p
    # torchvision's RandomApply: skipped when p < rand, i.e. applied when rand <= p
    jit = u[..., _U_JITTER] <= spec.jitter_p
    P[..., P_JITTER] = jit
    order = np.argsort(u[..., _U_ORDER:_U_ORDER + 4], axis=-1)  # a uniform random permutation
    P[..., P_ORDER:P_ORDER + 4] = order
    bj, cj, sj, hj = spec.jitter
    uf = u[..., _U_FACTORS:_U_FACTORS + 4]

    def lo(s):  # lower end of torchvision's factor range [max(0, 1 - s), 1 + s]
        return max(0.0, 1.0 - s)

    f_b = lo(bj) + (1 + bj - lo(bj)) * uf[..., 0]
    f_c = lo(cj) + (1 + cj - lo(cj)) * uf[..., 1]
    f_s = lo(sj) + (1 + sj - lo(sj)) * uf[..., 2]
    f_h = -hj + 2 * hj * uf[..., 3]
    P[..., P_BRIGHTNESS], P[..., P_CONTRAST] = f_b, f_c
    P[..., P_SATURATION], P[..., P_HUE] = f_s, f_h
    P[..., P_SLOT_C:P_HUE_SHIFT + 1], mats = _jitter_slots(
        order, jit, f_b, f_c, f_s, f_h, any(spec.jitter[:3]), spec.jitter[3] > 0)
    P[..., P_GRAY] = u[..., _U_GRAY] < spec.gray_p
    blur_p = np.array([spec.blur_p[spec.view_kind(v)] for v in range(V)])
    P[..., P_BLUR] = u[..., _U_BLUR] <= blur_p  # iBOT's GaussianBlur: applied when random() <= p
    s0, s1 = spec.blur_sigma
    P[..., P_SIGMA] = s0 + (s1 - s0) * u[..., _U_SIGMA]
    if ng > 1:
        P[:, 1:ng, P_SOLARIZE] = u[:, 1:ng, _U_SOLARIZE] < spec.solarize_p
    g = P[..., P_GRAY, None, None]
    mats[..., M_GRAY, :, :] = (1 - g) * np.eye(3) + g * _LUMA_ROWS
    return P.astype(np.float32), mats.astype(np.float32)


_LUMA_ROWS = np.array([_LUMA] * 3)  # x -> (L, L, L)


def _jitter_slots(order, on, f_b, f_c, f_s, f_h, has_bcs: bool, has_hue: bool):
    """ColorJitter in a fixed graph: ([..., 7] = slot coefficients c + hue shift, [..., 7, 3, 3]).

    Brightness, contrast and saturation are each `clip(M x + c mean(L(x)))` with M = f I,
    (f I, c = 1 - f) and f I + (1 - f) (L, L, L) rows. The hue rotation sits at one place in
    the graph, between slots 2 and 3; the three other ops of the drawn order fill the slots
    before it (those drawn before the hue) and after it, the rest are the identity. So every
    order runs as drawn, clipping after each op included, without a conditional per position.
    Matrices [..., 0:6] are the slots, [..., 6] is left for the grayscale matrix.
    """
    shape = order.shape[:-1]
    eye = np.broadcast_to(np.eye(3), (*shape, 3, 3))
    mats = np.zeros((*shape, NUM_SLOTS + 1, 3, 3))
    mats[...] = np.eye(3)
    coef = np.zeros((*shape, NUM_SLOTS + 1))
    if has_hue:  # PIL adds int(h * 255) to its 8-bit H channel; the graph works in sixths
        coef[..., NUM_SLOTS] = np.where(on, 6.0 * np.trunc(f_h * 255.0) / 255.0, 0.0)
    if not has_bcs:
        return coef, mats
    k = np.argmax(order == 3, axis=-1)                        # where the hue op is drawn
    seq = order[order != 3].reshape(*shape, 3)                # the other three, in order
    for slot in range(NUM_SLOTS):
        j = np.full(shape, slot) if slot < 3 else k + slot - 3  # index into seq
        used = on & ((j < k) if slot < 3 else (j < 3))
        op = np.where(used, np.take_along_axis(seq, np.minimum(j, 2)[..., None], -1)[..., 0],
                      -1)
        f = np.select([op == 0, op == 1, op == 2], [f_b, f_c, f_s], 1.0)[..., None, None]
        sat = (op == 2)[..., None, None]
        mats[..., slot, :, :] = np.where(sat, f * eye + (1 - f) * _LUMA_ROWS, f * eye)
        coef[..., slot] = np.where(op == 1, 1.0 - f_c, 0.0)
    return coef, mats


def epoch_indices(num_samples: int, epoch: int, seed: int, rank: int, world_size: int,
                  shuffle: bool = True, start: int = 0) -> np.ndarray:
    """This rank's indices for `epoch`, exactly as torch's DistributedSampler(shuffle, seed).

    `start` skips that many samples of the epoch's global (all-rank) order first, as the
    trainer's resumable sampler does: rank r then takes order[start + r :: world_size].
    """
    if shuffle:
        g = torch.Generator()
        g.manual_seed(seed + epoch)
        order = torch.randperm(num_samples, generator=g).numpy()
    else:
        order = np.arange(num_samples)
    per_rank = math.ceil(num_samples / world_size)
    total = per_rank * world_size
    if not 0 <= start <= total:
        raise ValueError(f"start {start} is outside the epoch (0..{total} samples)")
    if total > num_samples:  # pad by repeating from the start, as the sampler does
        order = np.concatenate([order, np.resize(order, total - num_samples)])
    return order[start + rank:total:world_size][:per_rank].astype(np.int64)


def make_masks(mask_generator, seed: int, epoch: int, indices, num_masked: int,
               grid: tuple[int, int]) -> np.ndarray:
    """bool [B, num_masked, H, W]: `mask_generator`'s masks, keyed on (seed, epoch, index).

    The one call to swap for a batch mask API. Each sample uses its own `random.Random`, so the
    masks do not depend on batch composition or ranks (they differ from the torch path's, whose
    generator is shared with the crop draws).
    """
    H, W = grid
    if hasattr(mask_generator, "set_epoch"):
        mask_generator.set_epoch(epoch)
    out = np.zeros((len(indices), num_masked, H, W), dtype=bool)
    for b, idx in enumerate(indices):
        rng = random.Random(f"ibot_fast/dali-masks/{seed}/{epoch}/{int(idx)}")
        for k in range(num_masked):
            out[b, k] = mask_generator(H, W, rng)
    return out


# --------------------------------------------------------------------------------------------
# The external source: files -> bytes, labels, parameter tables, masks
# --------------------------------------------------------------------------------------------

class _BatchSource:
    """Batch-mode external source for one (epoch, first batch); raises StopIteration at the end.

    Holds state that outlives a pipeline (header-size cache, bad files), so the loader keeps
    one and re-targets it for each pipeline it builds.
    """

    def __init__(self, samples, spec, mask_generator, patch_size, num_masked, batch_size, seed,
                 rank, world_size, skip_bad, max_bad_retries, debug, draw_masks=True):
        self.samples = samples
        self.draw_masks = draw_masks
        self.spec, self.mask_generator = spec, mask_generator
        self.num_masked = num_masked
        g = spec.global_crops_size // patch_size
        self.grid = (g, g)
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.skip_bad, self.max_bad_retries = skip_bad, max_bad_retries
        self.debug = debug
        self.sizes: dict[int, tuple[int, int]] = {}  # header size (as DALI will decode it)
        self.via_pil: set[int] = set()  # files `decoder_input` hands over as PIL-decoded PPM
        self.bad_paths: list[str] = []
        self.bad: set[int] = set()
        self.unnamed: list[int] = []  # bad files not yet named in a warning
        self.batch_skips: dict[int, int] = {}  # batch -> images skipped while serving it
        self.epoch, self.start_batch, self.num_batches = 0, 0, 0
        self.start_sample = 0
        self.order = np.zeros(0, dtype=np.int64)
        # loader hook: (epoch, batch, used indices) -> start that batch's masks in the background
        self.masks_ahead = None

    def target(self, epoch: int, start_batch: int, start_sample: int = 0):
        """Serve `epoch` from global sample `start_sample`, skipping `start_batch` batches."""
        if (epoch, start_sample) != (self.epoch, self.start_sample):
            self.batch_skips.clear()  # a rebuild at the same position re-serves (overwrites)
        self.epoch, self.start_batch, self.start_sample = epoch, start_batch, start_sample
        self.order = epoch_indices(len(self.samples), epoch, self.seed, self.rank,
                                   self.world_size, start=start_sample)
        self.num_batches = len(self.order) // self.batch_size

    def batch_indices(self, b: int) -> np.ndarray:
        return self.order[b * self.batch_size:(b + 1) * self.batch_size]

    def note_bad(self, idx: int, err: Exception):
        if idx in self.bad:
            return
        self.bad.add(idx)
        self.bad_paths.append(self.samples[idx][0])
        self.unnamed.append((idx, f"{type(err).__name__}: {err}"))

    def name_new_bad(self) -> None:
        """One warning per bad file found since the last call (called by the loader's user)."""
        for idx, why in self.unnamed:
            logger.warning("skipping unreadable image %s (%s); the next image was used instead. "
                           "python -m ibot_fast.data.check DIR lists every such file",
                           self.samples[idx][0], why)
        self.unnamed.clear()

    def _read(self, idx: int):
        path = self.samples[idx][0]
        with open(path, "rb") as f:
            data = f.read()
        size = self.sizes.get(idx)
        if size is not None and idx not in self.via_pil:
            return np.frombuffer(data, dtype=np.uint8), size
        encoded, size, via_pil = decoder_input(data)  # header only, unless decoded by PIL
        self.sizes[idx] = size
        if via_pil:
            self.via_pil.add(idx)
        return encoded, size

    def read_good(self, idx: int):
        """(index actually used, bytes, (w, h)): the next readable index, as the torch loader."""
        n = len(self.samples)
        tried = []
        for k in range(min(self.max_bad_retries + 1, n)):
            j = (idx + k) % n
            if j in self.bad:
                tried.append(self.samples[j][0])
                continue
            try:
                data, size = self._read(j)
                return j, data, size
            except _BAD_IMAGE_ERRORS as err:
                if not self.skip_bad:
                    raise RuntimeError(
                        f"cannot read image {self.samples[j][0]} ({type(err).__name__}: {err}). "
                        f"Remove or replace the file (python -m ibot_fast.data.check lists "
                        f"all of them), or enable skip_bad to skip unreadable images.") from err
                self.note_bad(j, err)
                tried.append(self.samples[j][0])
        shown = ", ".join(tried[:5]) + (f", ... ({len(tried)} in all)" if len(tried) > 5 else "")
        raise RuntimeError(
            f"{len(tried)} consecutive images starting at index {idx} could not be read: "
            f"{shown}. The dataset looks broken; run python -m ibot_fast.data.check on it.")

    def __call__(self, info):
        b = self.start_batch + info.iteration
        if info.epoch_idx > 0 or b >= self.num_batches:
            raise StopIteration
        used, data, sizes = [], [], []
        n, skipped = len(self.samples), 0
        for idx in self.batch_indices(b):
            j, d, s = self.read_good(int(idx))
            skipped += (j - int(idx)) % n  # read_good tried idx, idx + 1, ... before j
            used.append(j)
            data.append(d)
            sizes.append(s)
        self.batch_skips[b] = skipped
        used = np.asarray(used, dtype=np.int64)
        wh = np.asarray(sizes, dtype=np.int64)
        params, mats = draw_view_params(self.spec, self.seed, self.epoch, used, wh[:, 0],
                                        wh[:, 1])
        labels = np.asarray([self.samples[j][1] for j in used], dtype=np.int64)
        if self.draw_masks:
            masks = make_masks(self.mask_generator, self.seed, self.epoch, used,
                               self.num_masked, self.grid).astype(np.uint8)
        else:  # drawn by the batch mask API after the pipeline
            masks = np.zeros((len(used), 0), dtype=np.uint8)
            if self.masks_ahead is not None:
                self.masks_ahead(self.epoch, b, used)
        return data, labels, params, mats, masks, used


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------

def _hsv_hue_shift(x, shift6):
    """Rotate the HSV hue of float RGB [S, S, 3] by `shift6` sixths of the circle, as PIL does.

    torchvision's PIL back end converts to HSV, adds the shift to H and converts back; the max
    V, the min and the chroma C = V - min are unchanged. In sixths, with the hexagonal formulas:
    h = (G - B) / C, (B - R) / C + 2 or (R - G) / C + 4 for the first channel holding the max
    (R before G before B), then out_c = V - C clamp(min(k_c, 4 - k_c), 0, 1) with
    k_c = (n_c + h + shift) mod 6, n = (5, 3, 1). Written with whole-pixel ops (channel
    reductions, 3x3 `coord_transform`s) to keep the graph small. DALI's own ``fn.hue`` rotates
    about the grey axis in YIQ instead (in degrees), which on real photos lands further from
    PIL's result than no hue change at all.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    v = fn.reductions.max(x, axes=2, keep_dims=True)                        # [S, S, 1]
    c = v - fn.reductions.min(x, axes=2, keep_dims=True)
    # (G - B, B - R, R - G) / C + (0, 2, 4); a grey pixel (C = 0) has numerators 0
    d = fn.coord_transform(x, M=[0, 1, -1, -1, 0, 1, 1, -1, 0])
    q = fn.coord_transform(d / dmath.max(c, 1e-6), M=[1, 0, 0, 0, 1, 0, 0, 0, 1], T=[0, 2, 4])
    is_max = fn.cast(x >= v, dtype=types.FLOAT)
    earlier = fn.coord_transform(is_max, M=[0, 0, 0, 1, 0, 0, 1, 1, 0])  # maxima before c
    h = fn.reductions.sum(is_max * (earlier < 0.5) * q, axes=2, keep_dims=True) + shift6
    k = fn.coord_transform(h, M=[1, 1, 1], T=[5, 3, 1])                     # [S, S, 3]
    k = k - 6.0 * dmath.floor(k * (1.0 / 6.0))
    return v - c * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0)


def _augment_view(image, p, mats, v: int, size: int, kind: int, spec: MultiCropSpec,
                  gpu: bool, dtype):
    """One view of one decoded image. `p`: the [V, K] parameter table, `mats`: [V, 7, 3, 3]."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    # Arithmetic with image data must see the parameters on the image's device; argument inputs
    # (roi, M, sigma, mirror) and conditions must stay on the CPU.
    pd = p.gpu() if gpu else p

    x = fn.resize(image, size=[size, size], roi_start=p[v, P_TOP:P_LEFT + 1],
                  roi_end=p[v, P_TOP:P_LEFT + 1] + p[v, P_HEIGHT:P_WIDTH + 1],
                  roi_relative=False, interp_type=types.INTERP_CUBIC, antialias=True,
                  dtype=types.FLOAT)
    if any(spec.jitter[:3]) or spec.jitter[3] > 0:
        for slot in range(NUM_SLOTS):
            if slot == 3 and spec.jitter[3] > 0:
                x = _hsv_hue_shift(x, pd[v, P_HUE_SHIFT])
            if any(spec.jitter[:3]):
                # mean grey level L of the current image (PIL's contrast pivot), [1, 1, 1]
                mean = fn.coord_transform(fn.reductions.mean(x, axes=[0, 1], keep_dims=True),
                                          M=list(_LUMA))
                x = dmath.clamp(fn.coord_transform(x, M=mats[v, slot])
                                + pd[v, P_SLOT_C + slot] * mean, 0.0, 255.0)
    if spec.gray_p > 0:
        x = fn.coord_transform(x, M=mats[v, M_GRAY])
    blur_p = spec.blur_p[kind]
    if blur_p >= 1.0:
        x = fn.gaussian_blur(x, sigma=p[v, P_SIGMA])
    elif blur_p > 0.0:
        if p[v, P_BLUR] > 0.5:  # DALI conditional: only the selected samples are blurred
            x = fn.gaussian_blur(x, sigma=p[v, P_SIGMA])
        else:
            x = x
    if kind == 1 and spec.solarize_p > 0:
        # PIL solarizes uint8 values >= 128; our float x rounds to >= 128 from 127.5 on
        x = x + pd[v, P_SOLARIZE] * (x >= 127.5) * (255.0 - 2.0 * x)
    return fn.crop_mirror_normalize(
        x, mirror=fn.cast(p[v, P_FLIP], dtype=types.INT32), output_layout="CHW", dtype=dtype,
        mean=[255.0 * m for m in IMAGENET_MEAN], std=[255.0 * s for s in IMAGENET_STD])


def _build_pipeline(source, spec: MultiCropSpec, batch_size: int, num_threads: int,
                    device: str, device_id, dtype: torch.dtype, seed: int, prefetch: int,
                    debug: bool):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    dali_dtype = {torch.float16: types.FLOAT16}.get(dtype, types.FLOAT)
    gpu = device == "gpu"

    @pipeline_def(enable_conditionals=True)
    def multicrop():
        encoded, labels, params, mats, masks, index = fn.external_source(
            source=source, num_outputs=6, batch=True, batch_info=True)
        # Decode once; every view is cropped from this image. The source's sizes are those of
        # the decoded image (EXIF orientation applied, as decode_image does).
        image = fn.decoders.image(encoded, device="mixed" if gpu else "cpu",
                                  output_type=types.RGB, **DECODER_ARGS)
        views = []
        for v in range(spec.num_views):
            kind = spec.view_kind(v)
            size = spec.global_crops_size if kind < 2 else spec.local_crops_size
            views.append(_augment_view(image, params, mats, v, size, kind, spec, gpu,
                                       dali_dtype))
        outs = [*views, labels, masks, index]
        if debug:
            outs += [params]
        return tuple(outs)

    with _no_origin_tracing():
        pipe = multicrop(batch_size=batch_size, num_threads=num_threads,
                         device_id=device_id if gpu else None, seed=seed,
                         prefetch_queue_depth=prefetch)
        pipe.build()
    return pipe


@contextlib.contextmanager
def _no_origin_tracing():
    """Skip DALI's per-operator Python stack capture while building (a third of the build time
    of this ~100-operators-per-view graph); errors then name operators without the source line.
    Private DALI API: without it the build is just slower."""
    try:
        from nvidia.dali._utils import dali_trace
        before = dali_trace.is_tracing_enabled()
        dali_trace.set_tracing(enabled=False)
    except (ImportError, AttributeError, TypeError):
        yield
        return
    try:
        yield
    finally:
        dali_trace.set_tracing(enabled=before)


# --------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------

class DALIMultiCropLoader:
    """Iterates one epoch of (crops, labels, masks) batches, like the torch pre-training loader.

    `set_epoch(epoch)` before iterating (the torch loader's `sampler.set_epoch`); `len()` is the
    number of batches per epoch (DistributedSampler's count, last partial batch dropped).
    `state_dict()` -> {"epoch", "samples_consumed"} (this rank's samples of the epoch already
    yielded); `load_state_dict` makes the next iteration start there, so a run resumed mid-epoch
    continues with the exact batches it would have seen. With `debug=True` every batch also
    carries a dict with the parameter table [B, V, K] and the image indices used.
    """

    def __init__(self, samples, spec: MultiCropSpec, mask_generator, patch_size: int,
                 batch_size: int, num_masked_crops: Optional[int] = None, rank: int = 0,
                 world_size: int = 1, seed: int = 0, device: str = "gpu",
                 device_id: Optional[int] = 0, num_threads: int = 4,
                 dtype: torch.dtype = torch.float32, skip_bad: bool = True,
                 max_bad_retries: int = 100, prefetch: int = 2, debug: bool = False,
                 mask_batcher=None, masks_ahead: bool = True):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"dtype must be a floating type, got {dtype}")
        if patch_size < 1 or spec.global_crops_size % patch_size:
            raise ValueError(f"patch_size {patch_size} must divide global_crops_size "
                             f"{spec.global_crops_size}")
        if not samples:
            raise ValueError("samples is empty: no images to load")
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        num_masked = spec.global_crops_number if num_masked_crops is None else num_masked_crops
        self.spec, self.batch_size, self.dtype = spec, batch_size, dtype
        self.device, self.device_id, self.num_threads = device, device_id, num_threads
        self.seed, self.prefetch, self.debug = seed, prefetch, debug
        self.mask_batcher = mask_batcher
        # The cpp/cuda mask back ends draw a whole batch from (seed, epoch, index) in `_to_batch`;
        # otherwise the source draws per-sample masks with `mask_generator` (`make_masks`).
        source_masks = mask_batcher is None or mask_batcher.backend == "python"
        self.source = _BatchSource(list(samples), spec, mask_generator, patch_size, num_masked,
                                   batch_size, seed, rank, world_size, skip_bad,
                                   max_bad_retries, debug, source_masks)
        # masks_ahead (cpp back end): the source starts each batch's masks on a background thread
        # as soon as it knows the batch's image indices (DALI calls it `prefetch` batches
        # ahead); `_masks` then only collects the result. The C++ generator releases the GIL.
        # False: drawn on the training thread when the batch comes out (the reference path).
        self.masks_ahead = bool(masks_ahead) and not source_masks and \
            mask_batcher.backend == "cpp"
        self._mask_pool = None
        self._mask_jobs: dict = {}  # (epoch, batch) -> (used indices, Future of the MaskBatch)
        self.masks_ahead_used = 0  # batches whose masks came from the background thread
        if self.masks_ahead:
            self.source.masks_ahead = self._start_masks
        self.source.target(0, 0)
        self.world_size = world_size
        self.full_epoch_batches = self.source.num_batches
        if self.source.num_batches < 1:
            raise ValueError(
                f"{len(samples)} images give {len(self.source.order)} per rank over "
                f"{world_size} rank(s): less than one batch of {batch_size}, so an epoch would "
                f"have no step. Lower the batch size or use more images.")
        # position: global sample the epoch (re)started from + this rank's batches since then
        self.epoch, self.start_sample, self.consumed_batches = 0, 0, 0
        self._bad_count = [0, 0]  # [epoch, images skipped in its yielded batches]

    # ---- epoch and position -------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches of a whole epoch on this rank (a resumed epoch yields fewer)."""
        return self.full_epoch_batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start_sample, self.consumed_batches = int(epoch), 0, 0
            self._mask_jobs.clear()  # an epoch left early (e.g. --max_steps) leaves some

    def state_dict(self) -> dict:
        """{"epoch", "samples_consumed"}: samples of the epoch consumed by all ranks together
        (the global position, as the trainer's resumable sampler counts it)."""
        return {"epoch": self.epoch, "samples_consumed": self.start_sample
                + self.consumed_batches * self.batch_size * self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue at that position (any world size: rank r resumes at start + r, step W)."""
        start = int(state["samples_consumed"])
        epoch_indices(len(self.source.samples), 0, 0, 0, self.world_size, start=start)  # checks
        self.epoch, self.start_sample, self.consumed_batches = int(state["epoch"]), start, 0
        self._mask_jobs.clear()

    @property
    def bad_paths(self) -> list[str]:
        return self.source.bad_paths

    @property
    def num_bad(self) -> int:
        return len(self.source.bad_paths)

    def bad_images_this_epoch(self) -> int:
        """Images skipped as undecodable in the batches of the current (or just finished)
        epoch yielded so far on this rank; also names, one warning per file, the bad files
        found since the last call. Call it outside progress bars (the trainer: at epoch end)."""
        self.source.name_new_bad()
        return self._bad_count[1]

    # ---- iteration ------------------------------------------------------------------------
    def _iterator(self):
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.source.target(self.epoch, self.consumed_batches, self.start_sample)
        pipe = _build_pipeline(self.source, self.spec, self.batch_size, self.num_threads,
                               self.device, self.device_id, self.dtype, self.seed,
                               self.prefetch, self.debug)
        names = [f"view{v}" for v in range(self.spec.num_views)] + ["labels", "masks", "index"]
        if self.debug:
            names += ["params"]
        return DALIGenericIterator(pipe, names, auto_reset=False, prepare_first_batch=False,
                                   last_batch_policy=LastBatchPolicy.DROP)

    def _find_undecodable(self, b: int, err: Exception) -> None:
        """DALI failed on batch `b`: decode its files with PIL to name the culprit(s)."""
        culprits = []
        for idx in self.source.batch_indices(b):
            j, _, _ = self.source.read_good(int(idx))
            path = self.source.samples[j][0]
            try:
                decode_image(path)
            except _BAD_IMAGE_ERRORS as perr:
                culprits.append((j, path, perr))
        if not culprits:
            files = ", ".join(self.source.samples[int(i)][0] for i in self.source.batch_indices(b))
            raise RuntimeError(f"DALI failed on batch {b} of epoch {self.epoch} (files: {files}) "
                               f"and PIL reads all of them: {err}") from err
        for j, path, perr in culprits:
            if not self.source.skip_bad:
                raise RuntimeError(
                    f"cannot decode image {path} ({type(perr).__name__}: {perr}). Remove or "
                    f"replace the file (python -m ibot_fast.data.check lists all of them), or "
                    f"enable skip_bad to skip unreadable images.") from err
            self.source.note_bad(j, perr)

    def __iter__(self):
        while True:
            it, rebuild = self._iterator(), False
            n = self.source.num_batches  # batches left from this epoch's start position
            while self.consumed_batches < n:
                try:
                    out = next(it)[0]
                except StopIteration:
                    break
                except RuntimeError as err:
                    self._find_undecodable(self.consumed_batches, err)
                    rebuild = True  # a new pipeline restarts at this batch, without the culprit
                    break
                self.consumed_batches += 1
                self._count_skips(self.consumed_batches - 1)
                yield self._to_batch(out)
            del it
            self._mask_jobs.clear()  # batches prefetched but never consumed (or to be redone)
            if not rebuild:
                break
        # The epoch is done: a new iteration (or `set_epoch`) starts the next one.
        self.epoch += 1
        self.start_sample = self.consumed_batches = 0

    def _count_skips(self, b: int) -> None:
        if self._bad_count[0] != self.epoch:
            self._bad_count = [self.epoch, 0]
        self._bad_count[1] += self.source.batch_skips.pop(b, 0)

    def _to_batch(self, out: dict):
        crops = [out[f"view{v}"] for v in range(self.spec.num_views)]
        if crops[0].dtype != self.dtype:  # DALI writes float32/float16 only
            crops = [c.to(self.dtype) for c in crops]
        labels = out["labels"].long().view(-1)
        index = out["index"].view(-1)
        masks = self._masks(out["masks"], index)
        if self.debug:
            return crops, labels, masks, {"params": out["params"], "index": index}
        return crops, labels, masks

    def _start_masks(self, epoch: int, b: int, used: np.ndarray) -> None:
        """Source hook (masks_ahead): generate batch `b`'s masks on the background thread."""
        if self._mask_pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._mask_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ibot-masks")
        ids = torch.from_numpy(used.copy())
        H, W = self.source.grid
        self._mask_jobs[(epoch, b)] = (ids, self._mask_pool.submit(
            self.mask_batcher.generate, ids, epoch, H, W, self.source.num_masked))

    def _masks(self, masks_BN, index):
        """The batch's masks in the torch loader's form (plain list, or the batch API's)."""
        src = self.source
        if self.mask_batcher is not None and not src.draw_masks:
            H, W = src.grid
            ids = index.cpu()
            job = self._mask_jobs.pop((self.epoch, self.consumed_batches - 1), None)
            if job is not None and torch.equal(job[0], ids):
                self.masks_ahead_used += 1
                return job[1].result()  # normally finished long ago: no training-thread work
            args = (ids, self.epoch, H, W, src.num_masked)
            if self.mask_batcher.backend == "cuda":  # drawn on the GPU by the trainer
                return self.mask_batcher.request(*args)
            return self.mask_batcher.generate(*args)
        masks = [m.bool() for m in masks_BN.unbind(1)]  # [B, n, H, W] -> n x [B, H, W]
        if self.mask_batcher is not None:
            from ibot_fast.masking import MaskBatch

            masks_CBHW = torch.stack(masks)
            return MaskBatch.from_masks(masks_CBHW, self.mask_batcher.max_masked(*src.grid))
        return masks


def build_dali_pretrain_loader(dataset, batch_size_per_gpu: int, rank: int = 0,
                               world_size: int = 1, seed: int = 0, device: str = "gpu",
                               device_id: Optional[int] = 0, num_threads: int = 4,
                               dtype: torch.dtype = torch.float32,
                               **kwargs) -> DALIMultiCropLoader:
    """The DALI loader for an `ImageFolderMask` (its files, transform spec, masks, bad policy)."""
    from ibot_fast.data.transforms import MultiCropAugmentation

    if not hasattr(dataset, "samples") or not isinstance(dataset.transform,
                                                         MultiCropAugmentation):
        raise ValueError("the DALI data backend needs an ImageFolder dataset with a "
                         "MultiCropAugmentation transform (synthetic data has no files); use "
                         "--data_backend torch")
    if str(dataset.samples[0][0]).startswith("synthetic:"):
        raise ValueError("the DALI data backend reads image files; synthetic data has none. "
                         "Use --data_backend torch")
    spec = MultiCropSpec.from_augmentation(dataset.transform)
    return DALIMultiCropLoader(
        dataset.samples, spec, dataset.mask_generator, dataset.patch_size, batch_size_per_gpu,
        num_masked_crops=dataset.num_masked_crops, rank=rank, world_size=world_size, seed=seed,
        device=device, device_id=device_id, num_threads=num_threads, dtype=dtype,
        skip_bad=dataset.skip_bad, max_bad_retries=dataset.max_bad_retries,
        mask_batcher=getattr(dataset, "mask_batcher", None), **kwargs)
