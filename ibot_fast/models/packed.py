"""Packed multi-crop forward of the ViT blocks, attention back ends, stochastic-depth variants.

The fast step (``ibot_fast/fast_step.py``) runs crops of different sizes (masked global crops
and local crops) through the blocks together: the tokens of every sequence are concatenated
into one flat ``[R, D]`` stream (R = sum over groups of b_g · T_g), so LayerNorm, the qkv/proj
linears and the MLP run once over all of them, and only attention looks at sequence
boundaries. A *layout* is the static tuple ``((b_0, T_0), (b_1, T_1), ...)`` of crop groups
(b_g sequences of T_g tokens each, crop-major like ``MultiCropWrapper``); one group and one
call per group is the reference's "separate passes" computation, all groups in one call is
the packed one. Both run the same code, so the tests compare them directly.

Attention back ends (``--attn_backend``), all computing softmax(q kᵀ · d_h^-0.5) v within a
sequence:

* ``sdpa``   ``F.scaled_dot_product_attention`` once per crop group (the default, the CPU path);
* ``math``   the explicit softmax, once per group (the reference every other one is tested
             against);
* ``xformers`` ``memory_efficient_attention`` over the whole packed stream with a
             ``BlockDiagonalMask`` (CUDA; xformers has no CPU kernels);
* ``flex``   ``flex_attention`` over the packed stream with a document mask (forward and
             backward on CUDA; this torch has no flex backward on the CPU);
* ``varlen`` ``torch.nn.attention.varlen.varlen_attn`` (flash attention over cumulative
             sequence offsets; CUDA only).

Unavailable back ends fail in :func:`check_attn_backend` with a message naming the fix.

Stochastic depth: the per-sample coins of ``DropPath`` are drawn *outside* the blocks
(:func:`draw_drop_path_coins`, in the order the reference's separate student passes draw them),
so the packed forward, a compiled block and the reference drop exactly the same samples.
``compute-skipping`` stochastic depth (DINOv2's batch-subset residual) is the other mode: each
branch runs on a random subset of ``b - floor(p·b)`` sequences of every group and is added back
scaled by ``b / subset``; the expectation equals the branch on every sequence, the compute
shrinks by the drop rate (:func:`draw_subsets`).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Layout = tuple  # ((b_0, T_0), (b_1, T_1), ...): static sequence counts and lengths per group

ALL_ATTN_BACKENDS = ("sdpa", "math", "xformers", "flex", "varlen")


# ---------------------------------------------------------------------------------- back ends
def _xformers_ops():
    try:
        import xformers.ops as xops
    except Exception as err:  # ImportError, or a broken build
        raise ValueError(f"--attn_backend xformers: xformers cannot be imported ({err}); "
                         f"install it (pip install xformers, CUDA build) or use --attn_backend "
                         f"sdpa") from None
    return xops


def check_attn_backend(name: str, device, training: bool = True) -> str:
    """Validate that back end ``name`` can run on ``device`` (for training when ``training``).

    Raises ValueError naming what is missing and what to use instead.
    """
    if name not in ALL_ATTN_BACKENDS:
        raise ValueError(f"unknown attn_backend {name!r}; valid: {', '.join(ALL_ATTN_BACKENDS)}")
    dev = torch.device(device)
    if name == "xformers":
        _xformers_ops()
        if dev.type != "cuda":
            raise ValueError("--attn_backend xformers: xformers has no CPU attention kernels; "
                             "use --attn_backend sdpa on the CPU")
    elif name == "flex":
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError as err:
            raise ValueError(f"--attn_backend flex needs torch.nn.attention.flex_attention "
                             f"(torch >= 2.5): {err}; use --attn_backend sdpa") from None
        if dev.type == "cpu" and training:
            raise ValueError("--attn_backend flex: this torch has no flex_attention backward "
                             "on the CPU; use --attn_backend sdpa (flex is for CUDA)")
    elif name == "varlen":
        try:
            from torch.nn.attention import varlen  # noqa: F401
        except ImportError as err:
            raise ValueError(f"--attn_backend varlen needs torch.nn.attention.varlen "
                             f"(torch >= 2.9): {err}; use --attn_backend sdpa") from None
        if dev.type != "cuda":
            raise ValueError("--attn_backend varlen runs flash attention, which needs a CUDA "
                             "device; use --attn_backend sdpa on the CPU")
    return name


def _group_slices(layout: Layout):
    start = 0
    for b, t in layout:
        yield start, b, t
        start += b * t


@functools.lru_cache(maxsize=32)
def _xformers_bias(layout: Layout):
    xops = _xformers_ops()
    seqlens = [t for b, t in layout for _ in range(b)]
    return xops.fmha.BlockDiagonalMask.from_seqlens(seqlens)


_FLEX_CACHE: dict = {}


def _flex_block_mask(layout: Layout, device):
    key = (layout, str(device))
    if key not in _FLEX_CACHE:
        from torch.nn.attention.flex_attention import create_block_mask
        lens = torch.tensor([t for b, t in layout for _ in range(b)], device=device)
        seq_id = torch.arange(lens.numel(), device=device).repeat_interleave(lens)  # [R]
        total = seq_id.numel()

        def same_sequence(b, h, q, kv):  # the document mask: attend within one crop only
            return seq_id[q] == seq_id[kv]

        _FLEX_CACHE[key] = create_block_mask(same_sequence, None, None, total, total,
                                             device=device)
    return _FLEX_CACHE[key]


def _cu_seqlens(layout: Layout, device):
    lens = torch.tensor([t for b, t in layout for _ in range(b)], dtype=torch.int32)
    cu = torch.zeros(lens.numel() + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    return cu.to(device), max(t for _, t in layout)


def packed_attention(qkv: torch.Tensor, layout: Layout, num_heads: int, scale: float,
                     backend: str) -> torch.Tensor:
    """Attention within each sequence of a packed stream.

    qkv: ``[R, 3·D]`` (the qkv linear of R packed tokens; per token q | k | v, each nh × dh).
    Returns ``[R, D]`` (heads concatenated per token, as the reference's transpose+reshape).
    """
    R, D3 = qkv.shape
    D = D3 // 3
    dh = D // num_heads
    if backend in ("sdpa", "math"):
        outs = []
        for start, b, t in _group_slices(layout):
            # [b·T, 3D] -> [b, T, 3, nh, dh] -> [3, b, nh, T, dh]
            g = qkv[start:start + b * t].view(b, t, 3, num_heads, dh).permute(2, 0, 3, 1, 4)
            q, k, v = g.unbind(0)
            if backend == "sdpa":
                o = F.scaled_dot_product_attention(q, k, v, scale=scale)
            else:
                o = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1) @ v
            outs.append(o.transpose(1, 2).reshape(b * t, D))  # [b, nh, T, dh] -> [b·T, D]
        return outs[0] if len(outs) == 1 else torch.cat(outs)
    if backend == "xformers":
        xops = _xformers_ops()
        q, k, v = qkv.view(1, R, 3, num_heads, dh).unbind(2)  # each [1, R, nh, dh]
        o = xops.memory_efficient_attention(q, k, v, attn_bias=_xformers_bias(layout),
                                            scale=scale)
        return o.reshape(R, D)
    if backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention
        # [R, 3, nh, dh] -> [3, 1, nh, R, dh]
        q, k, v = qkv.view(R, 3, num_heads, dh).permute(1, 2, 0, 3).unsqueeze(1).unbind(0)
        o = flex_attention(q, k, v, block_mask=_flex_block_mask(layout, qkv.device),
                           scale=scale)
        return o[0].transpose(0, 1).reshape(R, D)  # [nh, R, dh] -> [R, D]
    if backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn
        q, k, v = qkv.view(R, 3, num_heads, dh).unbind(1)  # each [R, nh, dh]
        cu, max_t = _cu_seqlens(layout, qkv.device)
        # default scale is dh^-0.5, the ViT's
        return varlen_attn(q, k, v, cu, cu, max_t, max_t).reshape(R, D)
    raise ValueError(f"unknown attn_backend {backend!r}; valid: {', '.join(ALL_ATTN_BACKENDS)}")


# ------------------------------------------------------------------------- stochastic depth
def _drop_rate(block) -> float:
    dp = block.drop_path
    return float(getattr(dp, "drop_prob", 0.0)) if not isinstance(dp, nn.Identity) else 0.0


def draw_drop_path_coins(blocks: Sequence[nn.Module], group_sizes: Sequence[int], dtype,
                         device) -> list:
    """Per-sample keep coins of every block's two residual branches, for every group.

    Drawn with the same ``torch.rand`` calls, shapes, dtype and order as the reference's
    separate student passes make inside ``DropPath`` (all blocks of group 0, then all blocks of
    group 1), so a seeded fast step drops exactly the samples the reference drops.
    Returns ``coins[block][branch]`` = list over groups of ``[b_g, 1, 1]`` tensors (0 or 1), or
    None for a block without drop path.
    """
    coins = [[[None] * len(group_sizes), [None] * len(group_sizes)] for _ in blocks]
    for g, b in enumerate(group_sizes):
        for i, blk in enumerate(blocks):
            p = _drop_rate(blk)
            if p == 0.0:
                continue
            for branch in range(2):
                coins[i][branch][g] = (1.0 - p + torch.rand((b, 1, 1), dtype=dtype,
                                                            device=device)).floor_()
    return [None if c[0][0] is None else c for c in coins]


def draw_subsets(blocks: Sequence[nn.Module], group_sizes: Sequence[int], device) -> list:
    """Compute-skipping stochastic depth: for every block with drop rate p and every branch, a
    uniformly random subset of ``b - floor(p·b)`` sequences of each group (sorted indices).

    Each sequence is in the subset with probability ``k/b``; the branch output of the subset is
    added back scaled by ``b/k``, so the expected update equals the branch on every sequence.
    Returns ``subsets[block][branch]`` = list over groups of int64 ``[k_g]`` tensors, or None.
    """
    out = []
    for blk in blocks:
        p = _drop_rate(blk)
        if p == 0.0:
            out.append(None)
            continue
        out.append([[torch.randperm(b, device=device)[:max(1, b - int(p * b))].sort().values
                     for b in group_sizes] for _ in range(2)])
    return out


def subset_layout(layout: Layout, p: float) -> Layout:
    return tuple((max(1, b - int(p * b)), t) for b, t in layout)


# ------------------------------------------------------------------------------ the block
def _per_token(coins_g: Sequence[torch.Tensor], layout: Layout) -> torch.Tensor:
    """[b_g, 1, 1] coins per group -> one [R, 1] factor per packed token."""
    parts = [c.reshape(b, 1).expand(b, t).reshape(b * t, 1) for c, (b, t) in zip(coins_g, layout)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class PackedBlock(nn.Module):
    """Runs one ViT ``Block`` on a packed token stream (the block keeps its own parameters and
    keys; this wrapper is not part of the model's state dict).

    ``forward(x, coins=None, subsets=None)``:
      x        ``[R, D]`` tokens of ``self.layout`` (set by the caller; a static tuple).
      coins    ``[attn, mlp]`` lists of per-group ``[b_g, 1, 1]`` keep coins (DropPath
               semantics: branch / keep_prob · coin), or None (no drop path / eval).
      subsets  ``[attn, mlp]`` lists of per-group index tensors (compute-skipping stochastic
               depth), or None.
    A block compiled through this wrapper (``.compile(dynamic=False)``) sees only static
    shapes: the layout is fixed per run and the coins are inputs, not random ops.
    """

    def __init__(self, block: nn.Module, layout: Layout = (), attn_backend: str = "sdpa"):
        super().__init__()
        self.block = block
        self.layout = tuple(layout)
        self.attn_backend = attn_backend

    def _attn_branch(self, x, layout):
        blk = self.block
        a = blk.attn
        qkv = a.qkv(blk.norm1(x))
        return a.proj(packed_attention(qkv, layout, a.num_heads, a.scale, self.attn_backend))

    def _mlp_branch(self, x, layout):
        return self.block.mlp(self.block.norm2(x))

    def _residual(self, x, branch, coins_g, subsets_g):
        layout = self.layout
        if subsets_g is not None:
            return self._subset_residual(x, branch, subsets_g)
        y = branch(x, layout)
        if coins_g is not None:
            # the reference's drop_path: x / keep_prob * coin, elementwise in the same order
            y = y.div(1.0 - _drop_rate(self.block)) * _per_token(coins_g, layout)
        return x + y

    def _subset_residual(self, x, branch, subsets_g):
        layout = self.layout
        D = x.shape[-1]
        views = [x[s:s + b * t].view(b, t, D) for s, b, t in _group_slices(layout)]
        sub_layout = tuple((idx.numel(), t) for idx, (_, t) in zip(subsets_g, layout))
        x_sub = torch.cat([v.index_select(0, idx).reshape(-1, D)
                           for v, idx in zip(views, subsets_g)])
        y = branch(x_sub, sub_layout)
        outs = []
        for (s, k, t), v, idx, (b, _) in zip(_group_slices(sub_layout), views, subsets_g,
                                              layout):
            y_g = y[s:s + k * t].view(k, t, D)
            outs.append(torch.index_add(v, 0, idx, y_g.to(v.dtype), alpha=b / k)
                        .reshape(b * t, D))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def forward(self, x, coins=None, subsets=None):
        x = self._residual(x, self._attn_branch, None if coins is None else coins[0],
                           None if subsets is None else subsets[0])
        x = self._residual(x, self._mlp_branch, None if coins is None else coins[1],
                           None if subsets is None else subsets[1])
        return x


def prepare_groups(backbone: nn.Module, crops: Sequence[torch.Tensor],
                   masks: Sequence[Optional[torch.Tensor]]):
    """Tokens of every crop group ([CLS] + pos embed, masked), flattened and concatenated.

    crops: one ``[b_g, C, H_g, W_g]`` tensor per group; masks: per group ``[b_g, h, w]`` or None.
    Returns ``(x [R, D], layout)``.
    """
    flats, layout = [], []
    for x, m in zip(crops, masks):
        t = backbone.prepare_tokens(x, m)  # [b, T, D]
        layout.append((t.shape[0], t.shape[1]))
        flats.append(t.reshape(-1, t.shape[-1]))
    return (flats[0] if len(flats) == 1 else torch.cat(flats)), tuple(layout)


def cls_rows(layout: Layout, device) -> torch.Tensor:
    """Flat indices of the [CLS] token of every sequence of a packed layout (crop-major)."""
    idx = [torch.arange(b, device=device) * t + s for s, b, t in _group_slices(layout)]
    return idx[0] if len(idx) == 1 else torch.cat(idx)


def layout_tokens(layout: Layout) -> int:
    return sum(b * t for b, t in layout)


def attention_flops(layout: Layout, dim: int) -> int:
    """Matmul FLOPs of q kᵀ and (attn) v of one forward over a layout."""
    return sum(4 * b * t * t * dim for b, t in layout)


__all__ = ["ALL_ATTN_BACKENDS", "PackedBlock", "attention_flops", "check_attn_backend",
           "cls_rows", "draw_drop_path_coins", "draw_subsets", "layout_tokens",
           "packed_attention", "prepare_groups", "subset_layout"]
