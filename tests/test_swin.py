"""Swin backbones (ibot_fast/models/swin.py, ``--arch swin_*``).

Without a checkout: the window helpers against hand computations, patch merging, the MIM mask
repeat, the pooled [CLS] slot, the window shrink, 96-px local crops, the flag rules (exit 2
before any work), the loader's 32-px mask grid, the fast step's unpacked route against the
reference path, convert / export (with timm installed: the timm export loaded strictly into
timm's Swin, same features). With ``IBOT_REFERENCE_REPO``: the reference's Swin against
ours in fp64 on the same weights (through ibot_fast.convert), and two training steps of the
reference loop against ``Trainer.train_step`` (default step and ``--step reference``).
"""
from __future__ import annotations

import os

import pytest
import torch

from ibot_fast import convert
from ibot_fast.config import CROSS_FLAG_RULES, parse_args
from ibot_fast.models import build_ibot_models
from ibot_fast.models.swin import (PatchMerging, SwinTransformer, build_swin,
                                   relative_position_index, shift_attn_mask, stage_windows,
                                   window_partition, window_reverse)

from helpers import FP64, compare_train_steps_with_reference

REPO = os.environ.get("IBOT_REFERENCE_REPO")
needs_ref = pytest.mark.skipif(not REPO, reason="set IBOT_REFERENCE_REPO to a bytedance/ibot "
                                                "checkout")
pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")

# a small Swin at the reference's stage layout: widths 16..128, two blocks a stage
NANO = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))


def _nano(img_size=224, window_size=7, **kw):
    torch.manual_seed(0)
    return SwinTransformer(img_size=img_size, window_size=window_size, **NANO, **kw).double()


# --------------------------------------------------------------------------- window helpers
def test_window_partition_and_reverse_round_trip():
    x = torch.randn(2, 6, 9, 5)
    w = window_partition(x, 3)
    assert w.shape == (2 * 2 * 3, 9, 5)
    # window 1 of image 0 is rows 0..2, columns 3..5, row-major
    assert torch.equal(w[1], x[0, 0:3, 3:6].reshape(9, 5))
    assert torch.equal(window_reverse(w, 3, 6, 9), x)


def test_relative_position_index_by_hand():
    idx = relative_position_index(2, 2)  # tokens (0,0) (0,1) (1,0) (1,1); table 3x3
    # offset (dy, dx) -> (dy + 1) * 3 + (dx + 1)
    expected = torch.tensor([[4, 3, 1, 0],
                             [5, 4, 2, 1],
                             [7, 6, 4, 3],
                             [8, 7, 5, 4]])
    assert torch.equal(idx, expected)
    big = relative_position_index(7, 7)
    assert big.shape == (49, 49) and big.min() == 0 and big.max() == 13 * 13 - 1
    assert torch.equal(big.diagonal(), torch.full((49,), 6 * 13 + 6))


def test_shift_mask_by_hand():
    # a 4x4 grid, window 2, shift 1: strips along each axis [0, 2), [2, 3), [3, 4)
    m = shift_attn_mask(4, 4, 2, 1)
    assert m.shape == (4, 4, 4)
    assert torch.equal(m[0], torch.zeros(4, 4))  # top-left window: one region
    # top-right window: columns 2 and 3 are different strips -> tokens {0,2} vs {1,3}
    same = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]).bool()
    assert torch.equal(m[1], torch.where(same, 0.0, -100.0))
    # bottom-right window: four regions, each token only with itself
    assert torch.equal(m[3], torch.where(torch.eye(4).bool(), 0.0, -100.0))
    assert set(m.unique().tolist()) == {0.0, -100.0}


def test_patch_merging_shapes_and_order():
    pm = PatchMerging(3)
    x = torch.arange(2 * 4 * 4 * 3, dtype=torch.float32).reshape(2, 16, 3)
    y, H, W = pm(x, 4, 4)
    assert y.shape == (2, 4, 6) and (H, W) == (2, 2)
    # odd grid: padded to 6x6 first
    y, H, W = pm(torch.randn(2, 25, 3), 5, 5)
    assert y.shape == (2, 9, 6) and (H, W) == (3, 3)
    # channel order (0,0), (1,0), (0,1), (1,1): check through the linear map with identity
    pm2 = PatchMerging(1)
    with torch.no_grad():
        pm2.norm.weight.fill_(1.0)
        pm2.norm.bias.zero_()
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 4, 1)  # rows (1,2), (3,4)
    cat = torch.stack([g[0, 0], g[0, 2], g[0, 1], g[0, 3]], dim=-1)  # (0,0) (1,0) (0,1) (1,1)
    expected = pm2.reduction(torch.nn.functional.layer_norm(cat, (4,), eps=1e-6))
    torch.testing.assert_close(pm2(g, 2, 2)[0][0], expected)


def test_window_shrinks_to_the_stage_grid():
    # 224 px: stage grids 56, 28, 14, 7
    assert stage_windows(224, 4, 7, 4) == [(7, True), (7, True), (7, True), (7, False)]
    assert stage_windows(224, 4, 14, 4) == [(14, True), (14, True), (14, False), (7, False)]
    m = _nano(window_size=14)
    blocks = [[(b.ws, b.shift) for b in layer.blocks] for layer in m.layers]
    assert blocks == [[(14, 0), (14, 7)], [(14, 0), (14, 7)], [(14, 0), (14, 0)],
                      [(7, 0), (7, 0)]]
    assert m.layers[3].blocks[0].attn.relative_position_bias_table.shape == (13 * 13, 8)


# ------------------------------------------------------------------------------- the model
def test_pooled_token_in_the_cls_slot_and_shapes():
    m = _nano()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    out = m(x)
    assert out.shape == (2, 1 + 2 * 2, 128)
    torch.testing.assert_close(out[:, 0], out[:, 1:].mean(1))
    torch.testing.assert_close(m(x, return_all_tokens=False), out[:, 0])
    assert m.token_grid(224, 224) == (7, 7) and m.token_grid(96, 96) == (3, 3)


def test_mask_is_repeated_onto_the_patch_grid():
    m = _nano(masked_im_modeling=True)
    with torch.no_grad():
        m.masked_embed.normal_()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    mask = torch.tensor([[[True, False], [False, False]]])  # one 32-px cell: 8x8 patches
    emb, h, w = m.embed(x, mask)
    grid = emb.view(1, h, w, -1)
    assert torch.equal(grid[0, :8, :8], m.masked_embed.expand(8, 8, -1))
    plain = m.embed(x)[0].view(1, h, w, -1)
    assert torch.equal(grid[0, 8:], plain[0, 8:]) and torch.equal(grid[0, :, 8:],
                                                                  plain[0, :, 8:])
    with pytest.raises(ValueError, match="expected"):
        m(x, mask=torch.zeros(1, 3, 3, dtype=torch.bool))


@pytest.mark.parametrize("window", [7, 14])
def test_96px_local_crops(window):
    m = _nano(window_size=window)
    out = m(torch.randn(2, 3, 96, 96, dtype=torch.float64))  # 24x24 patches, 3x3 at the end
    assert out.shape == (2, 10, 128) and torch.isfinite(out).all()


def test_sdpa_equals_math():
    m = _nano()
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    a = m(x)
    m.set_attn_backend("math")
    torch.testing.assert_close(m(x), a, **FP64)
    with pytest.raises(ValueError, match="not available for Swin"):
        m.set_attn_backend("varlen")


def test_build_ibot_models_swin_head_width():
    s, t = build_ibot_models("swin_nano", 4, 64, out_dim=16, patch_out_dim=16,
                             shared_head=True, head_hidden_dim=8, head_bottleneck_dim=4,
                             window_size=7)
    assert isinstance(s.backbone, SwinTransformer) and s.head.mlp[0].in_features == 128
    assert hasattr(s.backbone, "masked_embed") and not hasattr(t.backbone, "masked_embed")
    assert all(isinstance(b.drop_path, torch.nn.Identity) for lay in t.backbone.layers
               for b in lay.blocks)


# ----------------------------------------------------------------------------- flag rules
SWIN = ["--arch", "swin_nano", "--patch_size", "4", "--global_crops_size", "64",
        "--local_crops_size", "32", "--local_crops_number", "2", "--out_dim", "32",
        "--head_hidden_dim", "16", "--head_bottleneck_dim", "8", "--batch_size_per_gpu", "2",
        "--epochs", "3", "--warmup_teacher_temp_epochs", "1", "--warmup_epochs", "1",
        "--num_workers", "0", "--progress", "false", "--pred_ratio", "0", "0.3",
        "--pred_ratio_var", "0", "0.2", "--data_path", "synthetic:8"]


@pytest.fixture
def no_work(monkeypatch):
    import ibot_fast.train as train

    def reached(*a, **k):
        raise AssertionError("data or models were built before the flags were checked")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "TRITON_INTERPRET"):
        monkeypatch.delenv(name, raising=False)
    for name in ("Trainer", "resolve_data", "build_ibot_models", "init_distributed"):
        monkeypatch.setattr(train, name, reached)
    return train


@pytest.mark.parametrize("extra, flag", [
    (["--window_size", "0"], "--window_size"),
    (["--patch_size", "8"], "--patch_size"),
    (["--global_crops_size", "48"], "--global_crops_size"),
    (["--attn_backend", "varlen"], "--attn_backend"),
    (["--attn_backend", "flex"], "--attn_backend"),
    (["--packed_crops", "true"], "--packed_crops"),
    (["--compile", "blocks"], "--compile"),
    (["--drop_path_mode", "subset"], "--drop_path_mode"),
    (["--fsdp", "true"], "--fsdp"),
])
def test_bad_swin_flags_fail_before_any_work(no_work, capsys, tmp_path, extra, flag):
    with pytest.raises(SystemExit) as exc:
        no_work.main(SWIN + ["--output_dir", str(tmp_path)] + extra)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err, err


def test_swin_rules_are_registered():
    names = {r.name for r in CROSS_FLAG_RULES}
    assert {"swin-attn_backend", "swin-packed_crops", "swin-compile", "swin-drop_path_mode",
            "swin-fsdp"} <= names


def test_swin_parse_defaults_and_preset(tmp_path):
    a = parse_args(SWIN + ["--output_dir", str(tmp_path)])
    assert a.packed_crops is False and a.window_size == 7 and a.step == "fast"
    p = parse_args(["--preset", "swin_tiny_14_recipe", "--data_path", "synthetic:64",
                    "--output_dir", str(tmp_path)])
    assert (p.arch, p.patch_size, p.window_size, p.batch_size_per_gpu, p.pred_start_epoch,
            p.epochs, p.local_crops_number) == ("swin_tiny", 4, 14, 26, 50, 300, 10)
    vit = parse_args(["--data_path", "synthetic:256", "--output_dir", str(tmp_path)])
    assert vit.packed_crops is True  # ViT: unset still means packed


# ---------------------------------------------------------------------- training (no checkout)
@pytest.mark.parametrize("extra", [[], ["--fused_head_loss", "true"],
                                   ["--head_tokens", "all"]], ids=["default", "fused", "all"])
def test_loader_masks_on_the_32px_grid_and_steps_agree(tmp_path, extra):
    """The loader draws masks on the 32-px grid (2x2 for 64 px); the (unpacked) fast step --
    selected-token head + centre by linearity + fused loss, with the patch layer inside the
    loss, or the head on every token -- and the reference path give the same loss terms,
    gradients and centres in fp64."""
    from helpers import run_steps

    from ibot_fast.train import Trainer
    argv = SWIN + ["--precision", "fp64", "--drop_path", "0.1", "--lr", "0.05"]
    ref = Trainer(parse_args(argv + ["--output_dir", str(tmp_path / "r"), "--step",
                                     "reference"]))
    fast = Trainer(parse_args(argv + ["--output_dir", str(tmp_path / "f")] + extra))
    batch = next(iter(ref.loader))
    images, _, masks = batch
    m = masks.masks_CBHW if hasattr(masks, "masks_CBHW") else torch.stack(list(masks[:2]))
    assert tuple(m.shape[-2:]) == (2, 2)
    ra = run_steps(ref, [batch], torch.float64, 2)
    fa = run_steps(fast, [batch], torch.float64, 2)
    for (r, rg), (f, fg) in zip(ra, fa):
        for key in ("loss", "cls", "patch"):
            torch.testing.assert_close(f[key].double(), r[key].double(), **FP64)
        for name, g in rg.items():
            if g is not None:
                torch.testing.assert_close(fg[name], g, **FP64, msg=name)
    for key in ("center", "center2"):
        torch.testing.assert_close(getattr(fast.ibot_loss, key), getattr(ref.ibot_loss, key),
                                   **FP64)


# ---------------------------------------------------------------------------- convert / export
def _swin_checkpoint(tmp_path, window_size=7):
    """A checkpoint in the reference's layout (``module.`` prefixes, weight-norm names)."""
    s, t = build_ibot_models("swin_nano", 4, 64, out_dim=16, patch_out_dim=16,
                             shared_head=True, head_hidden_dim=8, head_bottleneck_dim=4,
                             window_size=window_size)
    args = dict(arch="swin_nano", patch_size=4, window_size=window_size, out_dim=16,
                global_crops_size=64)
    path = tmp_path / "checkpoint.pth"
    torch.save({"student": {"module." + k: v for k, v in s.state_dict().items()},
                "teacher": t.state_dict(), "args": args, "epoch": 3}, path)
    return path, s, t


def test_convert_swin_checkpoint_and_timm_names(tmp_path):
    path, s, t = _swin_checkpoint(tmp_path)
    state = convert.load_checkpoint_any(str(path))
    bb, info = convert.build_backbone(state, "teacher")
    assert isinstance(bb, SwinTransformer) and info["arch"] == "swin_nano"
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(bb(x), t.backbone(x))
    # a teacher-backbone file (the reference's checkpoint_teacher.pth layout)
    tb = tmp_path / "checkpoint_teacher.pth"
    torch.save({"teacher": state["teacher"], "args": state["args"]}, tb)
    bb2, _ = convert.load_backbone(str(tb))
    torch.testing.assert_close(bb2(x), t.backbone(x))
    sd = convert.export_backbone(state, "timm", "teacher")
    assert not any("relative_position_index" in k or "masked_embed" in k for k in sd)
    # timm's SwinTransformer: the merge of stage s opens stage s + 1
    assert "layers.1.downsample.reduction.weight" in sd
    assert "layers.0.downsample.reduction.weight" not in sd
    assert sd["layers.1.downsample.reduction.weight"].shape == (32, 64)
    assert "layers.0.blocks.1.attn.relative_position_bias_table" in sd and "norm.weight" in sd


def _import_timm():
    """timm, or a skip: CI has no timm; a torchvision built for another torch makes the
    import fail with a RuntimeError (an unregistered operator) rather than an ImportError."""
    try:
        return pytest.importorskip("timm", exc_type=ImportError)
    except RuntimeError as err:
        pytest.skip(f"timm does not import: {str(err).splitlines()[0]}")


@pytest.mark.slow  # swin_tiny at 224 px in fp64, ours and timm's: ~3 s a window on one core
@pytest.mark.parametrize("window", [7, 14])
def test_timm_export_loads_strictly_and_gives_our_features(window, tmp_path):
    """``convert --to timm`` of a swin_tiny teacher file loads strictly into timm's
    ``swin_tiny_patch4_window7_224`` (``window_size=14`` for window 14: the same layer names
    and table sizes, stage 3 shrinks to 7 in both), and timm's pooled feature is ours: in fp64
    to rounding once timm's LayerNorms get our eps 1e-6; with timm's default eps 1e-5 within
    1e-4. At 224 px every stage grid is a multiple of the window, so nothing is padded (timm
    rolls before padding where the reference pads first: other sizes differ)."""
    import functools

    timm = _import_timm()
    torch.manual_seed(0)
    ours = build_swin("swin_tiny", window_size=window, img_size=224, masked_im_modeling=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every tensor non-trivial (biases, norms), not the init's zeros/ones
        for p in ours.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    path, out = tmp_path / "checkpoint_teacher.pth", tmp_path / "timm.pth"
    torch.save({"teacher": {"backbone." + k: v for k, v in ours.state_dict().items()},
                "args": dict(arch="swin_tiny", patch_size=4, window_size=window)}, path)
    convert.main([str(path), str(out), "--to", "timm"])
    sd = torch.load(out, weights_only=True)
    kw = dict(num_classes=0, pretrained=False, **({"window_size": window} if window != 7
                                                  else {}))
    same_eps = timm.create_model("swin_tiny_patch4_window7_224", **kw, norm_layer=functools
                                 .partial(torch.nn.LayerNorm, eps=1e-6))
    same_eps.load_state_dict(sd)  # strict: every timm tensor filled, nothing left over
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64, generator=g)
    ours = ours.double().eval()
    with torch.no_grad():
        expected = ours(x)  # [1, 1 + 49, 768]: pooled, then the normed final tokens
        torch.testing.assert_close(same_eps.double().eval()(x), expected[:, 0], **FP64)
        torch.testing.assert_close(same_eps.forward_features(x).flatten(1, 2),
                                   expected[:, 1:], **FP64)
        if window == 7:  # what the docs tell users to create
            default = timm.create_model("swin_tiny_patch4_window7_224", **kw)
            default.load_state_dict(sd)
            torch.testing.assert_close(default.double().eval()(x), expected[:, 0],
                                       rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------ against the reference
@needs_ref
@pytest.mark.reference
@pytest.mark.parametrize("window", [7, 14])
@pytest.mark.parametrize("arch", ["swin_nano", "swin_tiny"])
def test_matches_reference_swin_fp64(arch, window, tmp_path):
    """The reference's Swin and ours on the same weights (loaded through convert from a
    reference-layout file): masked 224-px globals, unmasked globals and 96-px locals, fp64.
    ``swin_tiny`` is the reference's own factory (widths 96..768, depths 2, 2, 6, 2);
    ``swin_nano`` its SwinTransformer class at swin_tiny's stage layout, widths 16..128."""
    from ibot_fast.reference_repo import load_reference, reference_swin
    ref = load_reference(REPO)
    torch.manual_seed(0)
    r = reference_swin(ref, arch, 224, window_size=window, return_all_tokens=True,
                       masked_im_modeling=True, drop_path_rate=0.0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in r.parameters():  # every tensor non-trivial (biases, norms, masked_embed)
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    # fp32 weights on file (convert builds fp32 models), both sides then in fp64
    sd = {k: v for k, v in r.state_dict().items() if not k.startswith("head.")}
    r.double()
    path = tmp_path / "checkpoint_teacher.pth"
    torch.save({"teacher": {"backbone." + k: v for k, v in sd.items()},
                "args": dict(arch=arch, window_size=window, patch_size=4)}, path)
    ours, _ = convert.load_backbone(str(path), which="teacher")
    ours = ours.double().eval()
    o = build_swin(arch, window_size=window, img_size=224,
                   masked_im_modeling=True).double()
    o.load_state_dict(sd)  # with masked_embed
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    mask = torch.rand(2, 7, 7, generator=g) < 0.4
    xl = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(o(x, mask=mask), r(x.clone(), mask=mask), **FP64)
        torch.testing.assert_close(ours(x), r(x.clone()), **FP64)
        torch.testing.assert_close(ours(xl), r(xl.clone()), **FP64)
        assert (o(x, mask=mask) - o(x)).abs().max() > 1e-3  # the mask mattered


@needs_ref
@pytest.mark.reference
@pytest.mark.parametrize("window", [7, 14])
@pytest.mark.parametrize("arch", ["swin_nano", "swin_tiny"])
def test_train_steps_match_reference_swin(arch, window, tmp_path):
    from ibot_fast.reference_repo import load_reference
    # 64-px globals: a 2x2 mask grid, whose per-image patch weights 1/(count·B·C) are exact in
    # the loader's float32 MaskBatch.weight_M (a 3x3 grid's 1/3 is not: ~1e-8 relative in an
    # fp64 run, the same for ViT); window 14 on a 16x16 first stage still pads and shifts
    argv = SWIN + ["--arch", arch, "--window_size", str(window),
                   "--batch_size_per_gpu", "2", "--lr", "0.05", "--freeze_last_layer", "1",
                   "--clip_grad", "0.05", "--drop_path", "0.1", "--precision", "fp64"]
    compare_train_steps_with_reference(load_reference(REPO), argv, tmp_path)


# ----------------------------------------------------------------------------- eval and viz
def test_knn_features_linear_probe_and_attention_refusal(tmp_path):
    from ibot_fast.eval.knn import random_init_backbone
    from ibot_fast.eval.linear import probe_features
    from ibot_fast.viz import attention

    path, s, t = _swin_checkpoint(tmp_path)
    bb, info = convert.load_backbone(str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = bb(x, return_all_tokens=False)  # the k-NN feature
        torch.testing.assert_close(pooled, bb(x)[:, 0])
        feats = probe_features(bb.get_intermediate_layers(x, 1))  # linear probe, n = 1
        torch.testing.assert_close(feats, pooled)
        assert [o.shape[-1] for o in bb.get_intermediate_layers(x, 3)] == [64, 128, 128]
    import argparse
    rb = random_init_backbone(argparse.Namespace(arch="swin_nano", patch_size=4,
                                                 global_crops_size=64, window_size=7, seed=0),
                              torch.device("cpu"))
    assert isinstance(rb, SwinTransformer)
    with pytest.raises(ValueError, match="ViT backbones only"):
        attention.cls_attention_maps(bb, x[:1])
    with pytest.raises(SystemExit, match="ViT backbones only"):
        attention.main([str(path), "--checkpoint", str(path)])
