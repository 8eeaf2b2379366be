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
* ``flex``   ``flex_attention`` over the packed stream with a document mask; on CUDA always
             the compiled kernel with a compiled (block-sparse) mask, since eager flex
             materialises every score of the stream; eager on the CPU, forward only, for
             streams of at most ``FLEX_EAGER_MAX_TOKENS`` tokens;
* ``varlen`` ``torch.nn.attention.varlen.varlen_attn`` (flash attention over cumulative
             sequence offsets; CUDA only, bf16/fp16 inputs only).

:func:`attn_backend_flag_errors` holds the flag rules (device, precision) for argument
parsing; :func:`check_attn_backend` adds what only the installed packages can tell (imports,
whether xformers' compiled ops load, and which torch/CUDA its wheel was built for when not).

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
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Layout = tuple  # ((b_0, T_0), (b_1, T_1), ...): static sequence counts and lengths per group

ALL_ATTN_BACKENDS = ("sdpa", "math", "xformers", "flex", "varlen")


# ---------------------------------------------------------------------------------- back ends
# Eager flex_attention is PyTorch's reference implementation: it materialises the scores of the
# whole packed stream, heads × R × R in fp32 (ViT-S, B = 128, recipe crops: R ≈ 97,800 tokens,
# 6 · 97,800² · 4 B ≈ 229 GB). On CUDA this module therefore always runs the compiled kernel
# with a compiled (sparse) block mask; eager flex (the CPU) refuses streams longer than this.
FLEX_EAGER_MAX_TOKENS = 16_384

# flash attention (varlen) takes 16-bit q/k/v only
VARLEN_PRECISIONS = ("bf16", "fp16")


@dataclass(frozen=True)
class AttnBackendRule:
    """A rule about ``--attn_backend`` and the device / precision: ``broken(backend, precision,
    device_type)`` (precision None: not known yet, the precision rules pass); ``message`` names
    the flags and the fix (``{attn_backend}`` / ``{precision}`` are filled in). The one
    definition of these rules: the argument parser checks them (they are part of
    ``ibot_fast.config.CROSS_FLAG_RULES``) and so does :func:`check_attn_backend` for callers
    that build models without it."""
    name: str
    broken: Callable[[str, Optional[str], str], bool]
    message: str


ATTN_BACKEND_RULES = (
    AttnBackendRule(
        "attn_backend-device",
        lambda b, p, d: b in ("xformers", "varlen") and d != "cuda",
        "--attn_backend {attn_backend} needs a CUDA device (xformers has no CPU attention "
        "kernels, varlen is flash attention); use --attn_backend sdpa on the CPU (or --device "
        "cuda)"),
    AttnBackendRule(
        "attn_backend-flex-cpu",
        lambda b, p, d: b == "flex" and d != "cuda",
        "--attn_backend flex: this torch has no flex_attention backward on the CPU; use "
        "--attn_backend sdpa on the CPU (flex is for CUDA)"),
    AttnBackendRule(
        "attn_backend-varlen-precision",
        lambda b, p, d: b == "varlen" and p is not None and p not in VARLEN_PRECISIONS,
        "--attn_backend varlen runs flash attention, which takes bf16/fp16 inputs only, and "
        "--precision {precision} feeds it {precision}; use --precision bf16 (or fp16), or "
        "--attn_backend sdpa / flex for {precision}"),
)


def attn_backend_flag_errors(attn_backend: str, precision: Optional[str],
                             device_type: str) -> list:
    """What is wrong with ``--attn_backend`` for a run on ``device_type`` ("cpu" or "cuda")
    at ``--precision`` (the resolved value; None skips the precision rule): one message per
    broken :data:`ATTN_BACKEND_RULES` rule; ``[]`` when the combination can train.

    Pure flag logic, cheap enough for argument parsing; :func:`check_attn_backend` adds what
    only the installed packages can tell (imports, xformers' compiled ops).
    """
    if attn_backend not in ALL_ATTN_BACKENDS:
        return [f"unknown attn_backend {attn_backend!r} (--attn_backend); choose one of "
                f"{', '.join(ALL_ATTN_BACKENDS)}"]
    return [r.message.format(attn_backend=attn_backend, precision=precision)
            for r in ATTN_BACKEND_RULES
            if r.broken(attn_backend, precision, device_type)]


def _cuda_version_text(v) -> str:
    """xformers' build metadata writes CUDA 12.8 as 1208."""
    if isinstance(v, int) and v > 100:
        return f"{v // 100}.{v % 100}"
    return str(v)


def _xformers_build_text() -> str:
    """Which torch / CUDA the installed xformers wheel was built for, as far as it says."""
    try:
        import xformers
        from xformers import _cpp_lib
    except Exception:  # noqa: BLE001 -- a description, never a reason to fail
        return "its build information is not readable"
    info = getattr(_cpp_lib, "_build_metadata", None)
    if info is None:  # a failed load keeps the metadata on the exception
        info = getattr(getattr(_cpp_lib, "_cpp_library_load_exception", None), "build_info",
                       None)
    version = getattr(xformers, "__version__", "?")
    if info is None:
        return f"xformers {version} does not say which torch/CUDA it was built for"
    return (f"xformers {version} was built for torch {getattr(info, 'torch_version', '?')} "
            f"with CUDA {_cuda_version_text(getattr(info, 'cuda_version', '?'))}")


def _here_text() -> str:
    return f"this is torch {torch.__version__} with CUDA {torch.version.cuda}"


def _xformers_ops():
    try:
        import xformers.ops as xops
    except Exception as err:  # ImportError, or a broken build
        raise ValueError(f"--attn_backend xformers: xformers cannot be imported ({err}); "
                         f"install it (pip install xformers, CUDA build) or use --attn_backend "
                         f"sdpa") from None
    return xops


def check_xformers_ops(device) -> None:
    """Raise ValueError unless xformers' compiled attention ops load and run on ``device``.

    A wheel built for another torch or CUDA imports fine and fails at the first attention call
    (e.g. ``libcudart.so.12`` missing under CUDA 13), so this runs one tiny block-diagonal
    attention; the message says which torch/CUDA the wheel was built for.
    """
    xops = _xformers_ops()
    try:
        from xformers import _cpp_lib
        load_error = getattr(_cpp_lib, "_cpp_library_load_exception", None)
    except Exception as err:  # noqa: BLE001
        load_error = err
    if load_error is not None:
        first = str(load_error).strip().splitlines()[0] if str(load_error).strip() else \
            type(load_error).__name__
        raise ValueError(f"--attn_backend xformers: its C++/CUDA ops do not load ({first}); "
                         f"{_xformers_build_text()}, {_here_text()}: install the xformers "
                         f"build for this torch or use --attn_backend sdpa") from None
    try:
        q = torch.zeros(1, 16, 1, 8, device=device, dtype=torch.bfloat16)
        bias = xops.fmha.BlockDiagonalMask.from_seqlens([8, 8])
        xops.memory_efficient_attention(q, q, q, attn_bias=bias)
    except Exception as err:  # noqa: BLE001 -- any failure of the ops is the message
        raise ValueError(f"--attn_backend xformers: its attention ops fail on {device} "
                         f"({type(err).__name__}: {str(err).strip()[:300]}); "
                         f"{_xformers_build_text()}, {_here_text()}: install the xformers "
                         f"build for this torch or use --attn_backend sdpa") from None


def check_attn_backend(name: str, device, training: bool = True,
                       precision: Optional[str] = None) -> str:
    """Validate that back end ``name`` can run on ``device`` (for training when ``training``;
    at ``precision`` when given): the rules of :func:`attn_backend_flag_errors`, then what the
    installed packages provide. Raises ValueError naming what is missing and the fix."""
    dev = torch.device(device)
    errors = attn_backend_flag_errors(name, precision, dev.type)
    if name == "flex" and not training:  # the forward runs on the CPU (eager, short streams)
        errors = [e for e in errors if "flex_attention backward" not in e]
    if errors:
        raise ValueError("; ".join(errors))
    if name == "xformers":
        check_xformers_ops(dev)
    elif name == "flex":
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError as err:
            raise ValueError(f"--attn_backend flex needs torch.nn.attention.flex_attention "
                             f"(torch >= 2.5): {err}; use --attn_backend sdpa") from None
    elif name == "varlen":
        try:
            from torch.nn.attention import varlen  # noqa: F401
        except ImportError as err:
            raise ValueError(f"--attn_backend varlen needs torch.nn.attention.varlen "
                             f"(torch >= 2.9): {err}; use --attn_backend sdpa") from None
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


def flex_runs_compiled(device) -> bool:
    """Whether flex attention on ``device`` runs compiled (kernel and block mask): on every
    accelerator; on the CPU it runs eagerly (short streams only, forward only)."""
    return torch.device(device).type != "cpu"


def check_flex_tokens(n_tokens: int, device) -> None:
    """Refuse an eager flex stream whose dense scores would not fit (see FLEX_EAGER_MAX_TOKENS)."""
    if not flex_runs_compiled(device) and n_tokens > FLEX_EAGER_MAX_TOKENS:
        raise ValueError(f"--attn_backend flex: eager flex_attention (on {device}) "
                         f"materialises heads x {n_tokens} x {n_tokens} scores; it runs "
                         f"streams of at most {FLEX_EAGER_MAX_TOKENS} packed tokens. Run flex "
                         f"on CUDA (compiled), or use --attn_backend sdpa")


_FLEX_CACHE: dict = {}


@torch.compiler.disable  # built once per layout, outside any graph (see flex_block_mask)
def _build_flex_block_mask(layout: Layout, device):
    from torch.nn.attention import flex_attention as fa
    lens = torch.tensor([t for b, t in layout for _ in range(b)], device=device)
    seq_id = torch.arange(lens.numel(), device=device).repeat_interleave(lens)  # [R]
    total = seq_id.numel()

    def same_sequence(b, h, q, kv):  # the document mask: attend within one crop only
        return seq_id[q] == seq_id[kv]

    # _compile=True: built block by block (sparse), never as a dense R x R mask
    mask = fa.create_block_mask(same_sequence, None, None, total, total, device=device,
                                _compile=flex_runs_compiled(device))
    _FLEX_CACHE[(layout, str(device))] = mask
    return mask


def flex_block_mask(layout: Layout, device):
    """The document mask of a packed layout, cached per (layout, device).

    Call it once before a compiled region (e.g. a compiled step) for each layout: a mask found
    in the cache is a constant of the graph; a missing one is built outside the graph (a graph
    break, once)."""
    mask = _FLEX_CACHE.get((layout, str(device)))
    return mask if mask is not None else _build_flex_block_mask(layout, device)


_COMPILED_FLEX: list = []


def _flex_attention_fn(device):
    """flex_attention compiled on accelerators (inside a compiled region: the plain op, which
    the enclosing compile lowers to the same kernel), eager on the CPU."""
    from torch.nn.attention import flex_attention as fa
    if torch.compiler.is_compiling() or not flex_runs_compiled(device):
        return fa.flex_attention
    if not _COMPILED_FLEX:
        _COMPILED_FLEX.append(torch.compile(fa.flex_attention, dynamic=False))
    return _COMPILED_FLEX[0]


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
        check_flex_tokens(R, qkv.device)
        # [R, 3, nh, dh] -> [3, 1, nh, R, dh]
        q, k, v = qkv.view(R, 3, num_heads, dh).permute(1, 2, 0, 3).unsqueeze(1).unbind(0)
        o = _flex_attention_fn(qkv.device)(q, k, v,
                                           block_mask=flex_block_mask(layout, qkv.device),
                                           scale=scale)
        return o[0].transpose(0, 1).reshape(R, D)  # [nh, R, dh] -> [R, D]
    if backend == "varlen":
        if qkv.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"--attn_backend varlen runs flash attention, which takes bf16/"
                             f"fp16 inputs only, got {qkv.dtype}: use --precision bf16 (or "
                             f"fp16), or --attn_backend sdpa")
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

    def _attention(self, x, layout):
        """The attention branch before its output projection: ``[R, D]``."""
        a = self.block.attn
        return packed_attention(a.qkv(self.block.norm1(x)), layout, a.num_heads, a.scale,
                                self.attn_backend)

    def _attn_branch(self, x, layout):
        return self.block.attn.proj(self._attention(x, layout))

    def _mlp_branch(self, x, layout):
        return self.block.mlp(self.block.norm2(x))

    def _dropped(self, y, factor):
        """The reference's drop_path on a branch output: y / keep_prob * coin (``factor``: the
        per-token coins, ``[R, 1]``), elementwise in the same order; None: no drop path."""
        return y if factor is None else y.div(1.0 - _drop_rate(self.block)) * factor

    def _residual(self, x, branch, coins_g, subsets_g):
        layout = self.layout
        if subsets_g is not None:
            return self._subset_residual(x, branch, subsets_g)
        factor = None if coins_g is None else _per_token(coins_g, layout)
        return x + self._dropped(branch(x, layout), factor)

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

    def forward_rows(self, x, rows, coins=None):
        """``forward(x, coins)[rows]``, computing only those rows after the attention: every
        token is a key and value (so the attention runs on all of them), but the output
        projection, both residuals, ``norm2`` and the MLP act row by row, so the rows nobody
        reads (a student's unmasked patch tokens, which no loss term sees) are left out. Each
        computed row goes through the same operations as in :meth:`forward`."""
        o = self._attention(x, self.layout).index_select(0, rows)  # [S, D], before proj
        f_attn = f_mlp = None
        if coins is not None:
            f_attn, f_mlp = (_per_token(c, self.layout).index_select(0, rows) for c in coins)
        x = x.index_select(0, rows)
        x = x + self._dropped(self.block.attn.proj(o), f_attn)
        return x + self._dropped(self._mlp_branch(x, None), f_mlp)

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


__all__ = ["ALL_ATTN_BACKENDS", "ATTN_BACKEND_RULES", "AttnBackendRule", "FLEX_EAGER_MAX_TOKENS",
           "PackedBlock", "attn_backend_flag_errors", "check_attn_backend", "check_flex_tokens",
           "check_xformers_ops", "cls_rows", "draw_drop_path_coins", "draw_subsets",
           "flex_block_mask", "flex_runs_compiled", "packed_attention", "prepare_groups"]
