"""Benchmark: iBOT block masks, Python (ibot_fast.masking) vs the C++/CUDA extension.

    python -m pytest bench/bench_masking.py --benchmark-only -q

Times one batch of 256 block masks on the 14x14 grid of a 224-px crop (ViT/16), for
* ``fast``:    ``block_masks`` (int bitboard, what the Python data path uses);
* ``literal``: ``block_mask_reference``, the line-by-line numpy restatement of the reference
  (upstream's own loop costs about the same: 76 / 139 / 182 us per mask at r = 0.1 / 0.3 / 0.5,
  docs/reference-semantics.md#measured-statistics);
* ``cpp1`` / ``cppN``: the C++ extension (``MaskBatcher(..., "cpp")``, masks only) on one
  OpenMP thread / on all of ``os.cpu_count()`` threads;
at the README ViT-S/16 ratios (half the crops r = 0, the rest r ~ U(0.1, 0.5)) and at fixed
ratios. The Python implementations of one group draw the same masks; the C++ ones draw other
masks of the same distribution (their own random numbers; for ``recipe`` they also draw the
ratios themselves, from the same preset).

``recipe batch B=128``: what one training step of the README recipe needs, 2 global crops x 128
images, masks plus the padded masked-token selection (``MaskBatch``): Python generator +
eager selection (``python``), against ``MaskBatcher.generate`` with ``cpp1`` / ``cppN`` and, on
a GPU, ``cuda`` (host wall time incl. synchronisation; ``extra_info`` adds the device time
from CUDA events).

``extra_info`` reports masks/s and us/mask, plus the per-image cost of the README multi-crop
(2 x 14x14 + 10 x 6x6 masks) for the data-loader budget.

``public block_masks r=0.3``: the public ``block_masks(256, 14, 14, 0.3, backend=...)`` on one
thread (``torch.set_num_threads(1)``, ``n_threads=1``) with ``backend="python"`` and
``backend="cpp"`` against ``reference`` (``block_mask_reference`` per mask, the reference's
loop); ``extra_info["x_reference"]`` is the reference's per-mask time over this one's, with
the reference timed in the same run.

``training-thread mask time (DALI)``: the CPU time (``time.thread_time``) the DALI loader's
training thread spends on one recipe batch's masks (``DALIMultiCropLoader._masks``, cpp back end) when they are drawn there
(``inline``, ``masks_ahead=False``) and when the source started them on the background thread
while the pipeline was still working on the batch (``ahead``: the training thread only collects
the finished ``MaskBatch``). The pipeline itself is not run: the untimed setup hands the batch's
indices over as the source would and sleeps 2 ms (less than one batch of DALI work; the
collection then runs on cold caches: ~1.5 us warm, 10-30 us measured here).
"""

import functools
import math
import os
import random
import time

import numpy as np
import pytest
import torch

from ibot_fast.masking import (MaskBatch, MaskBatcher, MaskGenerator, block_mask_reference,
                               block_masks, extension_available)

block_masks_python = functools.partial(block_masks, backend="python")

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


def _cpp_block_masks(n_threads):
    # The batcher is built once, as the data loader does, not inside the timed call: its
    # construction and checks are not part of generating a batch.
    batchers = {}

    def run(n, height, width, ratio, seed):
        key = (tuple(ratio) if isinstance(ratio, list) else ratio, seed)
        if key not in batchers:
            gen = (MaskGenerator.from_preset("vit_small_readme") if isinstance(ratio, list)
                   else MaskGenerator(ratio, 0.0))
            batchers[key] = MaskBatcher(gen, "cpp", seed=seed, n_threads=n_threads)
        return batchers[key].generate(torch.arange(n), 0, height, width, 1,
                                      selection=False).masks_CBHW[0]
    return run


ALL_THREADS = os.cpu_count() or 1
IMPLS = {"fast": block_masks_python, "literal": _literal_block_masks}
if extension_available():
    IMPLS.update(cpp1=_cpp_block_masks(1), cppN=_cpp_block_masks(ALL_THREADS))


def _timed(benchmark) -> bool:
    """False under --benchmark-disable (each case then runs once, as a test, with no stats)."""
    return benchmark.stats is not None


def _report(benchmark, masks_NHW):
    if not _timed(benchmark):
        return
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
    if impl.startswith("cpp"):  # other random numbers: check the bound, not the bits
        cap = math.floor((0.5 if isinstance(ratio, list) else ratio) * GRID * GRID)
        assert masks_NHW.sum(dim=(1, 2)).max() <= cap
        benchmark.extra_info["threads"] = 1 if impl == "cpp1" else ALL_THREADS
    else:  # the Python implementations draw identical masks; check once, outside timing
        assert torch.equal(masks_NHW, block_masks_python(N_MASKS, GRID, GRID, ratio, seed=SEED))
    _report(benchmark, masks_NHW)


RECIPE_B = 128


def _python_recipe_batch():
    gen = MaskGenerator.from_preset("vit_small_readme")
    K = gen.max_masked(GRID, GRID)

    def run():
        rng = random.Random(SEED)  # crop-major [2, B] like the collate stacks them
        masks = np.stack([np.stack([gen(GRID, GRID, rng) for _ in range(RECIPE_B)])
                          for _ in range(2)])
        # One torch thread, as inside a DataLoader worker (and "one core" for the comparison).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return MaskBatch.from_masks(torch.from_numpy(masks), K)
        finally:
            torch.set_num_threads(threads)
    return run


def _compiled_recipe_batch(backend, n_threads=None):
    batcher = MaskBatcher(MaskGenerator.from_preset("vit_small_readme"), backend, seed=SEED,
                          n_threads=n_threads)
    ids = torch.arange(RECIPE_B, device="cuda" if backend == "cuda" else "cpu")
    epoch = iter(range(10**9))  # a fresh epoch per call: no two calls draw the same masks

    def run():
        batch = batcher.generate(ids, next(epoch), GRID, GRID, 2)
        if backend == "cuda":
            torch.cuda.synchronize()
        return batch
    return run


RECIPE_IMPLS = {"python": _python_recipe_batch}
if extension_available():
    RECIPE_IMPLS.update(cpp1=lambda: _compiled_recipe_batch("cpp", 1),
                        cppN=lambda: _compiled_recipe_batch("cpp", ALL_THREADS))
if extension_available(cuda=True):
    RECIPE_IMPLS.update(cuda=lambda: _compiled_recipe_batch("cuda"))


@pytest.mark.parametrize("impl", list(RECIPE_IMPLS))
def test_recipe_mask_batch(benchmark, impl):
    """Masks + padded selection for one README-recipe step (2 global crops x B=128)."""
    benchmark.group = f"recipe batch B={RECIPE_B} (2x{GRID}x{GRID} + selection)"
    run = RECIPE_IMPLS[impl]()
    batch = benchmark(run)
    assert batch.idx_M.numel() == 2 * RECIPE_B * 98 and int(batch.counts_CB.max()) <= 98
    _report(benchmark, batch.masks_CBHW.flatten(0, 1))
    if impl.startswith("cpp"):
        benchmark.extra_info["threads"] = 1 if impl == "cpp1" else ALL_THREADS
    if not _timed(benchmark):
        return
    benchmark.extra_info["us_per_batch"] = round(benchmark.stats.stats.mean * 1e6, 1)
    if impl == "cuda":  # device time of the kernels (generation + selection), from the profiler
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(100):
                run()
        events = [e for e in prof.key_averages() if "ibot_mask" in e.key]
        benchmark.extra_info["kernels"] = sorted(e.key for e in events)
        benchmark.extra_info["device_us_per_batch"] = round(
            sum(e.device_time_total for e in events) / 100, 2)


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
    if not _timed(benchmark):
        return
    mean_s = benchmark.stats.stats.mean
    benchmark.extra_info["images_per_s"] = round(n_images / mean_s)
    benchmark.extra_info["us_per_image"] = round(mean_s / n_images * 1e6, 1)
    benchmark.extra_info["masks_per_s"] = round(n_images * len(grids) / mean_s)


@pytest.mark.skipif(not extension_available(), reason="the C++ mask extension is not built")
@pytest.mark.parametrize("mode", ["inline", "ahead"])
@pytest.mark.benchmark(timer=time.thread_time)  # CPU time of the training thread, not wall time
def test_dali_training_thread_mask_time(benchmark, mode):
    pytest.importorskip("nvidia.dali")
    from ibot_fast.data.dali import DALIMultiCropLoader, MultiCropSpec

    gen = MaskGenerator.from_preset("vit_small_readme")
    spec = MultiCropSpec(global_crops_number=2, local_crops_number=10, global_crops_size=224,
                         local_crops_size=96)
    # the file list is never read: only the mask hand-over of the loader runs
    ld = DALIMultiCropLoader([("unused.jpg", 0)] * (4 * RECIPE_B), spec, gen, 16, RECIPE_B,
                             device="cpu", device_id=None,
                             mask_batcher=MaskBatcher(gen, "cpp", seed=SEED, n_threads=1),
                             masks_ahead=mode == "ahead")
    ids = np.arange(RECIPE_B, dtype=np.int64)
    index = torch.from_numpy(ids)
    epochs = iter(range(10**9))

    def setup():  # the source's part, off the clock: the batch's indices are known, and the
        ld.epoch, ld.consumed_batches = next(epochs), 1  # pipeline works on it for a while
        if mode == "ahead":
            ld._start_masks(ld.epoch, 0, ids)
        time.sleep(0.002)
        return (), {}

    benchmark.group = f"training-thread mask time per batch (DALI, B={RECIPE_B}, cpp)"
    batch = benchmark.pedantic(lambda: ld._masks(None, index), setup=setup, rounds=400)
    assert batch.idx_M.numel() == 2 * RECIPE_B * 98
    if not _timed(benchmark):  # pedantic runs once when disabled
        assert ld.masks_ahead_used == (1 if mode == "ahead" else 0)
        return
    assert ld.masks_ahead_used == (400 if mode == "ahead" else 0)  # really served ahead
    benchmark.extra_info["cpu_us_per_batch_on_training_thread"] = round(
        benchmark.stats.stats.median * 1e6, 1)


PUBLIC_RATIO = 0.3
PUBLIC_IMPLS = {
    "reference": lambda seed: _literal_block_masks(N_MASKS, GRID, GRID, PUBLIC_RATIO, seed),
    "python": lambda seed: block_masks(N_MASKS, GRID, GRID, PUBLIC_RATIO, seed, backend="python"),
}
if extension_available():
    PUBLIC_IMPLS["cpp"] = lambda seed: block_masks(N_MASKS, GRID, GRID, PUBLIC_RATIO, seed,
                                                   backend="cpp", n_threads=1)


def _per_mask_s(run, rounds=5):
    best = math.inf
    for r in range(rounds):
        t0 = time.perf_counter()
        run(SEED + r)
        best = min(best, time.perf_counter() - t0)
    return best / N_MASKS


@pytest.mark.parametrize("impl", list(PUBLIC_IMPLS))
def test_public_block_masks_one_thread(benchmark, impl):
    """The public API per back end at r = 0.3 on 14x14, one thread, against the reference."""
    benchmark.group = f"public block_masks r={PUBLIC_RATIO} {GRID}x{GRID}, one thread"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seeds = iter(range(10**9))  # other masks every call (the cpp result is keyed on the seed)
        masks_NHW = benchmark(lambda: PUBLIC_IMPLS[impl](next(seeds)))
        assert masks_NHW.shape == (N_MASKS, GRID, GRID)
        assert masks_NHW.sum(dim=(1, 2)).max() <= math.floor(PUBLIC_RATIO * GRID * GRID)
        _report(benchmark, masks_NHW)
        benchmark.extra_info["threads"] = 1
        if impl != "reference" and _timed(benchmark):
            ref_s = _per_mask_s(PUBLIC_IMPLS["reference"])
            benchmark.extra_info["x_reference"] = round(
                ref_s / (benchmark.stats.stats.mean / N_MASKS), 1)
    finally:
        torch.set_num_threads(threads)
