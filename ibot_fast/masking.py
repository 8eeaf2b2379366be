"""Masked-image-modelling masks, exactly as iBOT's ``ImageFolderMask`` draws them.

The reference (bytedance/ibot ``loader.py``, ``ImageFolderMask.__getitem__``) has no separate
mask generator: it samples one prediction ratio per crop and then builds either a BEiT-style
*block* mask or a uniformly *random* mask on the crop's patch grid (14x14 for a 224-px crop
with 16-px patches, 6x6 for a 96-px local crop). This module restates that logic as plain
functions plus a small configurable :class:`MaskGenerator`. See
``docs/reference-semantics.md#masks`` for the behaviour being reproduced.

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
  forking, see docs/reference-semantics.md#random-masks), so bit parity is *not* a goal there; we draw the cells with
  ``rng.sample`` so that one ``random.Random`` drives every choice of a crop.

Speed
-----
:func:`block_mask` keeps the grid as one Python integer (bit ``i * W + j`` = cell ``(i, j)``):
counting the already-masked cells of a candidate rectangle is one AND and one ``bit_count``
instead of a numpy slice sum, and marking it is one OR. :func:`block_mask_reference` is the
line-by-line numpy restatement of docs/reference-semantics.md#block-masks; tests check the two agree bit for bit and the
benchmark times both.

Public batch functions (:func:`block_masks`, :func:`random_masks`)
-------------------------------------------------------------------
``backend="python"`` draws the masks in order from one ``random.Random(seed)``: for a seed they
are the reference generator's, bit for bit. ``backend="cpp"`` (what ``"auto"``, the default,
picks when the extension is built and the grid is at most 64x64) runs the C++ generator below:
the reference's distribution, >= 100x faster per mask on one thread, mask ``i`` keyed on
``(seed, i)``. ``backend="cuda"`` runs it on the GPU.

Presets (``MaskGenerator.from_preset(name)``)
---------------------------------------------
``code_default``      ``--pred_ratio 0.3 --pred_ratio_var 0`` (``main_ibot.py`` defaults)
``vit_small_readme``  ``--pred_ratio 0 0.3 --pred_ratio_var 0 0.2`` (README ViT-S/16 recipe):
                      each crop is unmasked with probability 1/2, otherwise r ~ U(0.1, 0.5);
                      on 14x14 the mean masked fraction is 0.146 and at most 98 cells are set.
``swin_tiny_readme``  as ``vit_small_readme`` plus ``--pred_start_epoch 50`` (README Swin-T/14).

The aspect-ratio range is fixed to ``(0.3, 1/0.3)`` in the reference's ``train_ibot``.

Batches for the fast paths (:class:`MaskBatcher`, :class:`MaskBatch`)
----------------------------------------------------------------------
:meth:`MaskBatcher.generate` makes the masks of the global crops of a whole batch plus the
static-shape selection tensors the fused loss and the fast trainer consume, with one of three
back ends (``--mask_backend``): ``python`` (the functions above, the reference), ``cpp`` (the
``ibot_fast._mask_ext`` extension built from ``csrc/``: C++ with OpenMP over masks) and ``cuda``
(the same extension's kernel, on the GPU from a seed). The C++/CUDA generator runs the algorithm
above with a different random-number generator, so its masks match the Python ones in
distribution, not bit for bit (tests/test_mask_ext.py checks the statistics).

Seeds: the mask of crop ``c`` of sample ``i`` in epoch ``e`` is a pure function of
``(seed, e, i, c)``. ``cpp``/``cuda`` use one Philox4x32-10 block with key
``splitmix64(splitmix64(seed) ^ e)`` and counter ``(0, c, i mod 2^32, i >> 32)`` for the ratio
and the key of a SplitMix64 sequence that draws the rectangles (``csrc/mask_core.h``); ``python``
uses ``random.Random(f"ibot_fast/mask/{seed}/{e}/{i}")`` for the crops of sample ``i`` in order.
``i`` is the dataset index in the torch data path, so masks do not depend on the number of
ranks or workers, different images never share a stream, and a resumed run replays them. A
loader without dataset indices (DALI) must pass ids that are unique within an epoch across
ranks, e.g. ``(step * world_size + rank) * B + arange(B)``. The CPU result does not depend on
the thread count; CPU and CUDA draw the same streams (see ``csrc/mask_cuda.cu`` for how closely
their masks agree).
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import os
import random
from typing import Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "DEFAULT_ASPECT",
    "MASK_BACKENDS",
    "PRESETS",
    "MaskBatch",
    "MaskBatcher",
    "MaskGenerator",
    "MaskRequest",
    "PUBLIC_MASK_BACKENDS",
    "default_mask_backend",
    "extension_available",
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
    consecutive candidates add nothing (or would overshoot). See
    docs/reference-semantics.md#block-masks.

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
    """Slow, literal restatement of docs/reference-semantics.md#block-masks on a numpy grid: the ground truth that
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


PUBLIC_MASK_BACKENDS = ("auto", "python", "cpp", "cuda")


def _public_backend(backend, height, width) -> str:
    """The back end `block_masks` / `random_masks` run: ``auto`` -> ``cpp`` when the extension is
    built and the grid fits it (<= 64 x 64 patches), else ``python``."""
    if backend not in PUBLIC_MASK_BACKENDS:
        raise ValueError(f"backend must be one of {PUBLIC_MASK_BACKENDS}, got {backend!r}")
    fits = height <= 64 and width <= 64
    if backend == "auto":
        return "cpp" if fits and extension_available() else "python"
    if backend == "python":
        return backend
    if not extension_available():
        raise ValueError(f"backend={backend!r} needs the C++ extension ibot_fast._mask_ext, which "
                         f"is not built; use backend='python' (or 'auto'), or rebuild it "
                         f"(bash scripts/setup.sh)")
    if backend == "cuda" and not extension_available(cuda=True):
        raise ValueError("backend='cuda' needs the CUDA build of ibot_fast._mask_ext and a CUDA "
                         "device; use backend='cpp'")
    if not fits:
        raise ValueError(f"mask grid {height}x{width}: the {backend} back end handles grids up to "
                         f"64x64 patches; use backend='python'")
    return backend


def _compiled_masks(backend, n, height, width, ratios, seed, aspect, shape_rand,
                    n_threads) -> torch.Tensor:
    """Mask i = the compiled generator's mask of sample id i, crop 0, epoch 0 under `seed`, at
    ratio ``ratios[i]`` (one call per distinct ratio)."""
    if n_threads is not None and (not isinstance(n_threads, numbers.Integral) or n_threads < 1):
        raise ValueError(f"n_threads must be a positive integer or None, got {n_threads!r}")
    seed = _seed_value(seed)
    lo, hi = _check_aspect(aspect)
    device = torch.device("cuda") if backend == "cuda" else torch.device("cpu")
    threads = n_threads or max(1, min(torch.get_num_threads(), n // 1024))
    by_ratio: dict = {}
    for i, r in enumerate(ratios):
        by_ratio.setdefault(r, []).append(i)
    out = None
    for r, idx in by_ratio.items():
        ids = (torch.arange(n, device=device) if len(by_ratio) == 1
               else torch.tensor(idx, dtype=torch.int64, device=device))
        masks_CBHW = _extension().mask_batch(
            ids, seed, 0, 1, height, width, [r], [0.0], math.log(lo), math.log(hi), shape_rand,
            True, height * width, threads, False)[0]
        if len(by_ratio) == 1:
            return masks_CBHW[0]
        if out is None:
            out = torch.zeros((n, height, width), dtype=torch.bool, device=device)
        out[ids] = masks_CBHW[0]
    return torch.zeros((0, height, width), dtype=torch.bool, device=device) if out is None else out


_BACKEND_DOC = """
    ``backend``: ``"python"`` draws the masks in order from one ``random.Random(seed)``, as the
    reference's generator does, so a seed reproduces the reference's masks bit for bit (see
    :func:`block_mask`); ``"cpp"`` runs the C++ extension (>= 100x faster per mask on one
    thread), whose masks follow the reference's *distribution* (same algorithm, other random
    numbers: Philox / SplitMix64 keyed on the seed and the mask's index, so mask i depends only
    on (seed, i, its ratio)); ``"cuda"`` is the same generator on the GPU (output on the current
    CUDA device); ``"auto"`` (default) is ``"cpp"`` when the extension is built and the grid is
    at most 64x64, else ``"python"``. The compiled back ends need an integer seed in
    [0, 2**64) (or None); ``n_threads`` sets their OpenMP threads (default: one per 1024 masks,
    at most ``torch.get_num_threads()``).
"""


def block_masks(n: int, height: int, width: int, ratio: Ratio, seed=None,
                aspect=DEFAULT_ASPECT, backend: str = "auto",
                n_threads: Optional[int] = None) -> torch.Tensor:
    """``n`` block masks as a ``torch.bool`` tensor [n, H, W].

    ``ratio`` is one float for all masks or a sequence of ``n`` floats; ``seed=None`` seeds from
    the OS (nondeterministic).
    """
    _check_grid(height, width)
    ratios = _per_mask_ratios(n, ratio)
    lo, hi = _check_aspect(aspect)
    backend = _public_backend(backend, height, width)
    if backend != "python":
        return _compiled_masks(backend, n, height, width, ratios, seed, (lo, hi), False,
                               n_threads)
    log_lo, log_hi = math.log(lo), math.log(hi)
    rng = random.Random(seed)
    grids = [_block_bits(height, width, r, rng, log_lo, log_hi) for r in ratios]
    return torch.from_numpy(_bits_to_numpy(grids, height, width))


def random_masks(n: int, height: int, width: int, ratio: Ratio, seed=None,
                 backend: str = "auto", n_threads: Optional[int] = None) -> torch.Tensor:
    """``n`` random masks (exactly ``int(r*H*W)`` cells each) as ``torch.bool`` [n, H, W].

    ``python`` draws the cells with ``rng.sample`` from one ``random.Random(seed)`` (see
    :func:`random_mask`); the compiled back ends with Floyd's sampling, keyed as for
    :func:`block_masks`.
    """
    _check_grid(height, width)
    ratios = _per_mask_ratios(n, ratio)
    backend = _public_backend(backend, height, width)
    if backend != "python":
        return _compiled_masks(backend, n, height, width, ratios, seed, DEFAULT_ASPECT, True,
                               n_threads)
    rng = random.Random(seed)
    masks_NC = np.zeros((n, height * width), dtype=bool)
    for i, r in enumerate(ratios):
        masks_NC[i, _random_flat_indices(height, width, r, rng)] = True
    return torch.from_numpy(masks_NC.reshape(n, height, width))


block_masks.__doc__ += _BACKEND_DOC
random_masks.__doc__ += _BACKEND_DOC


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

    def sample_ratio(self, rng: random.Random, epoch: int | None = None) -> float:
        """One crop's target ratio, drawing from ``rng`` exactly as upstream's ``get_pred_ratio``.

        ``epoch`` overrides ``self.epoch`` (the batch API passes it explicitly, so a generator
        shared by several producers has no mutable state to race on)."""
        if (self.epoch if epoch is None else epoch) < self.pred_start_epoch:
            return 0.0
        if isinstance(self.pred_ratio, list):
            # A zero variance uses the mean *without* a draw: skipping or adding a draw here
            # would shift every later mask of the stream.
            candidates = [rng.uniform(m - v, m + v) if v > 0 else m for m, v in self._pairs]
            return rng.choice(candidates)
        m, v = self._pairs[0]
        return rng.uniform(m - v, m + v) if v > 0 else m

    def __call__(self, height: int, width: int, rng: random.Random,
                 epoch: int | None = None) -> np.ndarray:
        """The mask of one crop whose patch grid is ``height x width``: bool array [H, W]."""
        _check_grid(height, width)
        _check_rng(rng)
        ratio = self.sample_ratio(rng, epoch)
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


# --------------------------------------------------------------------------------------------
# the C++/CUDA extension and the batch API
# --------------------------------------------------------------------------------------------

logger = logging.getLogger(__name__)

MASK_BACKENDS = ("python", "cpp", "cuda")


@functools.lru_cache(maxsize=None)
def _extension():
    """The compiled ``ibot_fast._mask_ext`` module, or ``None`` (logged once, with the reason)."""
    if os.environ.get("IBOT_FAST_NO_EXT") == "1":
        logger.warning("IBOT_FAST_NO_EXT=1: C++/CUDA mask generator disabled; using Python masks")
        return None
    try:
        from ibot_fast import _mask_ext
    except ImportError as err:
        logger.warning(
            "the C++ mask extension ibot_fast._mask_ext is not built (%s); masks fall back to "
            "the Python generator. Re-run `bash scripts/setup.sh` (or `pip install "
            "--no-build-isolation -e .`) with a C++ compiler to build it.", err)
        return None
    return _mask_ext


def extension_available(cuda: bool = False) -> bool:
    """Whether the compiled mask generator can run (``cuda=True``: its GPU kernel)."""
    ext = _extension()
    if ext is None:
        return False
    return (not cuda) or (ext.built_with_cuda() and torch.cuda.is_available())


def default_mask_backend() -> str:
    """``'cpp'`` when the extension is built, else ``'python'`` (with a logged warning)."""
    return "cpp" if extension_available() else "python"


def _seed_value(seed) -> int:
    if seed is None:
        # One OS seed per batcher: masks still differ per (epoch, sample, crop) within a run.
        return random.SystemRandom().getrandbits(63)
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64) or None, got {seed!r}")
    return int(seed)


def patch_token_weights(masks_CBN: torch.Tensor) -> torch.Tensor:
    """Per-token patch-loss weights of bool masks ``[C, B, N]``, flattened crop-major (token
    ``(c*B + b)*N + n``): ``1 / (masked count of image b in crop c) / (B*C)`` for a masked
    token, 0 otherwise. Weighting rows this way and summing reproduces the reference's
    per-image mean over masked tokens, then the mean over all B images (an image with no
    masked token counts as 0), then over the C global crops. fp32, computed in fp64."""
    C, B, _ = masks_CBN.shape
    counts_CB1 = masks_CBN.sum(-1, keepdim=True, dtype=torch.float64)
    w_CB1 = torch.where(counts_CB1 > 0, 1.0 / (counts_CB1 * (B * C)),
                        torch.zeros((), dtype=torch.float64, device=masks_CBN.device))
    return (masks_CBN * w_CB1).float().reshape(-1)


class MaskBatch(list):
    """Masks of the global crops of one batch, plus the static-shape masked-token selection.

    The list items are the per-crop bool masks ``[B, H, W]`` (views of ``masks_CBHW``), so a
    ``MaskBatch`` is a drop-in for the list of masks the reference's loss and our trainer take
    (``masks[v]``, ``masks[:ng]``, iteration). The extra attributes, with C = number of global
    crops, N = H*W tokens per crop, K = ``max_masked`` (static bound per image) and M = C*B*K:

    ``masks_CBHW``  bool [C, B, H, W]; crop-major like the student input ``cat(crops)``.
    ``idx_M``       int64 [M]: flat indices of the masked tokens into the crop-major patch tokens
                    of all global crops, i.e. row ``(c*B + b)*N + i*W + j`` of a ``[C*B*N, D]``
                    view of ``[C*B, N, D]`` (patch tokens only, no [CLS]). Rows ``< n_valid``
                    are the masked tokens in ascending order (crop, then image, then token);
                    rows ``>= n_valid`` are padding with index 0 (always a legal gather index).
    ``valid_M``     bool [M]: ``True`` exactly for the first ``n_valid`` rows.
    ``weight_M``    float32 [M] (:meth:`weights` for fp64): ``1 / (count_cb * B * C)`` for a
                    masked token of image (c, b) with ``count_cb`` masked tokens, 0 for
                    padding. Then ``sum_r weight_M[r] * ce[idx_M[r]]`` is exactly the
                    reference's patch loss before ``lambda2``: per image the mean over its
                    masked tokens, averaged over all B images (an image without masked tokens
                    contributes 0 but counts in B) and over the C views. The weights of an
                    image sum to 1/(B*C).
    ``counts_CB``   int32 [C, B]: masked tokens per image.
    ``n_valid``     int64 0-dim tensor on the same device (no host sync to read it lazily).
    ``n_valid_host`` the same count as a Python int when the batch was built on the CPU (the
                    loader's back ends), ``None`` otherwise; kept through ``.to()`` and pickling,
                    so an eager step can cut the padding off without a device sync.
    ``max_masked``  int K = floor(max(pred_ratio + pred_ratio_var) * H * W), from the
                    configuration (:meth:`MaskGenerator.max_masked`), so M never changes.

    ``.to(device, non_blocking=...)`` and ``.pin_memory()`` move all of it (the DataLoader's
    pinning thread calls the latter).
    """

    _FIELDS = ("masks_CBHW", "idx_M", "valid_M", "weight_M", "counts_CB", "n_valid")

    def __init__(self, masks_CBHW, idx_M, valid_M, weight_M, counts_CB, n_valid, max_masked,
                 n_valid_host=None):
        super().__init__(masks_CBHW.unbind(0))
        self.masks_CBHW, self.idx_M, self.valid_M = masks_CBHW, idx_M, valid_M
        self.weight_M, self.counts_CB, self.n_valid = weight_M, counts_CB, n_valid
        self.max_masked = int(max_masked)
        if n_valid_host is None and n_valid.device.type == "cpu":
            n_valid_host = int(n_valid)  # a CPU tensor: reading it waits for nothing
        self.n_valid_host = n_valid_host

    @classmethod
    def from_masks(cls, masks_CBHW: torch.Tensor, max_masked: int) -> "MaskBatch":
        """The selection tensors of given masks, in eager torch: the reference the compiled
        selection is tested against, and what the Python back end returns."""
        if masks_CBHW.dim() != 4 or masks_CBHW.dtype != torch.bool:
            raise ValueError(f"masks_CBHW must be a bool [C, B, H, W] tensor, got "
                             f"{masks_CBHW.dtype} {tuple(masks_CBHW.shape)}")
        C, B, H, W = masks_CBHW.shape
        N = H * W
        counts_CB = masks_CBHW.reshape(C, B, N).sum(-1, dtype=torch.int32)
        if counts_CB.numel() and int(counts_CB.max()) > max_masked:
            raise ValueError(f"a mask has {int(counts_CB.max())} masked tokens, above "
                             f"max_masked={max_masked}")
        M = C * B * max_masked
        sel = masks_CBHW.reshape(-1).nonzero().squeeze(1)  # ascending flat token index
        n = sel.numel()
        w_T = patch_token_weights(masks_CBHW.reshape(C, B, N))
        dev = masks_CBHW.device
        idx_M = torch.zeros(M, dtype=torch.int64, device=dev)
        valid_M = torch.zeros(M, dtype=torch.bool, device=dev)
        weight_M = torch.zeros(M, dtype=torch.float32, device=dev)
        idx_M[:n] = sel
        valid_M[:n] = True
        weight_M[:n] = w_T[sel]
        return cls(masks_CBHW, idx_M, valid_M, weight_M, counts_CB,
                   torch.tensor(n, dtype=torch.int64, device=dev), max_masked, n)

    def weights(self, dtype: torch.dtype) -> torch.Tensor:
        """``weight_M`` in ``dtype``. fp32 (and narrower): the stored tensor. fp64: recomputed
        from the counts, because ``1 / (count * B * C)`` is rarely exact in fp32 (a count of 3
        gives 1/3) and widening the fp32 value would put a ~1e-8 relative error into an fp64
        patch loss that is meant to equal the reference's."""
        if torch.finfo(dtype).bits <= 32:
            return self.weight_M
        C, B, H, W = self.masks_CBHW.shape
        counts_R = self.counts_CB.reshape(-1)[self.idx_M // (H * W)].to(dtype)  # [M]
        w = 1.0 / (counts_R.clamp(min=1) * (B * C))
        return torch.where(self.valid_M, w, torch.zeros((), dtype=dtype, device=w.device))

    def _map(self, fn) -> "MaskBatch":
        return MaskBatch(*(fn(getattr(self, f)) for f in self._FIELDS), self.max_masked,
                         self.n_valid_host)

    def to(self, *args, **kwargs) -> "MaskBatch":
        return self._map(lambda t: t.to(*args, **kwargs))

    def pin_memory(self, device=None) -> "MaskBatch":
        return self._map(lambda t: t.pin_memory())

    def __reduce__(self):  # pickle the tensors once, not also the per-crop views
        return (_rebuild_mask_batch, (tuple(getattr(self, f) for f in self._FIELDS),
                                      self.max_masked, self.n_valid_host))

    def __repr__(self) -> str:
        C, B, H, W = self.masks_CBHW.shape
        return (f"MaskBatch(C={C}, B={B}, grid={H}x{W}, max_masked={self.max_masked}, "
                f"M={self.idx_M.numel()}, device={self.masks_CBHW.device})")


def _rebuild_mask_batch(fields, max_masked, n_valid_host=None):
    return MaskBatch(*fields, max_masked, n_valid_host)


class MaskRequest:
    """What a DataLoader worker hands over for ``--mask_backend cuda``: the batch's sample ids
    and epoch, turned into a :class:`MaskBatch` on the GPU by ``.to(device)`` in the training
    process (CUDA cannot be used inside forked workers). Costs the training thread two kernel
    launches and no host sync."""

    def __init__(self, batcher: "MaskBatcher", sample_ids, epoch, height, width, n_crops):
        self.batcher, self.sample_ids, self.epoch = batcher, sample_ids, epoch
        self.height, self.width, self.n_crops = height, width, n_crops

    def to(self, device, non_blocking: bool = False) -> MaskBatch:
        ids = self.sample_ids.to(device, non_blocking=non_blocking)
        return self.batcher.generate(ids, self.epoch, self.height, self.width, self.n_crops)

    def pin_memory(self, device=None) -> "MaskRequest":
        return self

    def __iter__(self):
        raise TypeError("a MaskRequest holds no masks yet: call .to(cuda_device) first "
                        "(--mask_backend cuda generates them on the GPU)")


class MaskBatcher:
    """Batch API of the mask generator: one :class:`MaskBatch` per batch of global crops.

    Args:
        generator: the :class:`MaskGenerator` holding the ratio / shape / epoch-gate settings
            (its ``epoch`` attribute is not used: :meth:`generate` takes the epoch).
        backend: ``'python'``, ``'cpp'``, ``'cuda'`` or ``None`` (:func:`default_mask_backend`).
        seed: base seed (int in [0, 2**64)); ``None`` draws one from the OS. See the module
            docstring for how (seed, epoch, sample id, crop) select a stream.
        n_threads: OpenMP threads of the ``cpp`` back end; ``None``: one per 1024 masks, at
            most ``torch.get_num_threads()`` (1 inside DataLoader workers). A recipe batch (256
            masks) takes ~0.1-0.2 ms on one thread, less than what a parallel region can lose
            on a busy machine (measured: ms-long stalls with 2 threads on 2 shared cores).
    """

    def __init__(self, generator: MaskGenerator, backend: Optional[str] = None, seed=None,
                 n_threads: Optional[int] = None):
        if not isinstance(generator, MaskGenerator):
            raise ValueError(f"generator must be a MaskGenerator, got {type(generator).__name__}")
        backend = default_mask_backend() if backend is None else backend
        if backend not in MASK_BACKENDS:
            raise ValueError(f"mask backend must be one of {MASK_BACKENDS}, got {backend!r}")
        if backend in ("cpp", "cuda") and not extension_available():
            raise ValueError(f"mask backend {backend!r} needs the C++ extension "
                             f"ibot_fast._mask_ext, which is not built; use 'python' or "
                             f"rebuild (bash scripts/setup.sh)")
        if backend == "cuda" and not _extension().built_with_cuda():
            raise ValueError("mask backend 'cuda': ibot_fast._mask_ext was built without CUDA "
                             "(torch had no CUDA at build time); use 'cpp'")
        if n_threads is not None and (not isinstance(n_threads, numbers.Integral) or n_threads < 1):
            raise ValueError(f"n_threads must be a positive integer or None, got {n_threads!r}")
        if len(generator._pairs) > 8 and backend != "python":
            raise ValueError(f"the {backend} back end takes at most 8 pred_ratio values, got "
                             f"{len(generator._pairs)}")
        self.generator = generator
        self.backend = backend
        self.seed = _seed_value(seed)
        self.n_threads = n_threads
        self._plans = {}

    def max_masked(self, height: int, width: int) -> int:
        """K, the static per-image bound that sizes the selection tensors."""
        return self.generator.max_masked(height, width)

    def _plan(self, height, width, n_crops) -> tuple:
        """Validated per-(grid, n_crops) arguments of the compiled generator, built once: a
        batch then costs the training thread a dict lookup, not a re-validation (the whole
        Python side of :meth:`generate` is ~10 us; the C++ call ~60-120 us per 256 masks)."""
        key = (height, width, n_crops)
        plan = self._plans.get(key)
        if plan is None:
            _check_grid(height, width)
            if self.backend != "python" and (height > 64 or width > 64):
                raise ValueError(f"mask grid {height}x{width}: the {self.backend} back end "
                                 f"handles grids up to 64x64 patches; use --mask_backend python")
            if not isinstance(n_crops, numbers.Integral) or n_crops < 1:
                raise ValueError(f"n_crops must be a positive integer, got {n_crops!r}")
            gen = self.generator
            plan = (self.max_masked(height, width), [m for m, _ in gen._pairs],
                    [v for _, v in gen._pairs], *gen._log_aspect, gen.pred_shape == "rand")
            self._plans[key] = plan
        return plan

    def _check(self, sample_ids, epoch, height, width, n_crops) -> torch.Tensor:
        self._plan(height, width, n_crops)
        if not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        if (isinstance(sample_ids, torch.Tensor) and sample_ids.dtype == torch.int64
                and sample_ids.dim() == 1):
            ids = sample_ids  # the common case (collate, DALI loader): no conversion
        else:
            ids = torch.as_tensor(sample_ids)
            if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32, torch.int16,
                                                   torch.uint8):
                raise ValueError(f"sample_ids must be a 1-D integer sequence, got "
                                 f"{ids.dtype} {tuple(ids.shape)}")
            ids = ids.long()
        # The compiled back ends check the sign in C++ (same ValueError, no extra tensor op);
        # on a CUDA device nobody does, as that would cost a host sync.
        if self.backend == "python" and ids.numel() and int(ids.min()) < 0:
            raise ValueError(f"sample_ids must be >= 0, got {int(ids.min())}")
        return ids

    def request(self, sample_ids, epoch: int, height: int, width: int,
                n_crops: int = 2) -> MaskRequest:
        """Deferred :meth:`generate` (for the ``cuda`` back end inside DataLoader workers)."""
        ids = self._check(sample_ids, epoch, height, width, n_crops)
        return MaskRequest(self, ids, int(epoch), height, width, n_crops)

    def generate(self, sample_ids, epoch: int, height: int, width: int, n_crops: int = 2,
                 selection: bool = True) -> MaskBatch:
        """Masks of ``n_crops`` crops of every sample, on an ``height x width`` patch grid.

        ``sample_ids``: 1-D integers (list or tensor), one per image of the batch: the dataset
        indices in the torch data path. For ``cuda`` they must be a CUDA tensor (outputs live on
        its device); ``cpp``/``python`` produce CPU tensors. ``selection=False`` skips the
        selection tensors (they are then empty; masks and counts only).
        """
        ids = self._check(sample_ids, epoch, height, width, n_crops)
        K, means, variances, log_lo, log_hi, shape_rand = self._plan(height, width, n_crops)
        gen = self.generator
        if self.backend == "python":
            if ids.device.type != "cpu":
                raise ValueError("the python mask back end takes CPU sample_ids")
            masks = np.zeros((n_crops, ids.numel(), height, width), dtype=bool)
            for b, i in enumerate(ids.tolist()):
                rng = random.Random(f"ibot_fast/mask/{self.seed}/{epoch}/{i}")
                for c in range(n_crops):
                    masks[c, b] = gen(height, width, rng, epoch=epoch)
            masks_CBHW = torch.from_numpy(masks)
            if selection:
                return MaskBatch.from_masks(masks_CBHW, K)
            empty = torch.zeros(0)
            return MaskBatch(masks_CBHW, empty.long(), empty.bool(), empty.float(),
                             masks_CBHW.flatten(2).sum(-1, dtype=torch.int32),
                             torch.zeros((), dtype=torch.int64), K)

        if (self.backend == "cuda") != (ids.device.type == "cuda"):
            raise ValueError(f"mask backend {self.backend!r} needs sample_ids on "
                             f"{'a CUDA device' if self.backend == 'cuda' else 'the CPU'}, got "
                             f"{ids.device}")
        n_threads = self.n_threads or max(1, min(torch.get_num_threads(),
                                                 ids.numel() * n_crops // 1024))
        out = _extension().mask_batch(
            ids, self.seed, int(epoch), int(n_crops), int(height), int(width), means, variances,
            log_lo, log_hi, shape_rand, epoch >= gen.pred_start_epoch, K, n_threads,
            bool(selection))
        return MaskBatch(*out, K)

    def __repr__(self) -> str:
        return f"MaskBatcher(backend={self.backend!r}, seed={self.seed}, {self.generator!r})"
