"""The C++/CUDA mask generator (csrc/, ibot_fast._mask_ext) and the batch API (MaskBatcher,
MaskBatch) against the Python reference generator (ibot_fast.masking.block_mask, bit-identical to
the reference's ImageFolderMask for a seed).

The compiled generator uses its own random numbers (Philox, SplitMix64), so it is compared in
distribution: the reference statistics of docs/reference-semantics.md#measured-statistics (10k
masks per ratio on 14x14), the README recipe, and the shapes of the rectangles against the Python
generator. Invariants (bound, rectangles, determinism, selection layout, loss weights) are
checked exactly.
"""

import math
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_union_of_rectangles

from ibot_fast.masking import (MaskBatch, MaskBatcher, MaskGenerator, MaskRequest, block_mask,
                               extension_available)

needs_ext = pytest.mark.skipif(not extension_available(), reason="ibot_fast._mask_ext not built")
needs_cuda_ext = pytest.mark.skipif(not extension_available(cuda=True),
                                    reason="needs the CUDA build of ibot_fast._mask_ext and a GPU")

# docs/reference-semantics.md#measured-statistics: ratio -> (mean masked count, std, P(count == floor(r*H*W)))
REFERENCE_BLOCK_STATS = {0.1: (17.58, 1.49, 0.284), 0.3: (57.26, 1.19, 0.583),
                         0.5: (97.54, 0.91, 0.699)}
N_STAT = 10_000


def ext():
    from ibot_fast import _mask_ext
    return _mask_ext


def batcher(pred_ratio=0.3, pred_ratio_var=0.0, backend="cpp", seed=0, **kw):
    return MaskBatcher(MaskGenerator(pred_ratio, pred_ratio_var, **kw), backend, seed=seed)


def counts_of(mb, n, ratio, seed=1234):
    return batcher(ratio, 0.0, mb, seed).generate(torch.arange(n), 0, 14, 14, 1,
                                                  selection=False).counts_CB[0].numpy()


# --------------------------------------------------------------------------------------------
# random numbers
# --------------------------------------------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("ctr,key,want", [
    # Random123's published known-answer vectors for Philox4x32-10 (tests/kat_vectors).
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(ctr, key, want):
    assert tuple(ext().philox4x32_10(list(ctr), list(key))) == want


# --------------------------------------------------------------------------------------------
# distribution parity with the reference (its measured statistics)
# --------------------------------------------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("ratio", sorted(REFERENCE_BLOCK_STATS))
def test_cpp_block_statistics_match_reference(ratio):
    ref_mean, ref_std, ref_p_cap = REFERENCE_BLOCK_STATS[ratio]
    cap = math.floor(ratio * 196)
    counts = counts_of("cpp", N_STAT, ratio)
    assert counts.max() <= cap  # hard property: never above floor(r*H*W)
    # Same tolerances and arguments as tests/test_masking.py: SE of the mean ~0.015 (1% is
    # > 8 sigma), SE of P(cap) ~0.007 for the difference (0.03 is > 4 sigma).
    assert abs(counts.mean() - ref_mean) <= 0.01 * ref_mean, counts.mean()
    assert abs(counts.std() - ref_std) <= 0.15 * ref_std, counts.std()
    assert abs((counts == cap).mean() - ref_p_cap) <= 0.03, (counts == cap).mean()


@needs_ext
def test_cpp_recipe_statistics():
    mb = MaskBatcher(MaskGenerator.from_preset("vit_small_readme"), "cpp", seed=7)
    batch = mb.generate(torch.arange(10_000), 0, 14, 14, n_crops=2)  # 20k crops
    counts = batch.counts_CB.flatten().numpy()
    # Binomial(20k, 1/2): SE 0.0035, +-0.02 is > 5 sigma. Per-crop fraction std ~0.17: SE of the
    # mean fraction ~0.0012, +-0.005 is 4 sigma.
    assert abs((counts == 0).mean() - 0.5) <= 0.02, (counts == 0).mean()
    assert abs(counts.mean() / 196 - 0.146) <= 0.005, counts.mean() / 196
    assert counts.max() <= mb.max_masked(14, 14) == 98


def _shape_stats(rects):
    """Mean blocks per mask, mean block area, mean elongation max(h,w)/min(h,w)."""
    hw = np.array([(h, w) for rs in rects for (_, _, h, w) in rs], dtype=float)
    return (np.mean([len(rs) for rs in rects]), (hw[:, 0] * hw[:, 1]).mean(),
            (hw.max(1) / hw.min(1)).mean())


@needs_ext
@pytest.mark.parametrize("height,width,ratio", [(14, 14, 0.1), (14, 14, 0.3), (14, 14, 0.5),
                                                (6, 6, 0.3), (7, 11, 0.4)])
def test_cpp_masks_are_unions_of_rectangles_shaped_like_python(height, width, ratio):
    n = 4000
    log_lo, log_hi = math.log(0.3), math.log(1 / 0.3)
    masks, counts, rects, n_rects = ext().block_rects(
        torch.arange(n), 5, 0, 1, height, width, [ratio], [0.0], log_lo, log_hi, True, 1)
    masks, counts, rects, n_rects = masks[0], counts[0], rects[0], n_rects[0]
    cpp_rects = [rects[k, :n_rects[k]].tolist() for k in range(n)]
    for k in range(1000):  # invariants on the first 1000, statistics on all
        mask = masks[k].numpy()
        assert_union_of_rectangles(mask, cpp_rects[k], height, width)
        assert counts[k] == mask.sum() <= math.floor(ratio * height * width)
    rng = random.Random(11)
    py_rects = [block_mask(height, width, ratio, rng, return_blocks=True)[1] for _ in range(n)]
    # 4000 masks: SE of each mean is ~1-2% of its value, so 5% is ~3-4 sigma of the difference.
    for name, c, p in zip(("blocks per mask", "block area", "elongation"),
                          _shape_stats(cpp_rects), _shape_stats(py_rects)):
        assert abs(c - p) <= 0.05 * p, f"{name}: C++ {c:.3f} vs Python {p:.3f}"


@needs_ext
@pytest.mark.parametrize("aspect", [(0.5, 2.0), (0.3, 1 / 0.3), (0.1, 10.0)])
def test_cpp_aspect_ranges_shaped_like_python(aspect):
    # exp(+-t/2) of the log-aspect is an inline polynomial for |t/2| <= 0.75 (the first two
    # ranges) and libm's exp beyond (the third): both must give the Python generator's shapes.
    n, ratio = 4000, 0.4
    masks, counts, rects, n_rects = ext().block_rects(
        torch.arange(n), 8, 0, 1, 14, 14, [ratio], [0.0], math.log(aspect[0]),
        math.log(aspect[1]), True, 1)
    cpp_rects = [rects[0, k, :n_rects[0, k]].tolist() for k in range(n)]
    rng = random.Random(12)
    py = [block_mask(14, 14, ratio, rng, aspect=aspect, return_blocks=True) for _ in range(n)]
    py_counts = np.array([m.sum() for m, _ in py], dtype=float)
    assert abs(counts[0].double().mean().item() - py_counts.mean()) <= 0.01 * py_counts.mean()
    for name, c, p in zip(("blocks per mask", "block area", "elongation"),
                          _shape_stats(cpp_rects), _shape_stats([r for _, r in py])):
        assert abs(c - p) <= 0.05 * p, f"{aspect} {name}: C++ {c:.3f} vs Python {p:.3f}"


@needs_ext
def test_cpp_thread_count_and_chunking_do_not_change_masks():
    # One thread runs without an OpenMP region, more threads in chunks of 16 masks: same bits.
    gen = MaskGenerator.from_preset("vit_small_readme")
    ids = torch.arange(1000) * 7 + 3
    one = MaskBatcher(gen, "cpp", seed=21, n_threads=1).generate(ids, 2, 14, 14, 2)
    for n_threads in (2, 3):
        many = MaskBatcher(gen, "cpp", seed=21, n_threads=n_threads).generate(ids, 2, 14, 14, 2)
        for field in MaskBatch._FIELDS:
            assert torch.equal(getattr(one, field), getattr(many, field)), (n_threads, field)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_cuda_source_compiles_without_a_gpu(tmp_path):
    # mask_cuda.cu includes only <cuda_runtime.h> and the plain-C++ core, so nvcc checks the
    # kernel (and the core's __device__ side) here, with setup.py's nvcc flags.
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        ["nvcc", "-arch=sm_90", "-O3", "--fmad=false", "-c",
         str(root / "csrc" / "mask_cuda.cu"), "-o", str(tmp_path / "mask_cuda.o")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "mask_cuda.o").stat().st_size > 0


@needs_ext
@pytest.mark.parametrize("height,width,ratio,expected", [(14, 14, 0.3, 58), (6, 6, 0.3, 10),
                                                         (10, 10, 0.47, 46), (3, 5, 0.99, 14)])
def test_cpp_random_masks_exact_count_and_uniform(height, width, ratio, expected):
    mb = batcher(min(ratio, 0.99), 0.0, pred_shape="rand")
    counts = mb.generate(torch.arange(500), 0, height, width, 1).counts_CB
    assert (counts == expected).all()  # int(r*H*W), with upstream's left-to-right product
    if (height, width) == (14, 14):
        # 4000 masks x 58 cells: each cell Binomial(4000, 58/196), std ~29; all within 6 std.
        hits = mb.generate(torch.arange(4000), 0, 14, 14, 1).masks_CBHW[0].sum(0).numpy()
        assert np.abs(hits - 4000 * 58 / 196).max() < 174


# --------------------------------------------------------------------------------------------
# determinism and streams
# --------------------------------------------------------------------------------------------

@needs_ext
def test_cpp_deterministic_and_keyed_on_seed_epoch_id_crop():
    gen = MaskGenerator.from_preset("vit_small_readme")
    ids = torch.arange(100, 356)
    a = MaskBatcher(gen, "cpp", seed=3, n_threads=1).generate(ids, 4, 14, 14)
    b = MaskBatcher(gen, "cpp", seed=3, n_threads=2).generate(ids, 4, 14, 14)
    for f in MaskBatch._FIELDS:  # bit-identical run to run, whatever the thread count
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    # A mask depends on the sample id, not on its position in the batch.
    c = MaskBatcher(gen, "cpp", seed=3).generate(ids.flip(0), 4, 14, 14)
    assert torch.equal(c.masks_CBHW.flip(1), a.masks_CBHW)
    masked = a.counts_CB > 0
    for other in (MaskBatcher(gen, "cpp", seed=4).generate(ids, 4, 14, 14),
                  MaskBatcher(gen, "cpp", seed=3).generate(ids, 5, 14, 14),
                  MaskBatcher(gen, "cpp", seed=3).generate(ids + 1000, 4, 14, 14)):
        assert (other.masks_CBHW != a.masks_CBHW).flatten(2).any(-1).float().mean() > 0.4
    # The two crops of an image draw different streams.
    both = masked.all(0)
    assert (a.masks_CBHW[0][both] != a.masks_CBHW[1][both]).flatten(1).any(-1).all()


@needs_ext
def test_ratio_zero_and_pred_start_epoch():
    assert batcher(0.0, 0.0).generate(torch.arange(64), 0, 14, 14).counts_CB.sum() == 0
    mb = MaskBatcher(MaskGenerator(0.3, 0.0, pred_start_epoch=5), "cpp", seed=0)
    for epoch in (0, 4):
        batch = mb.generate(torch.arange(64), epoch, 14, 14)
        assert batch.counts_CB.sum() == 0 and int(batch.n_valid) == 0
        assert not batch.valid_M.any() and batch.weight_M.sum() == 0
    counts = mb.generate(torch.arange(64), 5, 14, 14).counts_CB
    assert ((counts >= 16) & (counts <= 58)).all()


# --------------------------------------------------------------------------------------------
# batch layout and loss weights
# --------------------------------------------------------------------------------------------

def reference_patch_loss(ce_CBN, masks_CBHW):
    """(1/C) sum_c mean_b [sum_n ce * m / max(sum_n m, 1)] (docs/reference-semantics.md#patch-term)."""
    m = masks_CBHW.flatten(2).double()
    per_image = (ce_CBN * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    return per_image.mean(-1).mean()


@pytest.mark.parametrize("backend", [
    "python", pytest.param("cpp", marks=needs_ext)])
@pytest.mark.parametrize("preset,K", [("vit_small_readme", 98), ("code_default", 58)])
def test_selection_layout_and_weights(backend, preset, K):
    mb = MaskBatcher(MaskGenerator.from_preset(preset), backend, seed=1)
    B, C, N = 37, 2, 196
    batch = mb.generate(list(range(B)), 0, 14, 14, C)
    assert isinstance(batch, list) and len(batch) == C  # drop-in for the list of masks
    assert [tuple(m.shape) for m in batch] == [(B, 14, 14)] * C
    assert batch.max_masked == K and batch.idx_M.shape == (C * B * K,)  # static: from config
    assert (batch.idx_M.dtype, batch.valid_M.dtype, batch.weight_M.dtype, batch.counts_CB.dtype) \
        == (torch.int64, torch.bool, torch.float32, torch.int32)
    # The compiled selection equals the eager one exactly.
    ref = MaskBatch.from_masks(batch.masks_CBHW, K)
    for f in MaskBatch._FIELDS:
        assert torch.equal(getattr(ref, f), getattr(batch, f)), f
    # Layout written out independently: masked tokens of crop 0 image 0, ..., then padding.
    flat = batch.masks_CBHW.reshape(C, B, N)
    expected = [(c * B + b) * N + t for c in range(C) for b in range(B)
                for t in range(N) if flat[c, b, t]]
    n = len(expected)
    assert int(batch.n_valid) == n == int(batch.counts_CB.sum())
    assert batch.idx_M[:n].tolist() == expected and (batch.idx_M[n:] == 0).all()
    assert batch.valid_M[:n].all() and not batch.valid_M[n:].any()
    assert (batch.weight_M[n:] == 0).all()
    counts = flat.sum(-1)
    for r in range(0, n, 7):
        cb = expected[r] // N
        assert batch.weight_M[r] == np.float32(1.0 / (int(counts.flatten()[cb]) * B * C))
    # The weighted sum over selected rows is the reference's patch loss, zero-mask images included.
    assert (counts == 0).any() == (preset == "vit_small_readme")
    ce = torch.rand(C, B, N, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fused = (batch.weight_M.double() * ce.reshape(-1)[batch.idx_M]).sum()
    torch.testing.assert_close(fused, reference_patch_loss(ce, batch.masks_CBHW), rtol=1e-6, atol=0)
    # In fp64 the weights are recomputed, not widened from fp32: the sum is the reference's to
    # rounding (the fp32 weights above are off by up to ~3e-8 relative, 1/3 is not exact).
    w64 = batch.weights(torch.float64)
    assert w64.dtype == torch.float64 and batch.weights(torch.float32) is batch.weight_M
    assert (w64[n:] == 0).all()
    for r in range(0, n, 7):
        assert w64[r] == 1.0 / (int(counts.flatten()[expected[r] // N]) * B * C)
    fused64 = (w64 * ce.reshape(-1)[batch.idx_M]).sum()
    torch.testing.assert_close(fused64, reference_patch_loss(ce, batch.masks_CBHW), rtol=1e-13,
                               atol=0)


def test_python_backend_is_deterministic_and_matches_reference_stats():
    gen = MaskGenerator.from_preset("vit_small_readme")
    a = MaskBatcher(gen, "python", seed=2).generate(torch.arange(1000), 0, 14, 14)
    b = MaskBatcher(gen, "python", seed=2).generate(torch.arange(1000), 0, 14, 14)
    assert torch.equal(a.masks_CBHW, b.masks_CBHW)
    # Each crop is the reference generator's mask from the documented stream.
    rng = random.Random("ibot_fast/mask/2/0/17")
    for c in range(2):
        np.testing.assert_array_equal(a.masks_CBHW[c, 17].numpy(), gen(14, 14, rng, epoch=0))
    counts = a.counts_CB.flatten().numpy()  # 2000 crops: SE 0.011 for P(unmasked)
    assert abs((counts == 0).mean() - 0.5) <= 0.05 and counts.max() <= 98


def test_mask_batch_moves_and_pickles():
    import pickle
    batch = batcher(backend="python").generate(torch.arange(4), 0, 6, 6)
    again = pickle.loads(pickle.dumps(batch))
    assert isinstance(again, MaskBatch) and len(again) == 2 and again.max_masked == 10
    for f in MaskBatch._FIELDS:
        assert torch.equal(getattr(again, f), getattr(batch, f))
    assert torch.equal(again[1], batch.masks_CBHW[1])
    moved = batch.to(torch.float64)  # any .to(...) argument applies to every field
    assert isinstance(moved, MaskBatch) and moved.weight_M.dtype == torch.float64


# --------------------------------------------------------------------------------------------
# data path and flag
# --------------------------------------------------------------------------------------------

def _loader_batches(backend, num_workers, seed=3):
    from ibot_fast.data import MultiCropAugmentation, SyntheticImageDataset, build_pretrain_loader
    aug = MultiCropAugmentation(global_crops_scale=(0.5, 1.0), local_crops_scale=(0.2, 0.5),
                                global_crops_number=2, local_crops_number=1,
                                global_crops_size=32, local_crops_size=16)
    ds = SyntheticImageDataset(16, 4, 40, transform=aug, patch_size=4,
                               mask_generator=MaskGenerator.from_preset("vit_small_readme"),
                               seed=seed, mask_backend=backend)
    loader = build_pretrain_loader(ds, 8, num_workers)
    loader.sampler.set_epoch(1)
    ds.set_epoch(1)
    return ds, list(loader)


@pytest.mark.parametrize("backend", ["python", pytest.param("cpp", marks=needs_ext)])
def test_torch_loader_yields_mask_batches(backend):
    ds, batches = _loader_batches(backend, 0)
    assert len(batches) == 2
    for crops, labels, masks in batches:
        assert isinstance(masks, MaskBatch) and masks.masks_CBHW.shape == (2, 8, 8, 8)
        assert masks.max_masked == math.floor(0.5 * 64)
        ref = MaskBatch.from_masks(masks.masks_CBHW, masks.max_masked)
        assert all(torch.equal(getattr(ref, f), getattr(masks, f)) for f in MaskBatch._FIELDS)
    if backend == "python":  # the masks __getitem__ draws, exactly as without a backend
        _, plain = _loader_batches(None, 0)
        for (_, _, m1), (_, _, m2) in zip(batches, plain):
            assert type(m2) is list and all(torch.equal(a, b) for a, b in zip(m1, m2))
    else:  # keyed on (seed, epoch, dataset index): the workers do not change them
        _, with_workers = _loader_batches(backend, 2)
        for (_, l1, m1), (_, l2, m2) in zip(batches, with_workers):
            assert torch.equal(l1, l2) and torch.equal(m1.masks_CBHW, m2.masks_CBHW)


def test_mask_backend_flag():
    from ibot_fast.config import parse_args
    base = ["--data_path", "synthetic:8", "--epochs", "2", "--warmup_epochs", "1",
            "--warmup_teacher_temp_epochs", "1"]
    assert parse_args(base).mask_backend == ("cpp" if extension_available() else "python")
    assert parse_args(base + ["--mask_backend", "python"]).mask_backend == "python"
    if not extension_available(cuda=True):
        with pytest.raises(SystemExit):
            parse_args(base + ["--mask_backend", "cuda"])


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(pred_ratio=1.0, pred_ratio_var=0), "pred_ratio 1.0 is outside [0, 1)"),
    (dict(pred_ratio=-0.1, pred_ratio_var=0), "pred_ratio -0.1 is outside [0, 1)"),
    (dict(pred_ratio=0.2, pred_ratio_var=0.3), "pred_ratio_var 0.3 exceeds its pred_ratio 0.2"),
    (dict(pred_ratio=0.3, pred_ratio_var=0, pred_aspect_ratio=(3.0, 0.3)), "is inverted"),
])
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        MaskBatcher(MaskGenerator(**kwargs), "python")


@pytest.mark.parametrize("backend", ["python", pytest.param("cpp", marks=needs_ext)])
def test_bad_generate_arguments_raise(backend):
    mb = batcher(backend=backend)
    ids = torch.arange(4)
    for call, match in [
        (lambda: mb.generate(ids, 0, 0, 14), "mask grid 0x14 is empty"),
        (lambda: mb.generate(ids, 0, 14, -1), "mask grid 14x-1 is empty"),
        (lambda: mb.generate(ids, 0, 14, 14, n_crops=0), "n_crops must be a positive integer"),
        (lambda: mb.generate(ids, -1, 14, 14), "epoch must be a non-negative integer"),
        (lambda: mb.generate(torch.tensor([0, -3]), 0, 14, 14), "sample_ids must be >= 0"),
        (lambda: mb.generate(ids.reshape(2, 2), 0, 14, 14), "sample_ids must be a 1-D"),
        (lambda: mb.generate(torch.rand(4), 0, 14, 14), "sample_ids must be a 1-D integer"),
    ]:
        with pytest.raises(ValueError, match=re.escape(match)):
            call()
    if backend == "cpp":
        with pytest.raises(ValueError, match="up to 64x64"):
            mb.generate(ids, 0, 65, 14)


def test_bad_batcher_arguments_raise():
    gen = MaskGenerator(0.3, 0.0)
    with pytest.raises(ValueError, match="mask backend must be one of"):
        MaskBatcher(gen, "tpu")
    with pytest.raises(ValueError, match="seed must be an integer"):
        MaskBatcher(gen, "python", seed=-1)
    with pytest.raises(ValueError, match="n_threads must be a positive integer"):
        MaskBatcher(gen, "python", n_threads=0)
    with pytest.raises(ValueError, match="generator must be a MaskGenerator"):
        MaskBatcher(lambda h, w, rng: None, "python")
    with pytest.raises(ValueError, match="max_masked=3"):
        MaskBatch.from_masks(torch.ones(1, 1, 2, 2, dtype=torch.bool), 3)
    if extension_available() and not extension_available(cuda=True):
        with pytest.raises(ValueError, match="cuda"):
            MaskBatcher(gen, "cuda").generate(torch.arange(4), 0, 14, 14)


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_matches_cpu():
    gen = MaskGenerator.from_preset("vit_small_readme")
    ids = torch.arange(50_000)
    cpu = MaskBatcher(gen, "cpp", seed=9).generate(ids, 3, 14, 14)
    gpu = MaskBatcher(gen, "cuda", seed=9).generate(ids.cuda(), 3, 14, 14)
    assert gpu.masks_CBHW.is_cuda and gpu.idx_M.is_cuda
    # Same streams and arithmetic (no FMA contraction): masks agree except where exp() of the
    # two math libraries differs by an ulp exactly at a rounding tie of h or w.
    same = (gpu.masks_CBHW.cpu() == cpu.masks_CBHW).flatten(2).all(-1).float().mean()
    assert same >= 0.999, same
    c_cpu, c_gpu = cpu.counts_CB.double(), gpu.counts_CB.cpu().double()
    assert abs(c_cpu.mean() - c_gpu.mean()) < 0.05 and abs((c_cpu == 0).mean() - (c_gpu == 0).mean()) < 0.01
    # The GPU selection is the eager selection of the GPU masks.
    ref = MaskBatch.from_masks(gpu.masks_CBHW.cpu(), gpu.max_masked)
    for f in MaskBatch._FIELDS:
        assert torch.equal(getattr(ref, f), getattr(gpu, f).cpu()), f
    # The trainer's deferred request (DataLoader workers cannot use CUDA).
    req = MaskBatcher(gen, "cuda", seed=9).request(torch.arange(128), 3, 14, 14)
    assert isinstance(req, MaskRequest)
    done = req.to(torch.device("cuda"))
    assert torch.equal(done.masks_CBHW, gpu.masks_CBHW[:, :128])


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("ratio", sorted(REFERENCE_BLOCK_STATS))
def test_cuda_block_statistics_match_reference(ratio):
    ref_mean, _, ref_p_cap = REFERENCE_BLOCK_STATS[ratio]
    cap = math.floor(ratio * 196)
    counts = batcher(ratio, 0.0, "cuda", 1234).generate(
        torch.arange(N_STAT, device="cuda"), 0, 14, 14, 1).counts_CB[0].cpu().numpy()
    assert counts.max() <= cap
    assert abs(counts.mean() - ref_mean) <= 0.01 * ref_mean
    assert abs((counts == cap).mean() - ref_p_cap) <= 0.03
