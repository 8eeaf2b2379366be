"""iBOT multi-crop augmentation on PIL images, without torchvision.

This re-implements the torchvision ops that the reference's `DataAugmentationiBOT` uses
(docs/reference-semantics.md#crops) with the same algorithms *and the same random draws in the
same order*: every op that torchvision drives from the torch RNG draws from a `torch.Generator`
here (`torch.rand(1)`, `torch.empty(1).uniform_`, `torch.randint`, `torch.randperm`, compared in
float32 like torchvision), and the two iBOT ops that use Python's `random` (GaussianBlur,
Solarization) draw from a `random.Random`. The draw order follows current torchvision
(ColorJitter draws the permutation, then all four factors); torchvision 0.8.2, which the
reference pinned, draws each factor inside the permuted loop: same distribution, another order.
So with the same seeds the crops should equal current torchvision's bit for bit (same Pillow);
that is by construction only, as torchvision cannot be imported next to this project's torch.

Randomness
----------
`MultiCropAugmentation.__call__(img, rng=None)`:

* `rng=None` (the reference's behaviour): torch's default generator and Python's global
  `random` instance. PyTorch's DataLoader reseeds both in every worker (`torch.manual_seed` and
  `random.seed` with `base_seed + worker_id`, `base_seed` drawn anew whenever workers start),
  so workers never repeat each other's draws; `loader.seed_worker` also seeds numpy. With
  `num_workers=0` the trainer's own seeding of the main process decides.
* `rng=random.Random(...)`: a private, reproducible source. The torch generator for the
  torchvision-style ops is seeded from `rng.getrandbits(63)`, so one Python seed fixes the whole
  sample. The datasets use this when given a `seed` (one `Random` per (seed, epoch, index)).
"""

from __future__ import annotations

import math
import random
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Shaped [3, 1, 1] so they broadcast over [3, H, W]; float32 like torchvision's Normalize.
_MEAN_311 = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD_311 = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)


def global_python_rng() -> random.Random:
    """The `random.Random` instance behind the `random` module's functions.

    Used when no rng is passed, so that `random.seed(...)` (the trainer's, or the DataLoader's in
    each worker) controls it, exactly as the reference's `random.random()` calls.
    """
    return random._inst  # type: ignore[attr-defined]  # stable CPython/PyPy module attribute


# --------------------------------------------------------------------------------------------
# Random draws, written the way torchvision writes them (so the generator stream is identical)
# --------------------------------------------------------------------------------------------

def _rand_below(p: float, gen: Optional[torch.Generator]) -> bool:
    """`torch.rand(1) < p`, compared in float32 as torchvision does."""
    return bool(torch.rand(1, generator=gen) < p)


def _uniform(low: float, high: float, gen: Optional[torch.Generator]) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=gen))


# --------------------------------------------------------------------------------------------
# RandomResizedCrop
# --------------------------------------------------------------------------------------------

def _random_resized_crop_params(width, height, scale, ratio, gen):
    """torchvision's `RandomResizedCrop.get_params`; also says whether it fell back."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))  # float32, as torchvision
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=gen).item()
        aspect_ratio = torch.exp(
            torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen)
        ).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,), generator=gen).item()
            left = torch.randint(0, width - w + 1, size=(1,), generator=gen).item()
            return (top, left, h, w), False

    # Ten misses (only for extreme aspect ratios or tiny images): the largest central crop whose
    # aspect ratio is clamped into the allowed range.
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    top = (height - h) // 2
    left = (width - w) // 2
    return (top, left, h, w), True


def random_resized_crop_params(
    width: int,
    height: int,
    scale: Sequence[float],
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    gen: Optional[torch.Generator] = None,
) -> tuple[int, int, int, int]:
    """Crop box `(top, left, h, w)` drawn like torchvision's RandomResizedCrop.

    Up to 10 attempts: area fraction ~ U(scale), aspect ratio log-uniform in `ratio`, sides
    rounded, accepted if the box fits; position uniform. Otherwise a central crop with the aspect
    ratio clamped to `ratio`.
    """
    box, _ = _random_resized_crop_params(width, height, scale, ratio, gen)
    return box


def resized_crop(img: Image.Image, top: int, left: int, h: int, w: int, size: int) -> Image.Image:
    """Crop the box and resize it to size x size with bicubic interpolation (PIL, antialiased)."""
    return img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)


def random_resized_crop(img, size, scale, gen=None, ratio=(3.0 / 4.0, 4.0 / 3.0)):
    width, height = img.size
    top, left, h, w = random_resized_crop_params(width, height, scale, ratio, gen)
    return resized_crop(img, top, left, h, w, size)


# --------------------------------------------------------------------------------------------
# Flip, colour jitter, grayscale (torchvision's PIL back end)
# --------------------------------------------------------------------------------------------

def random_horizontal_flip(img: Image.Image, p: float = 0.5, gen=None) -> Image.Image:
    if _rand_below(p, gen):
        return img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


def adjust_brightness(img: Image.Image, factor: float) -> Image.Image:
    """Blend with black: out = trunc(clip(factor * x, 0, 255))."""
    return ImageEnhance.Brightness(img).enhance(factor)


def adjust_contrast(img: Image.Image, factor: float) -> Image.Image:
    """Blend with the grey level m = int(mean(L) + 0.5): out = trunc(clip(m + f (x - m)))."""
    return ImageEnhance.Contrast(img).enhance(factor)


def adjust_saturation(img: Image.Image, factor: float) -> Image.Image:
    """Blend with the grayscale image (factor 0 gives gray, 1 the original)."""
    return ImageEnhance.Color(img).enhance(factor)


def adjust_hue(img: Image.Image, hue_factor: float) -> Image.Image:
    """Rotate the hue: shift PIL's uint8 H channel by `hue_factor * 255`, wrapping mod 256."""
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor {hue_factor} is not in [-0.5, 0.5]")
    if img.mode in {"L", "1", "I", "F"}:
        return img  # no hue to rotate
    h, s, v = img.convert("HSV").split()
    # torchvision adds np.uint8(hue_factor * 255): the float is truncated toward zero and wraps
    # modulo 256 (-25.5 -> -25 -> 231). Written out explicitly because casting a negative float
    # to uint8 is undefined in C and newer numpy may warn about it.
    shift = int(hue_factor * 255) % 256
    h = h.point([(v + shift) % 256 for v in range(256)])  # a lookup table, in C
    return Image.merge("HSV", (h, s, v)).convert(img.mode)


class ColorJitter:
    """torchvision's `ColorJitter(brightness, contrast, saturation, hue)` for PIL images.

    Factors are drawn uniformly in [max(0, 1 - b), 1 + b] (same for contrast and saturation) and
    the hue shift in [-hue, hue]; the four adjustments run in a random permutation order.
    """

    def __init__(self, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
        self.brightness = self._range(brightness, "brightness")
        self.contrast = self._range(contrast, "contrast")
        self.saturation = self._range(saturation, "saturation")
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        self.hue = (-hue, hue) if hue > 0 else None

    @staticmethod
    def _range(value, name):
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {value}")
        if value == 0:
            return None  # torchvision skips the op and its draw
        return (max(0.0, 1.0 - value), 1.0 + value)

    def get_params(self, gen=None):
        """`(order, brightness, contrast, saturation, hue)`, drawn in torchvision's order."""
        order = torch.randperm(4, generator=gen).tolist()
        b = None if self.brightness is None else _uniform(*self.brightness, gen)
        c = None if self.contrast is None else _uniform(*self.contrast, gen)
        s = None if self.saturation is None else _uniform(*self.saturation, gen)
        h = None if self.hue is None else _uniform(*self.hue, gen)
        return order, b, c, s, h

    @staticmethod
    def apply(img, order, b, c, s, h):
        for op in order:
            if op == 0 and b is not None:
                img = adjust_brightness(img, b)
            elif op == 1 and c is not None:
                img = adjust_contrast(img, c)
            elif op == 2 and s is not None:
                img = adjust_saturation(img, s)
            elif op == 3 and h is not None:
                img = adjust_hue(img, h)
        return img

    def __call__(self, img, gen=None):
        return self.apply(img, *self.get_params(gen))


def random_color_jitter(img, jitter: ColorJitter, p: float = 0.8, gen=None):
    """torchvision's `RandomApply([jitter], p)`: skipped when `p < torch.rand(1)`."""
    if p < torch.rand(1, generator=gen):
        return img
    return jitter(img, gen)


def random_grayscale(img: Image.Image, p: float = 0.2, gen=None) -> Image.Image:
    """Gray with probability p, kept as 3 identical channels (PIL's L -> RGB copies L)."""
    if _rand_below(p, gen):
        return img.convert("L").convert("RGB")
    return img


# --------------------------------------------------------------------------------------------
# iBOT's own ops (Python `random`)
# --------------------------------------------------------------------------------------------

def random_gaussian_blur(img, p: float, rng: random.Random, radius_min=0.1, radius_max=2.0):
    """PIL Gaussian blur with radius ~ U(0.1, 2.0), applied when `random() <= p`.

    The draw happens even for p = 1.0 (the reference draws it too).
    """
    if rng.random() <= p:
        return img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(radius_min, radius_max)))
    return img


def random_solarize(img, p: float, rng: random.Random, threshold: int = 128):
    """Invert every value >= threshold, applied when `random() < p`."""
    if rng.random() < p:
        return ImageOps.solarize(img, threshold)
    return img


def to_tensor_normalize(img: Image.Image) -> torch.Tensor:
    """ToTensor + Normalize(ImageNet): uint8 HWC RGB -> float32 [3, H, W].

    Same arithmetic as torchvision (divide by 255, then subtract mean and divide by std, in
    float32) so the values agree bit for bit.
    """
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # copy: PIL buffers are read-only
    # contiguous() before the float ops: on the HWC-strided view they run ~2.5x slower.
    x = x.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    return x.sub_(_MEAN_311).div_(_STD_311)


# --------------------------------------------------------------------------------------------
# The multi-crop pipeline
# --------------------------------------------------------------------------------------------

class MultiCropAugmentation:
    """The reference's `DataAugmentationiBOT`: ng global and nl local crops of one image.

    Returns float32 tensors [3, S, S] in the order
    [global 1 (blur p=1.0), global 2..ng (blur p=0.1, solarize p=0.2), locals (blur p=0.5)];
    every crop first gets RandomResizedCrop (bicubic) -> flip (0.5) -> colour jitter (0.8) ->
    grayscale (0.2). Crop sizes are parameters (defaults 224/96 as in the reference) so that the
    CPU demo can use small crops.
    """

    def __init__(
        self,
        global_crops_scale=(0.14, 1.0),
        local_crops_scale=(0.05, 0.4),
        global_crops_number=2,
        local_crops_number=0,
        global_crops_size=224,
        local_crops_size=96,
    ):
        if global_crops_number < 1:
            raise ValueError(f"global_crops_number must be >= 1, got {global_crops_number}")
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}")
        for name, sc in (("global_crops_scale", global_crops_scale),
                         ("local_crops_scale", local_crops_scale)):
            if not (len(sc) == 2 and 0 < sc[0] <= sc[1] <= 1):
                raise ValueError(f"{name} must be (min, max) with 0 < min <= max <= 1, got {sc}")
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.global_crops_number = global_crops_number
        self.local_crops_number = local_crops_number
        self.global_crops_size = global_crops_size
        self.local_crops_size = local_crops_size
        self.color_jitter = ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)

    @property
    def num_crops(self) -> int:
        return self.global_crops_number + self.local_crops_number

    def _crop(self, img, size, scale, blur_p, solarize_p, gen, rng):
        # The draw order below is the reference's Compose order; keep it (bitwise parity).
        img = random_resized_crop(img, size, scale, gen)
        img = random_horizontal_flip(img, 0.5, gen)
        img = random_color_jitter(img, self.color_jitter, 0.8, gen)
        img = random_grayscale(img, 0.2, gen)
        img = random_gaussian_blur(img, blur_p, rng)
        if solarize_p is not None:  # only the 2nd..ng-th global crops have the op (and its draw)
            img = random_solarize(img, solarize_p, rng)
        return to_tensor_normalize(img)

    def __call__(self, img: Image.Image, rng: Optional[random.Random] = None) -> list[torch.Tensor]:
        if rng is None:
            gen, py_rng = None, global_python_rng()
        else:
            gen, py_rng = torch.Generator().manual_seed(rng.getrandbits(63)), rng
        if img.mode != "RGB":  # e.g. grayscale MNIST digits; ImageFolder's loader does the same
            img = img.convert("RGB")

        gsize, gscale = self.global_crops_size, self.global_crops_scale
        crops = [self._crop(img, gsize, gscale, 1.0, None, gen, py_rng)]
        for _ in range(self.global_crops_number - 1):
            crops.append(self._crop(img, gsize, gscale, 0.1, 0.2, gen, py_rng))
        for _ in range(self.local_crops_number):
            crops.append(self._crop(img, self.local_crops_size, self.local_crops_scale,
                                    0.5, None, gen, py_rng))
        return crops

    def __repr__(self):
        return (f"{type(self).__name__}(global {self.global_crops_number}x{self.global_crops_size}"
                f" scale={self.global_crops_scale}, local {self.local_crops_number}x"
                f"{self.local_crops_size} scale={self.local_crops_scale})")
