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


# ------------------------------------------------------------------- training curves
def _write_run(root, epochs=3, steps=4, knn=True, final=True):
    """A run directory as the trainer leaves it: steps.jsonl (every step), args.json, and the
    periodic (knn.jsonl) and final (knn.json) k-NN records."""
    import json

    with open(root / "steps.jsonl", "w") as f:
        for e in range(epochs):
            for s in range(steps):
                it = e * steps + s
                f.write(json.dumps({"epoch": e, "it": it, "loss": 9.0 - 0.1 * it,
                                    "cls": 6.0 - 0.1 * it, "patch": 3.0, "lr": 1e-4,
                                    "wd": 0.04}) + "\n")
    (root / "args.json").write_text(json.dumps(dict(
        epochs=epochs, warmup_teacher_temp_epochs=1, warmup_teacher_temp=0.04,
        teacher_temp=0.04, warmup_teacher_patch_temp=0.04, teacher_patch_temp=0.07,
        out_dim=512)))
    table = lambda top1: {k: {"top1": top1 + i, "top5": 90.0}  # noqa: E731
                          for i, k in enumerate(("10", "20", "100", "200"))}
    if knn:
        with open(root / "knn.jsonl", "w") as f:
            for e in range(epochs):
                f.write(json.dumps({"epoch": e, "knn": table(50.0 + 5 * e), "nmi": 0.1,
                                    "ari": 0.1}) + "\n")
    if final:
        (root / "knn.json").write_text(json.dumps({"results": {
            "teacher (trained)": table(60.0), "random init": table(45.0)}}))


def test_knn_curve_sits_at_the_end_of_each_epoch(tmp_path):
    """The teacher's top-1 at k = 10 and 20 for every evaluated epoch, at that epoch's last
    logged iteration; the random init's level from knn.json; an evaluation of an epoch with no
    step record (a resumed run's log) is left out rather than placed at a guessed iteration."""
    import json

    from ibot_fast.viz.curves import _read_jsonl, knn_curve

    _write_run(tmp_path)
    with open(tmp_path / "knn.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 7, "knn": {"10": {"top1": 1.0, "top5": 1.0}}}) + "\n")
    recs = _read_jsonl(tmp_path / "steps.jsonl")
    curve = knn_curve(str(tmp_path), recs)
    assert curve["it"] == [3, 7, 11]
    assert curve["top1"] == {"10": [50.0, 55.0, 60.0], "20": [51.0, 56.0, 61.0]}
    assert curve["random"] == {"10": 45.0, "20": 46.0}
    (tmp_path / "knn.json").unlink()
    assert knn_curve(str(tmp_path), recs)["random"] == {}
    (tmp_path / "knn.jsonl").unlink()
    assert knn_curve(str(tmp_path), recs) is None


def test_loss_curve_png_has_the_knn_panel_next_to_the_loss(tmp_path):
    """Four panels (loss, teacher k-NN, lr / wd, temperatures) with periodic k-NN records,
    three without; the k-NN panel is the second one and is not blank."""
    from ibot_fast.viz.curves import plot_training_curves

    with_knn, without = tmp_path / "knn", tmp_path / "plain"
    with_knn.mkdir()
    without.mkdir()
    _write_run(with_knn)
    _write_run(without, knn=False, final=False)
    for run, panels in ((with_knn, 4), (without, 3)):
        png = plot_training_curves(str(run))
        with Image.open(png) as im:
            assert im.size == (int(panels * 4.2 * 120), int(3.4 * 120)), run
            pic = np.asarray(im.convert("RGB"))
        width = pic.shape[1] // panels
        second = pic[:, width:2 * width]
        assert second.std() > 10  # a drawn panel, not an empty canvas
    assert plot_training_curves(str(tmp_path)) is None  # no steps.jsonl
