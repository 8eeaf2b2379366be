"""Vision Transformer backbone with masked-image-modelling support (iBOT / DINO flavour).

A pre-norm ViT in the DINO/timm layout, written so that checkpoint keys match the reference
(`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,
mlp.fc1,mlp.fc2}`, `norm`, `masked_embed`). Differences from the reference, all exact:

* attention goes through `F.scaled_dot_product_attention` (same maths as the explicit
  softmax(q kᵀ · d_h^-0.5) v; the probabilities are materialised only in
  `get_last_selfattention`);
* the mask token is written with `torch.where` instead of an in-place indexed write;
* a mask passed to `forward` is always applied (the reference ignores it unless the
  `masked_im_modeling` flag is on, and asserts one is given when it is).

Modules are created in the reference's order and `trunc_normal_` below uses the reference's
sampling algorithm, so a model built after `torch.manual_seed(s)` has the reference's initial
weights bit-for-bit (conv default init, then pos_embed, cls_token and every Linear in
registration order); drop path draws its per-sample coins the same way too.

Shapes: B images, C channels, H×W pixels, p patch size, h×w = (H/p)×(W/p) patch grid,
N = h·w patch tokens, T = 1 + N tokens, D embed dim, nh heads, dh = D / nh.
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

# Attention back ends a block can use. "sdpa" is the fast path; "math" is the explicit
# softmax(q kᵀ · scale) v reference that every other back end is tested against; xformers, flex
# and varlen (CUDA) are in models/packed.py, where check_attn_backend says what each needs.
from ibot_fast.models.packed import ALL_ATTN_BACKENDS as ATTN_BACKENDS


def trunc_normal_(tensor, std=0.02, a=-2.0, b=2.0):
    """Fill `tensor` from N(0, std²) truncated to [a, b], by inverse-CDF sampling.

    This is the algorithm of the reference (and of older torch): u ~ U(Φ(a/std), Φ(b/std)),
    x = std · Φ⁻¹(u) via erfinv. The torch installed here (2.13) samples nn.init.trunc_normal_
    by rejection instead, which draws from the random stream differently; keeping the inverse
    CDF makes a seeded model start from the reference's exact weights.
    """
    def cdf(x):  # standard normal CDF
        return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))

    if tensor.is_meta:  # shapes only (parameter counting); meta erfinv_ is slow to set up
        return tensor
    with torch.no_grad():
        # U(2Φ(a)-1, 2Φ(b)-1) then erfinv gives Φ⁻¹ up to the factor √2
        tensor.uniform_(2 * cdf(a / std) - 1, 2 * cdf(b / std) - 1)
        tensor.erfinv_()
        tensor.mul_(std * math.sqrt(2.0))
        return tensor.clamp_(min=a, max=b)


def init_linear(m: nn.Linear):
    """Linear layers of the ViT and the head: trunc-normal(std 0.02) weight, zero bias."""
    trunc_normal_(m.weight, std=0.02)
    if m.bias is not None:
        nn.init.zeros_(m.bias)


def init_weights(m: nn.Module):
    """The timm/DINO init rule of the backbones, for ``module.apply``: Linear trunc-normal(0.02)
    + zero bias; LayerNorm (1, 0); patch convolutions keep PyTorch's default init."""
    if isinstance(m, nn.Linear):
        init_linear(m)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _check_attn_backend(name):
    if name not in ATTN_BACKENDS:
        raise ValueError(f"unknown attn_backend {name!r}; valid: {', '.join(ATTN_BACKENDS)}")
    return name


def drop_path(x, drop_prob: float = 0.0, training: bool = False):
    """Stochastic depth: zero the residual branch of whole samples with probability drop_prob.

    Survivors are scaled by 1/keep so the expectation is unchanged. Identity in eval mode and
    for drop_prob == 0.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    # one draw per sample, broadcast over every other dim: [B, 1, 1, ...];
    # floor(keep + U[0, 1)) is 1 with probability keep. Drawn with torch.rand and applied as
    # x / keep · mask, like the reference, so a seeded run drops the same samples bit-for-bit.
    keep = (keep_prob + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1),
                                   dtype=x.dtype, device=x.device)).floor_()
    return x.div(keep_prob) * keep


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self):
        return f"drop_prob={self.drop_prob:.3f}"


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True, attn_backend="sdpa"):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.attn_backend = _check_attn_backend(attn_backend)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x):
        B, T, D = x.shape
        # [B, T, 3D] -> [B, T, 3, nh, dh] -> [3, B, nh, T, dh]
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def attention_probs(self, x):
        """softmax(q kᵀ · scale) for input x [B, T, D] -> [B, nh, T, T] (explicit, for analysis)."""
        q, k, _ = self._qkv(x)
        return ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self._qkv(x)  # each [B, nh, T, dh]
        # Back ends share inputs (q, k, v) and output [B, nh, T, dh]; add new ones here.
        if self.attn_backend == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        elif self.attn_backend == "math":
            o = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1) @ v
        else:  # xformers | flex | varlen: B sequences of T tokens as one packed stream
            from ibot_fast.models.packed import packed_attention
            return self.proj(packed_attention(self.qkv(x).reshape(B * T, 3 * D), ((B, T),),
                                              self.num_heads, self.scale,
                                              self.attn_backend).view(B, T, D))
        # [B, nh, T, dh] -> [B, T, nh, dh] -> [B, T, D]
        o = o.transpose(1, 2).reshape(B, T, D)
        return self.proj(o)


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0,
                 attn_backend="sdpa"):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_backend=attn_backend)
        # nn.Identity when the rate is 0 (as in the reference) so the teacher pays nothing.
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches -> D channels: [B, C, H, W] -> [B, D, H/p, W/p]."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x)


class VisionTransformer(nn.Module):
    """Pre-norm ViT returning normalised tokens; optional mask token for iBOT's MIM."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0,
                 masked_im_modeling=False, attn_backend="sdpa"):
        super().__init__()
        if isinstance(img_size, (list, tuple)):  # the reference passes img_size=[224]
            img_size = img_size[0]
        if img_size % patch_size != 0:
            raise ValueError(
                f"img_size {img_size} is not divisible by patch_size {patch_size}; "
                f"use a multiple of {patch_size} (e.g. {img_size // patch_size * patch_size})")
        self.num_features = self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.depth = depth
        self.attn_backend = _check_attn_backend(attn_backend)

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))

        # stochastic depth rises linearly from 0 (first block) to drop_path_rate (last block)
        # (on the CPU explicitly so the model can be built under `with torch.device("meta")`)
        dpr = [r.item() for r in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], attn_backend)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights)

        # Created after the init above so it stays exactly zero, as in the reference.
        self.masked_im_modeling = masked_im_modeling
        if masked_im_modeling:
            self.masked_embed = nn.Parameter(torch.zeros(1, embed_dim))

    def set_attn_backend(self, name):
        """Switch every block's attention back end (one of ATTN_BACKENDS)."""
        self.attn_backend = _check_attn_backend(name)
        for blk in self.blocks:
            blk.attn.attn_backend = name

    # ------------------------------------------------------------------ tokens
    def interpolate_pos_encoding(self, grid_h, grid_w, img_h, img_w):
        """Position embedding for an h×w patch grid -> [1, 1 + h·w, D].

        The stored table is for the square grid the model was built for. Any other grid, or a
        non-square image (the reference's test is on pixel sizes), gets the patch part resized
        bicubically with DINO's "+0.1" scale factors; the [CLS] entry is reused unchanged.
        Gradients flow into pos_embed through the interpolation.
        """
        n_native = self.pos_embed.shape[1] - 1
        if grid_h * grid_w == n_native and img_h == img_w:
            return self.pos_embed
        m = int(math.sqrt(n_native))
        dim = self.pos_embed.shape[-1]
        cls_pos = self.pos_embed[:, :1]  # [1, 1, D]
        # [1, m·m, D] -> [1, m, m, D] -> [1, D, m, m]
        grid = self.pos_embed[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
        # The +0.1 keeps floor(m · scale) from landing one short through float error
        # (facebookresearch/dino#8). The reference names the row count "w0" because it unpacks
        # `B, C, w, h = x.shape`, so the first factor is for rows, the second for columns.
        # The scale factor itself (not output/input) sets where bicubic samples, as on the
        # reference's torch 1.7, so passing scale_factor is what makes the values match.
        scale = ((grid_h + 0.1) / m, (grid_w + 0.1) / m)
        patch_pos = F.interpolate(grid, scale_factor=scale, mode="bicubic")
        if patch_pos.shape[-2:] != (grid_h, grid_w):
            # Cannot happen for realistic grids (floor(m · (g + 0.1) / m) == g); kept as a
            # guard so a rounding surprise gives the right size instead of a shape error.
            patch_pos = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic")
        # [1, D, h, w] -> [1, h, w, D] -> [1, h·w, D]  (row-major, like the patch tokens)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat((cls_pos, patch_pos), dim=1)

    def embed_patches(self, x, mask=None):
        """Patch tokens before [CLS] and position embedding: [B, C, H, W] -> [B, N, D].

        Where mask [B, h, w] (row-major like the conv output) is True, the token is replaced by
        masked_embed.
        """
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input of {H}x{W} px is not divisible by patch_size {p}")
        # [B, D, h, w] -> [B, D, N] -> [B, N, D]
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        if mask is not None:
            if not hasattr(self, "masked_embed"):
                raise ValueError(
                    "a mask was passed to a VisionTransformer built without "
                    "masked_im_modeling=True (it has no masked_embed); build the student with "
                    "masked_im_modeling=True or pass mask=None")
            gh, gw = H // p, W // p
            if tuple(mask.shape) != (B, gh, gw):
                raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {(B, gh, gw)} "
                                 f"(batch, H/patch, W/patch) for input {tuple(x.shape)}")
            # [B, h, w] -> [B, N, 1], broadcast against the [1, D] mask token
            m = mask.to(device=tokens.device, dtype=torch.bool).reshape(B, gh * gw, 1)
            tokens = torch.where(m, self.masked_embed.to(tokens.dtype), tokens)
        return tokens

    def prepare_tokens(self, x, mask=None):
        """[B, C, H, W] -> [B, 1 + N, D]: patch tokens (masked), [CLS] prepended, + pos embed."""
        B, _, H, W = x.shape
        tokens = self.embed_patches(x, mask)
        cls = self.cls_token.expand(B, -1, -1)  # [B, 1, D]
        tokens = torch.cat((cls, tokens), dim=1)
        p = self.patch_size
        return tokens + self.interpolate_pos_encoding(H // p, W // p, H, W)

    # ------------------------------------------------------------------ forward
    def forward(self, x, mask=None, return_all_tokens=True):
        """x [B, C, H, W], mask optional bool [B, H/p, W/p].

        Returns norm(tokens) [B, 1 + N, D] if return_all_tokens, else the [CLS] row [B, D].
        """
        x = self.prepare_tokens(x, mask)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x if return_all_tokens else x[:, 0]

    def get_intermediate_layers(self, x, n=1):
        """Outputs of the last n blocks, each passed through the final norm: list of [B, T, D]."""
        x = self.prepare_tokens(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= n:
                out.append(self.norm(x))
        return out

    def get_last_selfattention(self, x):
        """Attention probabilities of the last block: [B, nh, T, T] (computed explicitly)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        last = self.blocks[-1]
        return last.attn.attention_probs(last.norm1(x))

    def get_num_layers(self):
        return len(self.blocks)


# ---------------------------------------------------------------------- factories
def vit_nano(patch_size=16, **kwargs):
    """Not in the reference: a 4-block, 128-wide ViT for the 2-core CPU demo, where a
    vit_tiny step takes seconds and a few minutes buy too few steps to learn anything."""
    return VisionTransformer(patch_size=patch_size, embed_dim=128, depth=4, num_heads=4,
                             mlp_ratio=4.0, qkv_bias=True, **kwargs)


def vit_tiny(patch_size=16, **kwargs):
    return VisionTransformer(patch_size=patch_size, embed_dim=192, depth=12, num_heads=3,
                             mlp_ratio=4.0, qkv_bias=True, **kwargs)


def vit_small(patch_size=16, **kwargs):
    return VisionTransformer(patch_size=patch_size, embed_dim=384, depth=12, num_heads=6,
                             mlp_ratio=4.0, qkv_bias=True, **kwargs)


def vit_base(patch_size=16, **kwargs):
    return VisionTransformer(patch_size=patch_size, embed_dim=768, depth=12, num_heads=12,
                             mlp_ratio=4.0, qkv_bias=True, **kwargs)


def vit_large(patch_size=16, **kwargs):
    return VisionTransformer(patch_size=patch_size, embed_dim=1024, depth=24, num_heads=16,
                             mlp_ratio=4.0, qkv_bias=True, **kwargs)


ARCHS = {"vit_nano": vit_nano, "vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base,
         "vit_large": vit_large}


def build_vit(arch, patch_size=16, **kwargs):
    """Build a ViT by name; `deit_*` is accepted as an alias of `vit_*` (as in the reference)."""
    name = arch.replace("deit", "vit", 1) if arch.startswith("deit") else arch
    if name not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)} "
                         f"(deit_* is accepted as an alias of vit_*)")
    return ARCHS[name](patch_size=patch_size, **kwargs)
