"""Backbone, head and multi-crop wrapper: shapes, reference semantics, gradients.

Small shapes on the CPU: 32-px images with 8-px patches (a 4×4 grid), 16-px "local" crops.
"""
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ibot_fast.models import (ARCHS, IBOTHead, MultiCropWrapper, VisionTransformer,
                              WeightNormLinear, build_ibot_models, build_vit)
from ibot_fast.models import wrapper as wrapper_module
from ibot_fast.models.vit import drop_path, trunc_normal_

IMG, PATCH = 32, 8
GRID = IMG // PATCH  # 4


def small_vit(depth=2, **kw):
    """A 2-block ViT-Tiny-width model: fast, but every code path of the real one."""
    kw.setdefault("img_size", IMG)
    return VisionTransformer(patch_size=PATCH, embed_dim=48, depth=depth, num_heads=3, **kw)


def vit_param_count(D, depth, patch, img, in_chans=3):
    """Closed-form parameter count of the backbone (no head, no masked_embed)."""
    n = (img // patch) ** 2
    # norm1, qkv, proj, norm2, fc1, fc2
    per_block = (2 * D + (3 * D * D + 3 * D) + (D * D + D) + 2 * D
                 + (4 * D * D + 4 * D) + (4 * D * D + D))
    return (in_chans * patch * patch * D + D) + D + (1 + n) * D + depth * per_block + 2 * D


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------- factories
def test_vit_tiny_token_shapes():
    torch.manual_seed(0)
    m = build_vit("vit_tiny", patch_size=PATCH, img_size=IMG).eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert m(x).shape == (2, 1 + GRID * GRID, 192)
        assert m(x, return_all_tokens=False).shape == (2, 192)
        assert m(torch.randn(3, 3, 16, 16)).shape == (3, 1 + 4, 192)  # local-crop size
    assert (m.embed_dim, m.patch_size, m.num_heads, len(m.blocks)) == (192, PATCH, 3, 12)
    assert m.blocks[0].mlp.fc1.out_features == 4 * 192 and m.blocks[0].attn.qkv.bias is not None
    assert n_params(m) == vit_param_count(192, 12, PATCH, IMG)


@pytest.mark.parametrize("arch,D,depth,heads,count", [
    ("vit_nano", 128, 4, 4, 917_120),  # ours: the CPU demo's model
    ("vit_tiny", 192, 12, 3, 5_524_416),
    ("vit_small", 384, 12, 6, 21_665_664),
    ("vit_base", 768, 12, 12, 85_798_656),
    ("deit_large", 1024, 24, 16, 303_301_632),  # deit_* is an alias of vit_*
])
def test_factory_sizes_at_224(arch, D, depth, heads, count):
    # built on the meta device: shapes and counts without memory or init cost
    with torch.device("meta"):
        m = build_vit(arch)
    assert (m.embed_dim, len(m.blocks), m.num_heads, m.patch_size) == (D, depth, heads, 16)
    assert m.pos_embed.shape == (1, 1 + 196, D)
    assert n_params(m) == vit_param_count(D, depth, 16, 224) == count


def test_vit_small_is_21_7m_params():
    with torch.device("meta"):
        m = build_vit("vit_small", patch_size=16, img_size=224)
    assert abs(n_params(m) - 21.7e6) < 0.1e6  # ViT-S/16: 21.7 M parameters (docs/reference-semantics.md#backbone)
    with torch.device("meta"):
        mim = build_vit("vit_small", masked_im_modeling=True)
    assert n_params(mim) == n_params(m) + 384  # + masked_embed


def test_build_vit_errors():
    with pytest.raises(ValueError, match="vit_nano, vit_tiny, vit_small, vit_base, vit_large"):
        build_vit("vit_huge")
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        build_vit("vit_tiny", patch_size=16, img_size=40)
    assert set(ARCHS) == {"vit_nano", "vit_tiny", "vit_small", "vit_base", "vit_large"}
    with pytest.raises(ValueError, match="attn_backend"):
        small_vit(attn_backend="flash")


def test_trunc_normal_is_inverse_cdf_sampling():
    # the reference's algorithm: u ~ U(2Φ(a/σ)-1, 2Φ(b/σ)-1), x = σ√2 · erfinv(u), clamped
    torch.manual_seed(0)
    x = trunc_normal_(torch.empty(4000), std=0.02)
    torch.manual_seed(0)
    u = torch.empty(4000).uniform_(-1.0, 1.0)  # Φ(±100) rounds to 0 / 1 in float64
    torch.testing.assert_close(x, torch.erfinv(u) * (0.02 * math.sqrt(2.0)), rtol=0, atol=0)
    assert abs(x.std().item() - 0.02) < 0.001
    y = trunc_normal_(torch.empty(20000), std=1.0)  # truncation is visible at std 1
    assert y.abs().max() <= 2.0 and abs(y.std().item() - 0.880) < 0.02  # std of N(0,1)|[-2,2]


def test_init_matches_timm_rule():
    m = small_vit(masked_im_modeling=True)
    assert torch.count_nonzero(m.masked_embed) == 0  # created after init: stays zero
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear):
            assert torch.count_nonzero(mod.bias) == 0, name
            assert abs(mod.weight.std().item() - 0.02) < 0.004, name
        elif isinstance(mod, nn.LayerNorm):
            assert mod.eps == 1e-6
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0), name
    assert abs(m.pos_embed.std().item() - 0.02) < 0.004


# --------------------------------------------------------------------------- mask token
def random_mask(b, h=GRID, w=GRID, p=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, w, generator=g) < p


def test_mask_token_replaces_patch_embedding_before_pos_embed():
    torch.manual_seed(0)
    m = small_vit(masked_im_modeling=True)
    with torch.no_grad():
        m.masked_embed.normal_()  # non-zero so replacement is visible
    x = torch.randn(3, 3, IMG, IMG)
    mask = random_mask(3)
    assert 0 < mask.sum() < mask.numel()

    # hand computation: conv, flatten row-major, replace masked rows
    conv = F.conv2d(x, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=PATCH)
    tokens_ref = conv.flatten(2).transpose(1, 2)  # [B, N, D]
    flat = mask.flatten(1)  # [B, N]
    tokens = m.embed_patches(x, mask)
    torch.testing.assert_close(tokens[flat], m.masked_embed.expand(int(flat.sum()), -1),
                               rtol=0, atol=0)
    torch.testing.assert_close(tokens[~flat], tokens_ref[~flat])

    # masked tokens still get their position embedding; [CLS] is prepended unmasked
    tokens_ref[flat] = m.masked_embed.detach()
    expect = torch.cat((m.cls_token.expand(3, -1, -1), tokens_ref), 1) + m.pos_embed
    torch.testing.assert_close(m.prepare_tokens(x, mask), expect)

    # the mask changes the output only through those tokens
    out_masked, out_plain = m(x, mask), m(x)
    assert not torch.allclose(out_masked, out_plain)
    no_mask = torch.zeros_like(mask)
    torch.testing.assert_close(m(x, no_mask), out_plain, rtol=0, atol=0)


def test_mask_token_gradient_only_when_something_is_masked():
    torch.manual_seed(0)
    m = small_vit(masked_im_modeling=True)
    x = torch.randn(2, 3, IMG, IMG)
    m(x, random_mask(2)).square().sum().backward()
    assert m.masked_embed.grad is not None and m.masked_embed.grad.abs().sum() > 0

    m.zero_grad(set_to_none=True)
    m(x, torch.zeros(2, GRID, GRID, dtype=torch.bool)).square().sum().backward()
    assert m.masked_embed.grad is None or torch.count_nonzero(m.masked_embed.grad) == 0

    m.zero_grad(set_to_none=True)
    m(x).square().sum().backward()
    assert m.masked_embed.grad is None


def test_mask_errors():
    x = torch.randn(2, 3, IMG, IMG)
    with pytest.raises(ValueError, match="masked_embed"):
        small_vit()(x, random_mask(2))
    with pytest.raises(ValueError, match="mask has shape"):
        small_vit(masked_im_modeling=True)(x, random_mask(2, 3, 3))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        small_vit()(torch.randn(1, 3, 20, 32))


# --------------------------------------------------------------------------- position embedding
def test_pos_embed_identity_at_native_grid():
    m = small_vit()
    assert m.interpolate_pos_encoding(GRID, GRID, IMG, IMG) is m.pos_embed


def test_pos_embed_interpolation_shape_cls_and_gradient():
    torch.manual_seed(0)
    m = small_vit()
    pe = m.interpolate_pos_encoding(2, 2, 16, 16)  # 16-px crop: 2×2 grid
    assert pe.shape == (1, 1 + 4, 48)
    torch.testing.assert_close(pe[:, 0], m.pos_embed[:, 0], rtol=0, atol=0)
    # the "+0.1" scale factor, not output/input, sets the bicubic sample points (as on the
    # reference's torch): check against that call directly
    grid = m.pos_embed[:, 1:].reshape(1, GRID, GRID, 48).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, scale_factor=(2.1 / GRID, 2.1 / GRID), mode="bicubic")
    torch.testing.assert_close(pe[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 4, 48))
    size_only = F.interpolate(grid, size=(2, 2), mode="bicubic")
    assert not torch.allclose(ref, size_only)  # so the test above can tell them apart

    out = m(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 5, 48)
    out.square().sum().backward()
    assert m.pos_embed.grad[0, 1:].abs().sum() > 0 and m.pos_embed.grad[0, 0].abs().sum() > 0


def test_pos_embed_non_square_orientation():
    """Rows of the pos grid must follow image rows: a table that varies only with the row
    index must still vary only with the row index after resizing to a non-square grid."""
    m = small_vit()
    with torch.no_grad():
        rows = torch.arange(GRID, dtype=torch.float32).view(GRID, 1, 1).expand(GRID, GRID, 48)
        m.pos_embed[0, 1:] = rows.reshape(GRID * GRID, 48)
    pe = m.interpolate_pos_encoding(2, 6, 16, 48)  # 16×48 px -> 2 rows × 6 cols
    assert pe.shape == (1, 1 + 12, 48)
    g = pe[0, 1:, 0].reshape(2, 6)
    torch.testing.assert_close(g, g[:, :1].expand(2, 6))  # constant along each row
    assert g[1, 0] > g[0, 0] + 1  # and increasing down the rows
    assert m(torch.randn(1, 3, 16, 48)).shape == (1, 13, 48)


# --------------------------------------------------------------------------- attention
def explicit_block(blk, x):
    """The block written out with an explicit softmax(q kᵀ · d_h^-0.5) v."""
    B, T, D = x.shape
    nh, dh = blk.attn.num_heads, D // blk.attn.num_heads
    h = F.layer_norm(x, (D,), blk.norm1.weight, blk.norm1.bias, 1e-6)
    qkv = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(B, T, 3, nh, dh)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, nh, T, dh]
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
    a = (probs @ v).transpose(1, 2).reshape(B, T, D)
    x = x + F.linear(a, blk.attn.proj.weight, blk.attn.proj.bias)
    h = F.layer_norm(x, (D,), blk.norm2.weight, blk.norm2.bias, 1e-6)
    h = F.linear(F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias)),
                 blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    return x + h, probs


def perturb_(m):
    """Random values in every parameter (LayerNorm affine and biases included)."""
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_attention_backends_match_explicit_softmax(backend):
    torch.manual_seed(0)
    m = small_vit()
    perturb_(m)
    m.set_attn_backend(backend)
    blk = m.blocks[0]
    x = torch.randn(2, 17, 48, requires_grad=True)
    y = blk(x)
    y_ref, _ = explicit_block(blk, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)


def test_last_selfattention_and_intermediate_layers():
    torch.manual_seed(0)
    m = small_vit(depth=3)
    perturb_(m)
    x = torch.randn(2, 3, IMG, IMG)
    attn = m.get_last_selfattention(x)
    assert attn.shape == (2, 3, 17, 17)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 17))
    h = m.prepare_tokens(x)
    for blk in m.blocks[:-1]:
        h = blk(h)
    _, probs_ref = explicit_block(m.blocks[-1], h)
    torch.testing.assert_close(attn, probs_ref, rtol=1e-5, atol=1e-6)

    layers = m.get_intermediate_layers(x, n=2)
    assert len(layers) == 2 and layers[0].shape == (2, 17, 48)
    torch.testing.assert_close(layers[-1], m(x), rtol=0, atol=0)
    torch.testing.assert_close(layers[0], m.norm(m.blocks[1](m.blocks[0](m.prepare_tokens(x)))))


# --------------------------------------------------------------------------- drop path
def test_drop_path_identity_in_eval_and_at_rate_zero():
    torch.manual_seed(0)
    m = small_vit(depth=4, drop_path_rate=0.5)
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0
             for b in m.blocks]
    assert rates == pytest.approx([0.0, 0.5 / 3, 1.0 / 3, 0.5])  # linear rise over depth
    assert isinstance(m.blocks[0].drop_path, nn.Identity)

    plain = small_vit(depth=4)  # rate 0
    plain.load_state_dict(m.state_dict())
    x = torch.randn(4, 3, IMG, IMG)
    m.eval()
    torch.testing.assert_close(m(x), plain.eval()(x), rtol=0, atol=0)
    plain.train()
    torch.testing.assert_close(plain(x), m(x), rtol=0, atol=0)  # rate 0 in train mode
    m.train()
    assert not torch.allclose(m(x), plain(x))  # it does something when on


def test_drop_path_is_per_sample():
    torch.manual_seed(0)
    y = drop_path(torch.ones(2000, 5, 3), 0.25, training=True)
    per_sample = y.flatten(1)
    # every sample is either dropped entirely or kept and scaled by 1/keep
    assert torch.all((per_sample == per_sample[:, :1]).all(1))
    values = per_sample[:, 0].unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.75)
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.25) < 0.04


# --------------------------------------------------------------------------- head
def test_weight_norm_linear_matches_torch_weight_norm():
    torch.manual_seed(0)
    wn = WeightNormLinear(16, 10)
    assert wn.weight_g.shape == (10, 1) and wn.weight_v.shape == (10, 16)
    assert torch.all(wn.weight_g == 1)
    torch.manual_seed(0)
    torch.testing.assert_close(wn.weight_v, nn.Linear(16, 10, bias=False).weight, rtol=0, atol=0)

    with torch.no_grad():
        wn.weight_g.uniform_(0.5, 2.0)
    ref = torch.nn.utils.parametrizations.weight_norm(nn.Linear(16, 10, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(wn.weight_g)  # g
        ref.parametrizations.weight.original1.copy_(wn.weight_v)  # v
    x = torch.randn(7, 16)
    y, y_ref = wn(x), ref(x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(wn.weight(), ref.weight)
    # the hand formula too: row k is g_k · v_k / ||v_k||
    torch.testing.assert_close(
        wn.weight(), wn.weight_g * wn.weight_v / wn.weight_v.norm(dim=1, keepdim=True))
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (wn.weight_g, wn.weight_v), g)
    grads_ref = torch.autograd.grad(y_ref, (ref.parametrizations.weight.original0,
                                            ref.parametrizations.weight.original1), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_weight_norm_linear_loads_legacy_state_dict():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy API is deprecated
        legacy = nn.utils.weight_norm(nn.Linear(12, 6, bias=False))
    with torch.no_grad():
        legacy.weight_g.uniform_(0.5, 2.0)
    wn = WeightNormLinear(12, 6)
    assert list(wn.state_dict()) == list(legacy.state_dict())  # same names, same order
    wn.load_state_dict(legacy.state_dict())
    x = torch.randn(3, 12)
    torch.testing.assert_close(wn(x), legacy(x))


def test_head_structure_init_and_frozen_g():
    torch.manual_seed(0)
    h = IBOTHead(48, 64, patch_out_dim=32, hidden_dim=40, bottleneck_dim=16)
    linears = [m for m in h.mlp if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(48, 40), (40, 40), (40, 16)]
    assert isinstance(h.mlp[1], nn.GELU) and isinstance(h.mlp[3], nn.GELU)
    assert all(torch.count_nonzero(l.bias) == 0 for l in linears)
    assert {"mlp.0.weight", "mlp.2.weight", "mlp.4.weight"} <= set(h.state_dict())
    assert not h.last_layer.weight_g.requires_grad and not h.last_layer2.weight_g.requires_grad
    assert h.last_layer.weight_v.requires_grad
    assert h.last_layer2 is not h.last_layer and h.last_layer2.weight_v.shape == (32, 16)

    free = IBOTHead(48, 64, patch_out_dim=32, hidden_dim=40, bottleneck_dim=16,
                    norm_last_layer=False)
    assert free.last_layer.weight_g.requires_grad and free.last_layer2.weight_g.requires_grad
    one = IBOTHead(48, 64, nlayers=1, bottleneck_dim=16)
    assert isinstance(one.mlp, nn.Linear) and one.mlp.out_features == 16


def test_shared_head_is_one_module_with_two_keys():
    h = IBOTHead(48, 64, patch_out_dim=999, hidden_dim=40, bottleneck_dim=16, shared_head=True)
    assert h.last_layer2 is h.last_layer
    keys = set(h.state_dict())
    assert {"last_layer.weight_g", "last_layer.weight_v",
            "last_layer2.weight_g", "last_layer2.weight_v"} <= keys
    names = [n for n, _ in h.named_parameters()]
    assert "last_layer.weight_v" in names and not any(n.startswith("last_layer2") for n in names)
    cls, patch = h(torch.randn(2, 5, 48))
    assert patch.shape == (2, 4, 64)  # patch logits in the [CLS] prototype space


def test_head_outputs_3d_and_2d():
    torch.manual_seed(0)
    h = IBOTHead(48, 64, patch_out_dim=32, hidden_dim=40, bottleneck_dim=16)
    x = torch.randn(3, 5, 48)
    cls, patch = h(x)
    assert cls.shape == (3, 64) and patch.shape == (3, 4, 32)

    z = h.mlp(x)
    z = z / z.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(h.bottleneck(x), z)
    torch.testing.assert_close(h.bottleneck(x).norm(dim=-1), torch.ones(3, 5))
    w1, w2 = h.last_layer.weight(), h.last_layer2.weight()
    torch.testing.assert_close(cls, z[:, 0] @ w1.T)
    torch.testing.assert_close(patch, z[:, 1:] @ w2.T)
    assert cls.abs().max() <= 1 + 1e-6  # g == 1: cosine similarities

    cls_2d = h(x[:, 0])
    assert cls_2d.shape == (3, 64)
    torch.testing.assert_close(cls_2d, cls)
    with pytest.raises(ValueError, match="IBOTHead expects"):
        h(torch.randn(2, 3, 4, 48))


# --------------------------------------------------------------------------- wrapper
def small_wrapper(masked=True):
    torch.manual_seed(0)
    backbone = small_vit(masked_im_modeling=masked)
    with torch.no_grad():
        if masked:
            backbone.masked_embed.normal_()
    head = IBOTHead(48, 64, patch_out_dim=32, hidden_dim=40, bottleneck_dim=16)
    return MultiCropWrapper(backbone, head).eval()


def test_wrapper_crop_major_equals_separate_runs():
    w = small_wrapper()
    crops = [torch.randn(2, 3, IMG, IMG) for _ in range(2)]
    masks = [random_mask(2, seed=1), random_mask(2, seed=2)]
    (cls, patch), feats = w(crops, mask=masks, return_backbone_feat=True)
    assert cls.shape == (4, 64) and patch.shape == (4, 16, 32) and feats.shape == (4, 17, 48)

    sep = [w.head(w.backbone(c, m)) for c, m in zip(crops, masks)]
    torch.testing.assert_close(cls, torch.cat([s[0] for s in sep]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(patch, torch.cat([s[1] for s in sep]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feats, torch.cat([w.backbone(c, m) for c, m in zip(crops, masks)]),
                               rtol=1e-5, atol=1e-6)
    # a single tensor is a list of one
    cls1, _ = w(crops[0], mask=masks[0])
    torch.testing.assert_close(cls1, sep[0][0], rtol=1e-5, atol=1e-6)


def test_wrapper_runs_backbone_once_per_size_group():
    w = small_wrapper(masked=False)
    calls = []
    w.backbone.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    crops = [torch.randn(2, 3, s, s) for s in (IMG, IMG, 16, 16, 16)]
    out = w(crops, return_all_tokens=False)  # [CLS] only: sizes may mix
    assert calls == [(4, 3, IMG, IMG), (6, 3, 16, 16)]
    assert out.shape == (10, 64)
    ref = torch.cat([w.head(w.backbone(c, return_all_tokens=False)) for c in crops])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match="token counts"):
        w(crops)  # all tokens: 17 vs 5 per image cannot be concatenated
    with pytest.raises(ValueError, match="masks for"):
        w(crops, mask=[None])


# --------------------------------------------------------------------------- student / teacher
@pytest.mark.parametrize("shared_head,shared_head_teacher,real_arch",
                         [(False, True, True), (True, True, False), (False, False, False)])
def test_build_ibot_models(shared_head, shared_head_teacher, real_arch, monkeypatch):
    calls = []
    if not real_arch:
        # ViT-Tiny's trunc-normal init alone costs ~1 s per model on a CPU; the pairing logic
        # is the same with a 2-block backbone, so swap it in and record the build arguments.
        def fake_build_vit(arch, patch_size, **kw):
            calls.append((arch, patch_size, kw))
            return VisionTransformer(patch_size=patch_size, embed_dim=48, depth=2, num_heads=3,
                                     **kw)
        monkeypatch.setattr(wrapper_module, "build_vit", fake_build_vit)
    torch.manual_seed(0)
    student, teacher = build_ibot_models("vit_tiny", PATCH, IMG, out_dim=64, patch_out_dim=64,
                                         shared_head=shared_head,
                                         shared_head_teacher=shared_head_teacher,
                                         norm_last_layer=False)
    if real_arch:
        assert student.backbone.embed_dim == teacher.backbone.embed_dim == 192
    else:
        assert calls == [
            ("vit_tiny", PATCH, dict(img_size=IMG, drop_path_rate=0.1, masked_im_modeling=True)),
            ("vit_tiny", PATCH, dict(img_size=IMG, drop_path_rate=0.0))]
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not hasattr(teacher.backbone, "masked_embed")
    assert torch.count_nonzero(student.backbone.masked_embed) == 0
    assert student.backbone.blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    assert all(isinstance(b.drop_path, nn.Identity) for b in teacher.backbone.blocks)
    assert student.head.last_layer.weight_g.requires_grad  # norm_last_layer=False
    assert (teacher.head.last_layer2 is teacher.head.last_layer) == shared_head_teacher

    s_sd, t_sd = student.state_dict(), teacher.state_dict()
    assert set(s_sd) - set(t_sd) == {"backbone.masked_embed"}
    for k, v in t_sd.items():
        src = k
        if shared_head_teacher and not shared_head and k.startswith("head.last_layer."):
            # the teacher's one layer got both student keys; last_layer2 was loaded last
            src = k.replace("head.last_layer.", "head.last_layer2.")
        torch.testing.assert_close(v, s_sd[src], rtol=0, atol=0, msg=k)

    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        (s_cls, _), s_feat = student.eval()(x, return_backbone_feat=True)
        (t_cls, _), t_feat = teacher(x, return_backbone_feat=True)
        if shared_head_teacher and not shared_head:  # teacher [CLS] layer = student patch layer
            s_cls = student.head.last_layer2(student.head.bottleneck(s_feat[:, 0]))
    torch.testing.assert_close(s_feat, t_feat)  # same weights, no mask
    torch.testing.assert_close(s_cls, t_cls)


def test_build_ibot_models_rejects_mismatched_patch_dim():
    with pytest.raises(ValueError, match="patch_out_dim"):
        build_ibot_models("vit_tiny", PATCH, IMG, out_dim=64, patch_out_dim=32,
                          shared_head=False, shared_head_teacher=True)
