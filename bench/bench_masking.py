"""Benchmark: iBOT block masks in Python (ibot_fast.masking).

    python -m pytest bench/bench_masking.py --benchmark-only -q

Times one batch of 256 block masks on the 14x14 grid of a 224-px crop (ViT/16), for
* ``fast``:    ``block_masks`` (int bitboard, what the data loader uses);
* ``literal``: ``block_mask_reference``, the line-by-line numpy restatement of the reference
  (upstream's own loop costs about the same: 76 / 139 / 182 us per mask at r = 0.1 / 0.3 / 0.5,
  reference-semantics.md 5.4),
at the README ViT-S/16 ratios (half the crops r = 0, the rest r ~ U(0.1, 0.5)) and at fixed
ratios. Benchmarks of one group draw the same masks, so a compiled version added to the group
later compares like for like. ``extra_info`` reports masks/s and us/mask, plus the per-image
cost of the README multi-crop (2 x 14x14 + 10 x 6x6 masks) for the data-loader budget.
"""

import random

import numpy as np
import pytest
import torch

from ibot_fast.masking import MaskGenerator, block_mask_reference, block_masks

N_MASKS = 256
GRID = 14  # 224 px / 16 px patches
SEED = 0


def _recipe_ratios(n):
    gen = MaskGenerator.from_preset("vit_small_readme")
    rng = random.Random(SEED)
    return [gen.sample_ratio(rng) for _ in range(n)]


RATIOS = {"recipe": _recipe_ratios(N_MASKS), "0.1": 0.1, "0.3": 0.3, "0.5": 0.5}


def _literal_block_masks(n, height, width, ratio, seed):
    ratios = ratio if isinstance(ratio, list) else [ratio] * n
    rng = random.Random(seed)
    return torch.from_numpy(np.stack([block_mask_reference(height, width, r, rng) for r in ratios]))


IMPLS = {"fast": block_masks, "literal": _literal_block_masks}


def _report(benchmark, masks_NHW):
    mean_s = benchmark.stats.stats.mean
    n = masks_NHW.shape[0]
    benchmark.extra_info["masks_per_s"] = round(n / mean_s)
    benchmark.extra_info["us_per_mask"] = round(mean_s / n * 1e6, 2)
    benchmark.extra_info["mean_masked_tokens"] = round(masks_NHW.sum().item() / n, 2)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("ratio_name", list(RATIOS))
def test_block_masks_batch(benchmark, impl, ratio_name):
    ratio = RATIOS[ratio_name]
    benchmark.group = f"block masks {N_MASKS}x{GRID}x{GRID} r={ratio_name}"
    masks_NHW = benchmark(IMPLS[impl], N_MASKS, GRID, GRID, ratio, SEED)
    # Both implementations draw identical masks from the same seed; check once, outside timing.
    assert torch.equal(masks_NHW, block_masks(N_MASKS, GRID, GRID, ratio, seed=SEED))
    _report(benchmark, masks_NHW)


def test_generator_readme_multicrop(benchmark):
    """Per-image masking cost in the data loader: ratio draws + 2 global and 10 local masks."""
    gen = MaskGenerator.from_preset("vit_small_readme")
    grids = [(14, 14)] * 2 + [(6, 6)] * 10
    n_images = 64
    benchmark.group = "generator README multi-crop"

    def run():
        rng = random.Random(SEED)
        return [[gen(h, w, rng) for h, w in grids] for _ in range(n_images)]

    benchmark(run)
    mean_s = benchmark.stats.stats.mean
    benchmark.extra_info["images_per_s"] = round(n_images / mean_s)
    benchmark.extra_info["us_per_image"] = round(mean_s / n_images * 1e6, 1)
    benchmark.extra_info["masks_per_s"] = round(n_images * len(grids) / mean_s)
