"""Swin Transformer backbone for iBOT (``--arch swin_tiny|swin_small|swin_base|swin_large``).

A hierarchical backbone: 4-px patch embedding (+ LayerNorm), four stages of window-attention
blocks with a relative position bias, every second block on windows shifted by half a window,
and a patch merging (2×2 neighbours -> one token of twice the width) between stages. The
checkpoint keys are the reference's (``patch_embed.{proj,norm}``,
``layers.{s}.blocks.{j}.{norm1,attn.{qkv,proj,relative_position_bias_table,
relative_position_index},norm2,mlp.fc1,mlp.fc2}``, ``layers.{s}.downsample.{reduction,norm}``,
``norm``, ``masked_embed``), so its files load as they are.

What the backbone computes, as the reference does (the parity tests check it in fp64):

* Window sizes are fixed when the model is built, from the global crop size (``img_size``):
  stage s has the grid ``(img_size / 4) // 2^s``; where that grid is not larger than the
  window, the window shrinks to the grid and the stage does not shift. Local crops run through
  the same windows.
* A grid that is not a multiple of the window is zero-padded (after ``norm1``) on the bottom
  and right; the padded tokens take part in the attention as keys, as in the reference (they
  are not masked out). A shifted block's attention mask adds -100 (not -inf) between tokens of
  different regions of the rolled, padded grid.
* Patch merging pads an odd grid with a zero row / column first.
* MIM: the mask comes on a coarser grid (one cell per final-stage token, 32 px); it is repeated
  up to the patch-embedding grid and those embeddings are replaced by ``masked_embed``.
* Output for the head: ``norm`` over the final-stage tokens, their average in the [CLS] slot:
  ``[B, 1 + N, D]`` (N final-stage tokens, D = ``num_features``).

Attention goes through ``F.scaled_dot_product_attention`` with the relative position bias (plus
the shift mask) as the additive ``attn_mask``; ``set_attn_backend("math")`` switches to the
explicit softmax. Packing crops (``models/packed.py``) is ViT-only.

Shapes: B images, H×W a stage's token grid, C its width, ws window side, Hp×Wp the grid padded
to multiples of ws, nW = (Hp/ws)·(Wp/ws) windows, n = ws² tokens per window, nh heads,
dh = C / nh.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ibot_fast.models.vit import DropPath, Mlp, init_weights, trunc_normal_

SWIN_ATTN_BACKENDS = ("sdpa", "math")
SWIN_PATCH_SIZE = 4
# The MIM mask grid: one cell per final-stage token (patch 4 × 2³ merges = 32 px)
SWIN_MASK_CELL = SWIN_PATCH_SIZE * 8
SHIFT_MASK_VALUE = -100.0  # the reference's value between regions (not -inf)


# ------------------------------------------------------------------------------ window helpers
def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """[B, H, W, C] (H, W multiples of ws) -> [B·nW, ws·ws, C], windows row-major."""
    B, H, W, C = x.shape
    # [B, H/ws, ws, W/ws, ws, C] -> [B, H/ws, W/ws, ws, ws, C]
    x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B * (H // ws) * (W // ws), ws * ws, C)


def window_reverse(windows: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: [B·nW, ws·ws, C] -> [B, H, W, C]."""
    C = windows.shape[-1]
    B = windows.shape[0] // ((H // ws) * (W // ws))
    x = windows.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


def relative_position_index(wh: int, ww: int) -> torch.Tensor:
    """[n, n] long, n = wh·ww: for query token i=(yi, xi) and key j=(yj, xj) of a window, the
    row of the bias table for the offset (yi - yj, xi - xj), offsets shifted to start at 0:
    (yi - yj + wh - 1) · (2·ww - 1) + (xi - xj + ww - 1)."""
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)  # [n]
    dy = ys[:, None] - ys[None, :] + (wh - 1)  # [n, n] in [0, 2wh-2]
    dx = xs[:, None] - xs[None, :] + (ww - 1)  # [n, n] in [0, 2ww-2]
    return dy * (2 * ww - 1) + dx


def shift_attn_mask(Hp: int, Wp: int, ws: int, shift: int, dtype=torch.float32,
                    device=None) -> torch.Tensor:
    """Additive mask of a shifted block: [nW, n, n], 0 where query and key come from the same
    region of the rolled grid, -100 elsewhere.

    After rolling the padded Hp×Wp grid up/left by ``shift``, the last window row / column
    holds tokens from three strips along each axis: [0, Hp-ws), [Hp-ws, Hp-shift), [Hp-shift,
    Hp) (likewise for columns); a region is one (row strip, column strip) pair."""
    def strip(L):  # [L]: 0, 1 or 2 by the strip a coordinate of the rolled grid lies in
        c = torch.arange(L, device=device)
        return (c >= L - ws).long() + (c >= L - shift).long()

    region = strip(Hp)[:, None] * 3 + strip(Wp)[None, :]  # [Hp, Wp]
    win = window_partition(region[None, :, :, None], ws)[..., 0]  # [nW, n]
    same = win[:, :, None] == win[:, None, :]  # [nW, n, n]
    return torch.zeros(same.shape, dtype=dtype, device=device).masked_fill_(
        ~same, SHIFT_MASK_VALUE)


def _check_backend(name: str) -> str:
    if name not in SWIN_ATTN_BACKENDS:
        raise ValueError(f"attn_backend {name!r} is not available for Swin; choose one of "
                         f"{', '.join(SWIN_ATTN_BACKENDS)}")
    return name


# ------------------------------------------------------------------------------------ modules
class WindowAttention(nn.Module):
    """Multi-head self-attention inside ws×ws windows with a learned relative position bias
    (one value per head and offset: table [(2ws-1)², nh])."""

    def __init__(self, dim, ws, num_heads, qkv_bias=True, attn_backend="sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.ws, self.num_heads = ws, num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.attn_backend = _check_backend(attn_backend)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * ws - 1) ** 2, num_heads))
        # persistent, as in the reference: its checkpoints hold it
        self.register_buffer("relative_position_index", relative_position_index(ws, ws))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def position_bias(self) -> torch.Tensor:
        """[nh, n, n]: the bias table looked up at every (query, key) offset."""
        n = self.ws * self.ws
        idx = self.relative_position_index.reshape(-1)
        return self.relative_position_bias_table[idx].view(n, n, -1).permute(2, 0, 1)

    def _scores_mask(self, x, shift_mask):
        """The additive attention mask [1 or nW, nh, n, n]: bias (+ shift mask)."""
        bias = self.position_bias().to(x.dtype).unsqueeze(0)  # [1, nh, n, n]
        if shift_mask is not None:
            bias = bias + shift_mask.to(x.dtype).unsqueeze(1)  # [nW, nh, n, n]
        return bias

    def _qkv(self, x, nW):
        Bw, n, C = x.shape  # Bw = B·nW
        # [Bw, n, 3C] -> [B, nW, n, 3, nh, dh] -> [3, B, nW, nh, n, dh]
        qkv = self.qkv(x).view(Bw // nW, nW, n, 3, self.num_heads, self.head_dim)
        return qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)

    def forward(self, x, nW: int, shift_mask=None):
        """x [B·nW, n, C] (windows of each image consecutive); shift_mask [nW, n, n] or None."""
        Bw, n, C = x.shape
        B, nh = Bw // nW, self.num_heads
        q, k, v = self._qkv(x, nW)  # each [B, nW, nh, n, dh]
        mask = self._scores_mask(x, shift_mask)  # [1 or nW, nh, n, n]
        if self.attn_backend == "sdpa":
            # 4-D for the fused kernels: windows and heads share one axis, [B, nW·nh, n, dh];
            # the mask [1, nW·nh, n, n] broadcasts over the images
            q, k, v = (t.reshape(B, nW * nh, n, self.head_dim) for t in (q, k, v))
            mask = mask.expand(nW, nh, n, n).reshape(1, nW * nh, n, n)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
            o = o.view(B, nW, nh, n, self.head_dim)
        else:  # math: the explicit softmax(q kᵀ · scale + mask) v
            o = ((q * self.scale) @ k.transpose(-2, -1) + mask).softmax(dim=-1) @ v
        # [B, nW, nh, n, dh] -> [B, nW, n, nh, dh] -> [B·nW, n, C]
        return self.proj(o.transpose(2, 3).reshape(Bw, n, C))

    def attention_probs(self, x, nW: int, shift_mask=None):
        """softmax(q kᵀ · scale + mask): [B, nW, nh, n, n] (explicit, for analysis)."""
        q, k, _ = self._qkv(x, nW)
        return ((q * self.scale) @ k.transpose(-2, -1) + self._scores_mask(x, shift_mask)
                ).softmax(dim=-1)


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention block on a B×H×W grid of C-wide tokens."""

    def __init__(self, dim, num_heads, ws, shift, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0,
                 attn_backend="sdpa"):
        super().__init__()
        if not 0 <= shift < ws:
            raise ValueError(f"shift {shift} must be in [0, window {ws})")
        self.ws, self.shift = ws, shift
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = WindowAttention(dim, ws, num_heads, qkv_bias, attn_backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self._masks: dict = {}  # (Hp, Wp, dtype, device) -> shift mask; not state

    def shift_mask(self, Hp, Wp, dtype, device):
        if self.shift == 0:
            return None
        key = (Hp, Wp, dtype, device)
        if key not in self._masks:
            self._masks[key] = shift_attn_mask(Hp, Wp, self.ws, self.shift, dtype, device)
        return self._masks[key]

    def _windows(self, x, H, W):
        """norm1, pad, roll, partition: [B, H·W, C] -> (windows [B·nW, n, C], Hp, Wp)."""
        B, L, C = x.shape
        ws, s = self.ws, self.shift
        x = self.norm1(x).view(B, H, W, C)
        # zero-pad bottom / right to multiples of the window (after the norm, as the reference)
        pad_h, pad_w = (-H) % ws, (-W) % ws
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        return window_partition(x, ws), Hp, Wp

    def forward(self, x, H: int, W: int):
        """x [B, H·W, C] -> [B, H·W, C]."""
        B, L, C = x.shape
        ws, s = self.ws, self.shift
        win, Hp, Wp = self._windows(x, H, W)  # [B·nW, n, C]
        nW = (Hp // ws) * (Wp // ws)
        a = self.attn(win, nW, self.shift_mask(Hp, Wp, x.dtype, x.device))
        a = window_reverse(a, ws, Hp, Wp)  # [B, Hp, Wp, C]
        if s:
            a = torch.roll(a, shifts=(s, s), dims=(1, 2))
        a = a[:, :H, :W].reshape(B, L, C)
        x = x + self.drop_path(a)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def attention_probs(self, x, H: int, W: int):
        """This block's attention probabilities for input x: [B, nW, nh, n, n]."""
        win, Hp, Wp = self._windows(x, H, W)
        nW = (Hp // self.ws) * (Wp // self.ws)
        return self.attn.attention_probs(win, nW, self.shift_mask(Hp, Wp, x.dtype, x.device))


class PatchMerging(nn.Module):
    """2×2 neighbouring tokens -> one of twice the width: [B, H·W, C] -> [B, ⌈H/2⌉·⌈W/2⌉, 2C]
    (an odd grid is zero-padded at the bottom / right first)."""

    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim, eps=1e-6)

    def forward(self, x, H: int, W: int):
        B, L, C = x.shape
        x = x.view(B, H, W, C)
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        # channel order of the reference: (0,0), (1,0), (0,1), (1,1) as (row, column) offsets
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      dim=-1)  # [B, H', W', 4C]
        Ho, Wo = x.shape[1], x.shape[2]
        return self.reduction(self.norm(x.view(B, Ho * Wo, 4 * C))), Ho, Wo


class SwinStage(nn.Module):
    """``depth`` blocks (odd ones shifted) then, except in the last stage, a patch merging."""

    def __init__(self, dim, depth, num_heads, ws, drop_paths, mlp_ratio=4.0, qkv_bias=True,
                 downsample=True, shifts=True, attn_backend="sdpa"):
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinBlock(dim, num_heads, ws, ws // 2 if shifts and i % 2 else 0, mlp_ratio,
                      qkv_bias, drop_paths[i], attn_backend)
            for i in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x, H, W, features: list | None = None):
        for blk in self.blocks:
            x = blk(x, H, W)
            if features is not None:
                features.append(x)
        if self.downsample is not None:
            x, H, W = self.downsample(x, H, W)
        return x, H, W


class PatchEmbed(nn.Module):
    """p×p patches -> D channels, LayerNorm over D: [B, 3, H, W] -> [B, D, H/p, W/p]."""

    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, x):
        x = self.proj(x)  # [B, D, h, w]
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def stage_windows(img_size: int, patch_size: int, window_size: int, n_stages: int):
    """(window, shifts?) of each stage, decided on the grid of an ``img_size`` crop:
    a window not smaller than the stage's grid becomes the grid, without shift."""
    out = []
    for s in range(n_stages):
        res = (img_size // patch_size) // 2 ** s
        out.append((res, False) if res <= window_size else (window_size, True))
    return out


class SwinTransformer(nn.Module):
    """Swin backbone returning ``[B, 1 + N, D]``: average-pooled final tokens, then the tokens.

    ``img_size``: the global crop side the windows are sized for (see module docstring).
    """

    def __init__(self, img_size=224, patch_size=SWIN_PATCH_SIZE, in_chans=3, embed_dim=96,
                 depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0,
                 qkv_bias=True, drop_path_rate=0.0, masked_im_modeling=False,
                 attn_backend="sdpa"):
        super().__init__()
        if isinstance(img_size, (list, tuple)):
            img_size = img_size[0]
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        if len(depths) != len(num_heads):
            raise ValueError("depths and num_heads need one entry per stage")
        n = len(depths)
        cell = patch_size * 2 ** (n - 1)
        if img_size % cell:
            raise ValueError(f"img_size {img_size} is not divisible by {cell} (patch size "
                             f"{patch_size} × {2 ** (n - 1)} merges)")
        self.patch_size, self.img_size, self.window_size = patch_size, img_size, window_size
        self.mask_cell = cell
        self.depths, self.widths = tuple(depths), [embed_dim * 2 ** s for s in range(n)]
        self.num_features = self.embed_dim = self.widths[-1]  # D of the output tokens
        self.attn_backend = _check_backend(attn_backend)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        dpr = [r.item() for r in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        self.layers = nn.ModuleList()
        for s, (ws, shifts) in enumerate(stage_windows(img_size, patch_size, window_size, n)):
            first = sum(depths[:s])
            self.layers.append(SwinStage(
                self.widths[s], depths[s], num_heads[s], ws, dpr[first:first + depths[s]],
                mlp_ratio, qkv_bias, downsample=s < n - 1, shifts=shifts,
                attn_backend=attn_backend))
        self.norm = nn.LayerNorm(self.num_features, eps=1e-6)
        self.apply(init_weights)

        # after the init, so it stays exactly zero (as in the reference)
        self.masked_im_modeling = masked_im_modeling
        if masked_im_modeling:
            self.masked_embed = nn.Parameter(torch.zeros(1, embed_dim))

    def set_attn_backend(self, name):
        self.attn_backend = _check_backend(name)
        for m in self.modules():
            if isinstance(m, WindowAttention):
                m.attn_backend = name

    def get_num_layers(self):
        return sum(self.depths)

    def token_grid(self, H: int, W: int) -> tuple[int, int]:
        """Final-stage grid of an H×W px input (each merge rounds an odd side up)."""
        h, w = H // self.patch_size, W // self.patch_size
        for _ in range(len(self.layers) - 1):
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w

    # ---------------------------------------------------------------------------- forward
    def embed(self, x, mask=None):
        """[B, 3, H, W] -> (patch embeddings [B, h·w, C0], h, w); where the mask (one cell per
        final-stage token, [B, mh, mw]) is True, the cell's patches become masked_embed."""
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input of {H}x{W} px is not divisible by patch_size {p}")
        x = self.patch_embed(x)  # [B, C0, h, w]
        h, w = x.shape[-2:]
        if mask is not None:
            if not hasattr(self, "masked_embed"):
                raise ValueError("a mask was passed to a SwinTransformer built without "
                                 "masked_im_modeling=True (it has no masked_embed)")
            if mask.dim() != 3 or mask.shape[0] != B or h % mask.shape[1] or w % mask.shape[2]:
                raise ValueError(f"mask has shape {tuple(mask.shape)}; expected [{B}, mh, mw] "
                                 f"with mh, mw dividing the {h}x{w} patch grid (for Swin one "
                                 f"cell per final-stage token: {self.token_grid(H, W)})")
            rh, rw = h // mask.shape[1], w // mask.shape[2]
            # [B, mh, mw] -> [B, h, w] (each cell repeated rh×rw) -> [B, 1, h, w]
            m = mask.to(device=x.device, dtype=torch.bool)
            m = m.repeat_interleave(rh, 1).repeat_interleave(rw, 2)[:, None]
            x = torch.where(m, self.masked_embed.to(x.dtype)[0, :, None, None], x)
        return x.flatten(2).transpose(1, 2), h, w  # [B, h·w, C0]

    def forward(self, x, mask=None, return_all_tokens=True):
        """x [B, 3, H, W], mask optional bool [B, mh, mw] (32-px cells). Returns
        [B, 1 + N, D] (pooled, then the normed final-stage tokens) or the pooled [B, D]."""
        x, H, W = self.embed(x, mask)
        for layer in self.layers:
            x, H, W = layer(x, H, W)
        tokens = self.norm(x)  # [B, N, D]
        pooled = tokens.mean(dim=1)  # [B, D]
        if not return_all_tokens:
            return pooled
        return torch.cat([pooled.unsqueeze(1), tokens], dim=1)

    def get_intermediate_layers(self, x, n=1):
        """The outputs of the last n blocks, each as [B, 1 + L, C] (average in the [CLS]
        slot; the final stage's blocks through ``norm``), as the reference's Swin gives them."""
        if not 1 <= n <= self.get_num_layers():
            raise ValueError(f"n must be in 1..{self.get_num_layers()}, got {n}")
        x, H, W = self.embed(x)
        feats: list = []
        for layer in self.layers:
            x, H, W = layer(x, H, W, feats)
        out = []
        last_stage_start = self.get_num_layers() - self.depths[-1]
        for i, f in enumerate(feats[-n:], start=len(feats) - n):
            f = self.norm(f) if i >= last_stage_start else f
            out.append(torch.cat([f.mean(1, keepdim=True), f], dim=1))
        return out

    def get_last_selfattention(self, x):
        raise NotImplementedError(
            "attention maps are for ViT backbones: Swin has no [CLS] token to attend from "
            "(its [CLS] slot is an average of the final tokens) and attends within windows; "
            "SwinBlock.attention_probs gives a block's window attention")


# ---------------------------------------------------------------------------------- factories
# The reference's widths; drop_path: the reference's factory default (main_ibot passes no
# --drop_path to a Swin student); ibot_fast takes --drop_path for every arch.
SWIN_CONFIGS = {
    "swin_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin_base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "swin_large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    # not in the reference: a tiny Swin for tests (every stage has a shifted block)
    "swin_nano": dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)),
}
REFERENCE_SWIN_DROP_PATH = {"swin_tiny": 0.1, "swin_small": 0.2, "swin_base": 0.2,
                            "swin_large": 0.2}
SWIN_ARCHS = tuple(SWIN_CONFIGS)


def is_swin(arch_or_model) -> bool:
    if isinstance(arch_or_model, str):
        return arch_or_model.startswith("swin")
    return isinstance(arch_or_model, SwinTransformer)


def build_swin(arch, patch_size=SWIN_PATCH_SIZE, window_size=7, **kwargs):
    if arch not in SWIN_CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(SWIN_ARCHS)}")
    return SwinTransformer(patch_size=patch_size, window_size=window_size, mlp_ratio=4.0,
                           qkv_bias=True, **SWIN_CONFIGS[arch], **kwargs)


__all__ = ["SWIN_ARCHS", "SWIN_ATTN_BACKENDS", "SWIN_CONFIGS", "SWIN_MASK_CELL",
           "SWIN_PATCH_SIZE", "PatchMerging", "SwinBlock", "SwinTransformer", "WindowAttention",
           "build_swin", "is_swin", "relative_position_index", "shift_attn_mask",
           "stage_windows", "window_partition", "window_reverse"]
