"""Pictures: last-layer [CLS] attention maps of a real photo (the one bundled with matplotlib),
from a checkpoint in the reference's layout, and the pieces they are made of."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ibot_fast.viz.attention import (cls_attention_maps, main, prepare_image, render,
                                     sample_image_path, threshold_masks)


def test_bundled_photo_is_a_real_photo():
    with Image.open(sample_image_path()) as im:
        assert im.format == "JPEG" and im.mode == "RGB" and min(im.size) >= 256
        assert np.asarray(im).std() > 20  # not a flat test card


def test_attention_png_from_a_reference_checkpoint(tmp_path):
    """CLI on the bundled photo: PNG of 2 rows × (image + one tile per head), maps that are
    probability rows (in [0, 1], summing over the patches to at most 1), heads that differ."""
    from test_convert import make_reference_checkpoint

    ckpt = tmp_path / "ref.pth"
    make_reference_checkpoint(ckpt)  # vit_tiny/8 (3 heads), reference layout
    out = tmp_path / "attn.png"
    _, maps = main(["--checkpoint", str(ckpt), "--image_size", "64", "--output", str(out),
                      "--save_maps"])
    # grace_hopper.jpg is 512 × 600: shorter side -> 64, the other 75 -> cropped to 72 (8 | 72)
    assert maps.shape == (3, 72 // 8, 64 // 8)
    with Image.open(out) as im:
        assert im.size == ((1 + 3) * 64, 2 * 72) and im.mode == "RGB"
        png = np.asarray(im)
    np.testing.assert_array_equal(np.load(tmp_path / "attn.npy"), maps)
    assert (maps >= 0).all() and (maps <= 1).all()
    sums = maps.reshape(3, -1).sum(1)
    assert ((sums > 0) & (sums <= 1 + 1e-5)).all()  # the rest is attention to [CLS] itself
    assert all(maps[h].std() > 0 for h in range(3))  # not flat
    for a in range(3):
        for b in range(a + 1, 3):
            assert np.abs(maps[a] - maps[b]).max() > 1e-3, (a, b)
    # tiles: the photo itself, then heat maps that use the colour map's range
    crop = prepare_image(Image.open(sample_image_path()), 64, 8)
    np.testing.assert_array_equal(png[:72, :64], np.asarray(crop))
    assert png[:72, 64:].std() > 10


def test_cls_attention_maps_by_hand():
    """Row 0 of softmax(q kᵀ/√d) of the last block, keys 1..N, computed here from its weights."""
    from ibot_fast.models import build_vit

    torch.manual_seed(0)
    vit = build_vit("vit_tiny", 8, img_size=16).eval()
    x = torch.randn(1, 3, 24, 16)  # a 3 × 2 grid: the position table is interpolated
    maps = cls_attention_maps(vit, x)
    with torch.no_grad():
        t = vit.prepare_tokens(x)
        for blk in vit.blocks[:-1]:
            t = blk(t)
        last = vit.blocks[-1]
        h = last.norm1(t)[0]  # [T, D]
        W, bias = last.attn.qkv.weight, last.attn.qkv.bias
        D, nh = h.shape[-1], 3
        want = []
        for head in range(nh):
            sl = slice(head * D // nh, (head + 1) * D // nh)
            q = h[0] @ W[:D][sl].T + bias[:D][sl]             # the [CLS] query
            k = h @ W[D:2 * D][sl].T + bias[D:2 * D][sl]      # every key
            p = torch.softmax(k @ q / (D // nh) ** 0.5, dim=0)
            want.append(p[1:].reshape(3, 2))
    np.testing.assert_allclose(maps, torch.stack(want).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one image"):
        cls_attention_maps(vit, torch.randn(2, 3, 16, 16))


def test_threshold_masks_keep_the_top_mass():
    maps = np.array([[[0.1, 0.2], [0.3, 0.4]], [[0.4, 0.3], [0.2, 0.1]]])
    m = threshold_masks(maps, 0.6)  # 0.4 + 0.3 ≥ 0.6, 0.4 alone is not
    np.testing.assert_array_equal(m[0], [[False, False], [True, True]])
    np.testing.assert_array_equal(m[1], [[True, True], [False, False]])
    assert threshold_masks(maps, 1.0).all()
    with pytest.raises(ValueError, match="threshold"):
        threshold_masks(maps, 0.0)


def test_render_and_prepare_image_shapes():
    img = Image.fromarray(np.full((50, 70, 3), 128, np.uint8))
    crop = prepare_image(img, 32, 8)  # 50 × 70 -> 32 × 45 -> 32 × 40
    assert crop.size == (40, 32)
    maps = np.random.default_rng(0).random((2, 4, 5))
    pic = render(crop, maps, threshold_masks(maps))
    assert pic.size == (3 * 40, 2 * 32)
    with pytest.raises(ValueError, match="image_size"):
        prepare_image(img, 4, 8)
