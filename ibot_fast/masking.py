"""Masked-image-modelling masks, exactly as iBOT's ``ImageFolderMask`` draws them.

The reference (bytedance/ibot ``loader.py``, ``ImageFolderMask.__getitem__``) has no separate
mask generator: it samples one prediction ratio per crop and then builds either a BEiT-style
*block* mask or a uniformly *random* mask on the crop's patch grid (14x14 for a 224-px crop
with 16-px patches, 6x6 for a 96-px local crop). This module restates that logic as plain
functions plus a small configurable :class:`MaskGenerator`. See
``/work/shared/reference-semantics.md`` section 5 for the behaviour being reproduced.

Exactness
---------
* :func:`block_mask` consumes a ``random.Random`` in *exactly* the order the reference
  consumes the global ``random`` module (``uniform`` for the area, ``uniform`` for the log
  aspect, two ``randint`` for the corner, ``choice`` for the ratio). Seeding
  ``random.Random(s)`` here and ``random.seed(s)`` there yields identical masks.
* Block masks never exceed ``floor(ratio * H * W)`` cells and usually fall a little short
  (14x14: mean 17.58 / 57.26 / 97.54 at r = 0.1 / 0.3 / 0.5, measured on the reference).
  Rarely, all ten attempts of the first round overshoot and a crop with r > 0 gets *no*
  masked cell (about 1 in 10^4 at r = 0.1 on 14x14); upstream does the same, so consumers
  must handle empty masks whatever the ratio.
* :func:`random_mask` sets exactly ``int(ratio * H * W)`` cells. The reference shuffles with
  the global ``numpy.random`` (whose per-worker state upstream is an artefact of PyTorch 1.7
  forking, see section 5.2), so bit parity is *not* a goal there; we draw the cells with
  ``rng.sample`` so that one ``random.Random`` drives every choice of a crop.

Speed
-----
:func:`block_mask` keeps the grid as one Python integer (bit ``i * W + j`` = cell ``(i, j)``):
counting the already-masked cells of a candidate rectangle is one AND and one ``bit_count``
instead of a numpy slice sum, and marking it is one OR. :func:`block_mask_reference` is the
line-by-line numpy restatement of section 5.4; tests check the two agree bit for bit and the
benchmark times both.

Presets (``MaskGenerator.from_preset(name)``)
---------------------------------------------
``code_default``      ``--pred_ratio 0.3 --pred_ratio_var 0`` (``main_ibot.py`` defaults)
``vit_small_readme``  ``--pred_ratio 0 0.3 --pred_ratio_var 0 0.2`` (README ViT-S/16 recipe):
                      each crop is unmasked with probability 1/2, otherwise r ~ U(0.1, 0.5);
                      on 14x14 the mean masked fraction is 0.146 and at most 98 cells are set.
``swin_tiny_readme``  as ``vit_small_readme`` plus ``--pred_start_epoch 50`` (README Swin-T/14).

The aspect-ratio range is fixed to ``(0.3, 1/0.3)`` in the reference's ``train_ibot``.
"""

from __future__ import annotations

import functools
import math
import numbers
import random
from typing import Sequence, Union

import numpy as np
import torch

__all__ = [
    "DEFAULT_ASPECT",
    "PRESETS",
    "MaskGenerator",
    "block_mask",
    "block_mask_reference",
    "block_masks",
    "random_mask",
    "random_masks",
]

DEFAULT_ASPECT = (0.3, 1 / 0.3)

# Upstream tries at most this many rectangles before it gives up on a round (BEiT's constant).
_ATTEMPTS_PER_ROUND = 10

PRESETS = {
    "code_default": dict(pred_ratio=0.3, pred_ratio_var=0.0),
    "vit_small_readme": dict(pred_ratio=[0.0, 0.3], pred_ratio_var=[0.0, 0.2]),
    "swin_tiny_readme": dict(pred_ratio=[0.0, 0.3], pred_ratio_var=[0.0, 0.2], pred_start_epoch=50),
}

Ratio = Union[float, Sequence[float]]


# --------------------------------------------------------------------------------------------
# argument checks (errors say which value was wrong)
# --------------------------------------------------------------------------------------------

def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_grid(height, width) -> None:
    if not (isinstance(height, numbers.Integral) and isinstance(width, numbers.Integral)):
        raise ValueError(f"mask grid must be integers, got height={height!r}, width={width!r}")
    if height <= 0 or width <= 0:
        raise ValueError(
            f"mask grid {height}x{width} is empty: the crop is smaller than one patch "
            f"(height and width must be >= 1 patch)")


def _check_ratio(ratio, name="ratio") -> float:
    if not _is_number(ratio) or not (0.0 <= ratio <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {ratio!r}")
    return float(ratio)


def _check_rng(rng) -> None:
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random instance (as upstream's global `random`), "
                        f"got {type(rng).__name__}")


def _check_aspect(aspect) -> tuple:
    try:
        lo, hi = aspect
    except (TypeError, ValueError):
        raise ValueError(f"aspect must be a pair (min, max), got {aspect!r}") from None
    if not (_is_number(lo) and _is_number(hi)) or lo <= 0 or hi <= 0:
        raise ValueError(f"aspect ratios must be positive numbers, got {aspect!r}")
    if lo > hi:
        raise ValueError(f"aspect range {aspect!r} is inverted: min {lo} > max {hi}")
    return float(lo), float(hi)


# --------------------------------------------------------------------------------------------
# block masks
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _column_of_ones(h: int, width: int) -> int:
    """Bit i*width set for i < h: multiplying a row pattern by it stacks h copies of the row."""
    return ((1 << (h * width)) - 1) // ((1 << width) - 1)


def _block_bits(height, width, ratio, rng, log_lo, log_hi, blocks=None) -> int:
    """Core of :func:`block_mask` without argument checks; returns the grid as an int bitboard.

    Appends ``(top, left, h, w)`` of each accepted rectangle to ``blocks`` when given (this
    does not change what is drawn from ``rng``).
    """
    # Same expression order as upstream (`get_pred_ratio() * H * W`): (r*H)*W and r*(H*W)
    # can round differently, and `high` decides both the loop bound and the acceptance test.
    high = ratio * height * width
    low = (min(height, width) // 3) ** 2  # 16 on 14x14, 4 on 6x6 / 7x7, 1 on 3x3
    # CPython defines uniform(a, b) as `a + (b - a) * random()` and randint(a, b) as
    # `a + _randbelow(b - a + 1)`; calling those two primitives directly draws the very same
    # numbers ~1.5x faster for any random.Random that does not override uniform/randint (the
    # test against block_mask_reference, which calls the public methods, guards this).
    rand, randbelow = rng.random, rng._randbelow
    log_span = log_hi - log_lo
    grid = 0
    count = 0
    while count < high:
        budget = high - count  # float, like upstream's max_mask_patches
        delta = 0
        for _ in range(_ATTEMPTS_PER_ROUND):
            # uniform(low, budget) with budget < low is legal and lands between the two: late
            # rounds with budget < low therefore still try blocks smaller than `low`.
            area = low + (budget - low) * rand()
            aspect = math.exp(log_lo + log_span * rand())
            h = round(math.sqrt(area * aspect))  # Python's round: ties to even, returns int
            w = round(math.sqrt(area / aspect))
            if w < width and h < height:  # strict: a block never spans a whole side
                top = randbelow(height - h + 1)  # randint(0, H - h): inclusive bounds
                left = randbelow(width - w + 1)
                rect = ((((1 << w) - 1) << left) * _column_of_ones(h, width)) << (top * width)
                new = h * w - (grid & rect).bit_count()  # h or w == 0 gives new == 0: rejected
                if 0 < new <= budget:
                    grid |= rect
                    delta = new
                    if blocks is not None:
                        blocks.append((top, left, h, w))
                    break  # upstream stops the attempts as soon as one rectangle added cells
        if delta == 0:
            break  # ten misses in a row: give up below the target, as upstream does
        count += delta
    return grid


def _bits_to_numpy(grids: Sequence[int], height: int, width: int) -> np.ndarray:
    """Unpack bitboards into a bool array [len(grids), H, W] with one numpy call."""
    ncells = height * width
    nbytes = (ncells + 7) // 8
    buf = b"".join(g.to_bytes(nbytes, "little") for g in grids)
    packed_NB = np.frombuffer(buf, dtype=np.uint8).reshape(len(grids), nbytes)
    bits_NC = np.unpackbits(packed_NB, axis=1, count=ncells, bitorder="little")
    return bits_NC.reshape(len(grids), height, width).astype(bool)


def block_mask(height: int, width: int, ratio: float, rng: random.Random,
               aspect=DEFAULT_ASPECT, return_blocks: bool = False):
    """One BEiT-style block mask on a ``height x width`` patch grid, as iBOT draws it.

    Rectangles of area ~ U(low, remaining budget) and log-aspect ~ U(log a0, log a1) are
    placed at random corners until the float budget ``ratio * H * W`` is used up or ten
    consecutive candidates add nothing (or would overshoot). See section 5.4.

    Args:
        height, width: patch grid (>= 1 each).
        ratio: target masked fraction in [0, 1].
        rng: ``random.Random``; drawn from in the reference's order.
        aspect: (min, max) aspect ratio h/w of a rectangle.
        return_blocks: also return the accepted rectangles ``[(top, left, h, w), ...]``.

    Returns:
        bool array [H, W] (and the rectangle list if ``return_blocks``).
    """
    _check_grid(height, width)
    ratio = _check_ratio(ratio)
    _check_rng(rng)
    lo, hi = _check_aspect(aspect)
    blocks = [] if return_blocks else None
    grid = _block_bits(height, width, ratio, rng, math.log(lo), math.log(hi), blocks)
    mask_HW = _bits_to_numpy([grid], height, width)[0]
    return (mask_HW, blocks) if return_blocks else mask_HW


def block_mask_reference(height: int, width: int, ratio: float, rng: random.Random,
                         aspect=DEFAULT_ASPECT) -> np.ndarray:
    """Slow, literal restatement of section 5.4 on a numpy grid: the ground truth that
    :func:`block_mask` (and any compiled version) is tested and benchmarked against."""
    _check_grid(height, width)
    lo, hi = _check_aspect(aspect)
    log_lo, log_hi = math.log(lo), math.log(hi)
    mask = np.zeros((height, width), dtype=bool)
    high = ratio * height * width
    low = (min(height, width) // 3) ** 2
    count = 0
    while count < high:
        budget = high - count
        delta = 0
        for _ in range(_ATTEMPTS_PER_ROUND):
            area = rng.uniform(low, budget)
            aspect_ratio = math.exp(rng.uniform(log_lo, log_hi))
            h = int(round(math.sqrt(area * aspect_ratio)))
            w = int(round(math.sqrt(area / aspect_ratio)))
            if w < width and h < height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                rect = mask[top:top + h, left:left + w]
                new = h * w - int(rect.sum())
                if 0 < new <= budget:
                    rect[...] = True
                    delta += new
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


# --------------------------------------------------------------------------------------------
# random masks
# --------------------------------------------------------------------------------------------

def _random_flat_indices(height, width, ratio, rng) -> list:
    # int(r*H*W) cells like upstream's `int(high)`; rng.sample draws them without replacement
    # from the same random.Random as the ratio (upstream uses np.random.shuffle; see docstring).
    return rng.sample(range(height * width), int(ratio * height * width))


def random_mask(height: int, width: int, ratio: float, rng: random.Random) -> np.ndarray:
    """Exactly ``int(ratio * H * W)`` cells, uniformly at random (``rng.sample``)."""
    _check_grid(height, width)
    ratio = _check_ratio(ratio)
    _check_rng(rng)
    mask = np.zeros(height * width, dtype=bool)
    mask[_random_flat_indices(height, width, ratio, rng)] = True
    return mask.reshape(height, width)


# --------------------------------------------------------------------------------------------
# batched public API
# --------------------------------------------------------------------------------------------

def _per_mask_ratios(n, ratio) -> list:
    if not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if _is_number(ratio):
        return [_check_ratio(ratio)] * n
    try:
        ratios = [float(r) if _is_number(r) else r for r in ratio]
    except TypeError:
        raise ValueError(f"ratio must be a number or a sequence of n numbers, got {ratio!r}") from None
    if len(ratios) != n:
        raise ValueError(f"ratio has {len(ratios)} entries but n={n} masks were requested")
    return [_check_ratio(r, f"ratio[{i}]") for i, r in enumerate(ratios)]


def block_masks(n: int, height: int, width: int, ratio: Ratio, seed=None,
                aspect=DEFAULT_ASPECT) -> torch.Tensor:
    """``n`` block masks as a ``torch.bool`` tensor [n, H, W].

    ``ratio`` is one float for all masks or a sequence of ``n`` floats. The masks are drawn in
    order from one ``random.Random(seed)``; ``seed=None`` seeds it from the OS (nondeterministic).
    """
    _check_grid(height, width)
    ratios = _per_mask_ratios(n, ratio)
    lo, hi = _check_aspect(aspect)
    log_lo, log_hi = math.log(lo), math.log(hi)
    rng = random.Random(seed)
    grids = [_block_bits(height, width, r, rng, log_lo, log_hi) for r in ratios]
    return torch.from_numpy(_bits_to_numpy(grids, height, width))


def random_masks(n: int, height: int, width: int, ratio: Ratio, seed=None) -> torch.Tensor:
    """``n`` random masks (exactly ``int(r*H*W)`` cells each) as ``torch.bool`` [n, H, W]."""
    _check_grid(height, width)
    ratios = _per_mask_ratios(n, ratio)
    rng = random.Random(seed)
    masks_NC = np.zeros((n, height * width), dtype=bool)
    for i, r in enumerate(ratios):
        masks_NC[i, _random_flat_indices(height, width, r, rng)] = True
    return torch.from_numpy(masks_NC.reshape(n, height, width))


# --------------------------------------------------------------------------------------------
# the per-crop generator (ImageFolderMask's masking half)
# --------------------------------------------------------------------------------------------

def _normalise(value, name):
    """Upstream's normalisation: a one-element list becomes a scalar (tuples count as lists)."""
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ValueError(f"{name} is an empty list; give one value or one per ratio")
        if not all(_is_number(v) for v in value):
            raise ValueError(f"{name} must contain numbers, got {value!r}")
        value = [float(v) for v in value]
        return value[0] if len(value) == 1 else value
    if not _is_number(value):
        raise ValueError(f"{name} must be a number or a list of numbers, got {value!r}")
    return float(value)


class MaskGenerator:
    """Draws one mask per crop: a ratio (``--pred_ratio`` / ``--pred_ratio_var``), then a
    ``'block'`` or ``'rand'`` mask. Arguments are named after upstream's CLI flags.

    ``pred_ratio`` / ``pred_ratio_var`` may be scalars or equal-length lists; a scalar variance
    with a list of ratios is broadcast. With lists, every crop draws one candidate per
    (mean, var) pair and picks one at random; ``[0, 0.3] / [0, 0.2]`` therefore leaves half the
    crops unmasked.

    Upstream only gates on ``pred_start_epoch`` after its first ``set_epoch`` call (which
    ``train_ibot`` makes before every epoch); here the epoch starts at 0, so a fresh generator
    already respects ``pred_start_epoch``.
    """

    def __init__(self, pred_ratio, pred_ratio_var, pred_aspect_ratio=DEFAULT_ASPECT,
                 pred_shape: str = "block", pred_start_epoch: int = 0):
        ratio = _normalise(pred_ratio, "pred_ratio")
        var = _normalise(pred_ratio_var, "pred_ratio_var")
        if isinstance(ratio, list) and not isinstance(var, list):
            var = [var] * len(ratio)
        if isinstance(var, list) and not isinstance(ratio, list):
            raise ValueError(
                f"pred_ratio_var has {len(var)} values {var} but pred_ratio is the single value "
                f"{ratio}; give one pred_ratio per pred_ratio_var")
        if isinstance(ratio, list) and len(ratio) != len(var):
            raise ValueError(
                f"pred_ratio has {len(ratio)} values {ratio} but pred_ratio_var has {len(var)} "
                f"values {var}; the lists must have the same length")

        pairs = list(zip(ratio, var)) if isinstance(ratio, list) else [(ratio, var)]
        for mean, v in pairs:
            if not 0.0 <= mean < 1.0:
                raise ValueError(f"pred_ratio {mean} is outside [0, 1)")
            if v < 0:
                raise ValueError(f"pred_ratio_var {v} is negative")
            if v > mean:  # upstream asserts mean >= var: the ratio could otherwise go negative
                raise ValueError(f"pred_ratio_var {v} exceeds its pred_ratio {mean} (need var <= ratio)")
            if mean + v > 1.0:
                raise ValueError(f"pred_ratio {mean} + pred_ratio_var {v} exceeds 1 (more cells than the grid)")

        if pred_shape not in ("block", "rand"):
            raise ValueError(f"pred_shape must be 'block' or 'rand', got {pred_shape!r}")
        lo, hi = _check_aspect(pred_aspect_ratio)
        if not isinstance(pred_start_epoch, numbers.Integral) or pred_start_epoch < 0:
            raise ValueError(f"pred_start_epoch must be a non-negative integer, got {pred_start_epoch!r}")

        self.pred_ratio = ratio
        self.pred_ratio_var = var
        self.pred_aspect_ratio = (lo, hi)
        self.pred_shape = pred_shape
        self.pred_start_epoch = int(pred_start_epoch)
        self.epoch = 0
        self._pairs = pairs
        self._log_aspect = (math.log(lo), math.log(hi))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MaskGenerator":
        if name not in PRESETS:
            raise ValueError(f"unknown masking preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def sample_ratio(self, rng: random.Random) -> float:
        """One crop's target ratio, drawing from ``rng`` exactly as upstream's ``get_pred_ratio``."""
        if self.epoch < self.pred_start_epoch:
            return 0.0
        if isinstance(self.pred_ratio, list):
            # A zero variance uses the mean *without* a draw: skipping or adding a draw here
            # would shift every later mask of the stream.
            candidates = [rng.uniform(m - v, m + v) if v > 0 else m for m, v in self._pairs]
            return rng.choice(candidates)
        m, v = self._pairs[0]
        return rng.uniform(m - v, m + v) if v > 0 else m

    def __call__(self, height: int, width: int, rng: random.Random) -> np.ndarray:
        """The mask of one crop whose patch grid is ``height x width``: bool array [H, W]."""
        _check_grid(height, width)
        _check_rng(rng)
        ratio = self.sample_ratio(rng)
        if self.pred_shape == "block":
            grid = _block_bits(height, width, ratio, rng, *self._log_aspect)
            return _bits_to_numpy([grid], height, width)[0]
        mask = np.zeros(height * width, dtype=bool)
        mask[_random_flat_indices(height, width, ratio, rng)] = True
        return mask.reshape(height, width)

    def max_masked(self, height: int, width: int) -> int:
        """Static upper bound on the masked cells of one crop: floor(max(mean + var) * H * W).

        Lets a fast path size its buffers for the masked tokens up front.
        """
        _check_grid(height, width)
        max_ratio = max(m + v for m, v in self._pairs)
        # rng.uniform(a, b) may land one ulp above b; the 1e-9 slack keeps the floor a true
        # upper bound when max_ratio*H*W sits just below an integer (it never lowers it).
        return min(height * width, math.floor(max_ratio * height * width + 1e-9))

    def __repr__(self) -> str:
        return (f"MaskGenerator(pred_ratio={self.pred_ratio!r}, pred_ratio_var={self.pred_ratio_var!r}, "
                f"pred_aspect_ratio={self.pred_aspect_ratio!r}, pred_shape={self.pred_shape!r}, "
                f"pred_start_epoch={self.pred_start_epoch}, epoch={self.epoch})")
