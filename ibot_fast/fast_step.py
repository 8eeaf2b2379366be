"""The fast step path (``--step fast``, the default): the reference step's numbers, less work.

``Trainer.train_step`` (train.py) is the one step skeleton; :class:`FastPath` is the step path
(``ibot_fast/step.py``) it runs by default. It computes the same loss, gradients, optimiser
update, EMA and centres as :class:`ibot_fast.step.ReferencePath` (``--step reference``;
tests/test_fast_step.py compares them flag by flag) with these changes, each behind a flag:

* ``--head_tokens selected`` (default; ``all`` is the reference's head on every token): the
  student head runs on the [CLS] token of every crop and on the masked patch tokens only,
  gathered with the loader's flat indices (``MaskBatch.idx_M``: an eager step takes its masked
  rows only, the compiled step the padded static M = ng·B·max_masked); the teacher's K-way last layer runs on its [CLS] tokens and the same
  masked positions. The teacher patch centre needs the mean of the teacher logits over *all*
  patch tokens; the last layer is linear without bias, so ``mean_t(W ẑ_t) = W mean_t(ẑ_t)``:
  the teacher MLP runs on every token (its bottleneck vectors are needed for the mean), the
  K-way layer on one mean vector. The loss is ``IBOTLoss.forward_selected``
  (fused ``soft_ce`` on the selected rows).
* ``--fused_head_loss true`` (with ``selected``; default false): the patch head's K2-way last
  layer moves into the patch loss (``IBOTLoss.forward_selected_linear`` ->
  ``ibot_fast.kernels.soft_ce_linear``): the student hands over its masked rows' bottleneck vectors
  and the weight-normed ``last_layer2`` weight (autograd takes the weight's gradient on to
  ``weight_v``/``weight_g``), the teacher its rows' vectors and weight, and neither ``[M, K2]``
  logits tensor exists. [CLS] rows and the teacher centre (by linearity, as above) are
  unchanged.
* ``--packed_crops true`` (default for ViT): masked global crops and local crops go through each
  student block together as one flat token stream (LayerNorm, linears and MLP once; attention
  per crop: ``ibot_fast/models/packed.py``); ``false`` runs them in separate passes.
* Swin backbones (``--arch swin_*``) are not packed: the crops of each resolution go through
  the backbone in their own pass (``--packed_crops`` unset resolves to false; true, ``--compile``,
  ``--drop_path_mode subset`` and ``--fsdp`` are refused by the flag rules). The backbone's
  output tokens (pooled [CLS] slot, final-stage tokens, already normed) form the token stream
  the selected-token head, the centre by linearity and the fused loss read, as for ViT.
* ``--attn_backend sdpa|math|xformers|flex|varlen`` (models/packed.py; sdpa is the default and
  the CPU path; the others fail with a clear message where they cannot run).
* ``--compile blocks`` (``true``): every block is ``torch.compile``d (``dynamic=False``): shapes
  are static (padded mask indices, drop-path coins drawn outside as inputs), so nothing
  recompiles after the first step whatever the masks.
* ``--compile step`` (with ``selected``, not with FSDP): :meth:`FastPath._forward_selected`
  -- teacher forward, student forward and loss -- is one ``torch.compile``d function
  (``dynamic=False``, one graph, no graph break): the drop-path draws and the epoch's teacher
  temperatures (0-dim tensors) are inputs, and the loss's torch back end takes every padded row
  instead of its ``nonzero``, so neither new masks nor a new epoch recompile. The optimiser
  (fused AdamW) and the EMA (one flat kernel) stay eager: single fused kernels already, and
  their per-step lr / momentum floats would be recompiles.
* Drop path: the per-sample coins are drawn before the blocks in the reference's order, so a
  seeded fast step drops the same samples; ``--drop_path_mode subset`` switches to DINOv2's
  compute-skipping stochastic depth (branch on a random subset, rescaled: same expectation,
  fewer FLOPs; not the reference's distribution).
* The EMA runs over one flat parameter buffer (``ibot_fast.ema.FlatEMA``: a Triton kernel on
  CUDA, ``lerp_`` otherwise; ``--ema_backend``), optionally writing a bf16 teacher copy used
  for the teacher forward (``--ema_teacher_bf16 true``, with ``--precision bf16``).
* AdamW is ``fused=True``; clipping is the per-tensor foreach clip of optim.py; the frozen last
  layer's gradients are dropped from a precomputed list. No host syncs in the step (the fused
  loss's torch back end has one ``nonzero``; on CUDA the Triton back end has none).

* ``--fsdp true`` (``ibot_fast/fsdp.py``): FSDP2 instead of DDP: ``fully_shard`` per block, then
  the whole student wrapper; the teacher sharded the same way, so the EMA is a local foreach
  ``lerp_`` over the shards; per-tensor clipping on full-tensor norms; full (DDP-format)
  checkpoints.

``--attn_backend`` applies to both paths; every other flag above is refused with
``--step reference`` (``ibot_fast/config.py`` checks the combinations before any work).
``--compile`` and ``--fused_head_loss`` stay opt-in until a GPU measurement shows they win.

Shapes: B images per crop, ng global / nl local crops, nc = ng + nl, N (n) patch tokens of a
global (local) crop, D width, K / K2 head outputs, M selected patch rows (masked, or padded to ng·B·max_masked),
R packed tokens.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ibot_fast.ema import FlatEMA
from ibot_fast.masking import MaskBatch, MaskGenerator
from ibot_fast.models.packed import (PackedBlock, check_attn_backend, cls_rows,
                                     draw_drop_path_coins, draw_subsets, prepare_groups)
from ibot_fast.models.swin import is_swin
from ibot_fast.optim import build_optimizer, get_params_groups
from ibot_fast.step import StepPath, ddp

HEAD_TOKENS = ("selected", "all")
DROP_PATH_MODES = ("sample", "subset")
COMPILE_MODES = (False, "blocks", "step")  # False: eager


def patch_token_rows(idx_M: torch.Tensor, n_patches: int) -> torch.Tensor:
    """Flat patch indices (``MaskBatch.idx_M``: row (c·B+b)·N + i into the patch tokens of all
    global crops) -> rows of the token stream that also holds each crop's [CLS] first:
    (c·B+b)·(1+N) + 1 + i = idx + idx // N + 1."""
    return idx_M + torch.div(idx_M, n_patches, rounding_mode="floor") + 1


def _final_norm(backbone):
    """The norm the stream's rows still need: ViT's final norm; none for Swin (its output
    tokens are normed already, the pooled [CLS] slot being the mean of normed tokens)."""
    return nn.Identity() if is_swin(backbone) else backbone.norm


def _swin_stream(backbone, crops, masks):
    """Swin, one pass per crop group (no packing): (x [R, D] normed output tokens, layout)."""
    flats, layout = [], []
    for x, m in zip(crops, masks):
        t = backbone(x, mask=m)  # [b, 1 + N, D]
        layout.append((t.shape[0], t.shape[1]))
        flats.append(t.reshape(-1, t.shape[-1]))
    return (flats[0] if len(flats) == 1 else torch.cat(flats)), tuple(layout)


def _head_logits(head, z_RD: torch.Tensor, n_cls: int):
    """[CLS] rows first, patch rows after: (cls [n_cls, K], patch [R - n_cls, K2])."""
    if head.last_layer2 is head.last_layer:  # shared head: one matmul for all rows
        out = head.last_layer(z_RD)
        return out[:n_cls], out[n_cls:]
    return head.last_layer(z_RD[:n_cls]), head.last_layer2(z_RD[n_cls:])


def _head_fused(head, z_RD: torch.Tensor, n_cls: int):
    """``--fused_head_loss``: (cls logits [n_cls, K], patch bottleneck rows [R - n_cls, bd],
    patch weight W2 [K2, bd]); the patch logits are left to ``soft_ce_linear``. W2 is the
    module's weight-normed weight (autograd carries its gradient on to weight_v / weight_g);
    a shared head computes it once for both uses."""
    w_cls = head.last_layer.weight()
    w_patch = w_cls if head.last_layer2 is head.last_layer else head.last_layer2.weight()
    return F.linear(z_RD[:n_cls], w_cls), z_RD[n_cls:], w_patch


class _Blocks:
    """The blocks of one backbone wrapped for the packed stream (optionally compiled)."""

    def __init__(self, backbone, attn_backend: str, compile_blocks: bool,
                 compile_backend: str = "inductor"):
        self.blocks = list(backbone.blocks)
        self.fsdp = False  # set by FastPath after fsdp.shard_blocks_and_root
        self.runners = [PackedBlock(b, attn_backend=attn_backend) for b in self.blocks]
        self.compiled = compile_blocks
        if compile_blocks:
            for r in self.runners:
                # static shapes: one graph per layout (globals, locals or both packed)
                r.compile(dynamic=False, backend=compile_backend)

    def run(self, x, layout, coins=None, subsets=None, out_rows=None):
        """The blocks on the packed stream; ``out_rows`` (eager, unsharded, no subsets: see
        :meth:`can_cut_rows`): the last block computes only those rows after its attention,
        and the result is ``[len(out_rows), D]``."""
        last = len(self.runners) - 1
        for i, r in enumerate(self.runners):
            r.layout = layout
            coins_i = None if coins is None else coins[i]
            if out_rows is not None and i == last:
                return r.forward_rows(x, out_rows, coins_i)
            # under FSDP the block's registered method: all-gather / reshard hooks around r
            call = self.blocks[i].packed_forward if self.fsdp else r
            x = call(x, coins_i, None if subsets is None else subsets[i])
        return x

    def can_cut_rows(self, subsets) -> bool:
        """Whether :meth:`run` may cut the last block to the rows the head reads: not for a
        compiled block (a second, uncompiled code path), FSDP (its hooks wrap ``forward``) or
        subset drop path (the branch runs on a subset of sequences already)."""
        return not self.compiled and not self.fsdp and subsets is None


class FastStudent(nn.Module):
    """The student's forward in the fast step (what DDP wraps when distributed).

    forward(crops, masks, sel_rows=None) with ``crops`` a list of crop-group tensors (masked
    globals ``[ng·B, C, H, W]``, then locals), ``masks`` per group (``[ng·B, h, w]`` or None):

    * ``sel_rows`` given (selected head): token-stream rows to run the head on ([CLS] of all
      crops first, ``n_cls`` of them, then the masked patch rows); returns
      ``(cls logits [nc·B, K], patch logits [M, K2])``; with ``fused_head`` (``--fused_head_loss
      true``) ``(cls logits, patch bottleneck rows [M, bd], patch last-layer weight [K2, bd])``.
    * ``sel_rows`` None (all tokens, the reference's head): returns the per-group head outputs
      as ``MultiCropWrapper`` gives them (``(cls, patch)`` for globals, ``cls`` for locals).
    """

    def __init__(self, student, blocks: _Blocks, packed: bool, drop_path_mode: str,
                 fused_head: bool = False):
        super().__init__()
        self.student = student  # MultiCropWrapper: .backbone, .head
        self._blocks = blocks   # a plain attribute: the runners are not extra modules here
        self.packed = packed
        self.drop_path_mode = drop_path_mode
        self.fused_head = fused_head

    def _draws(self, layout, dtype, device):
        bb = self.student.backbone
        sizes = [b for b, _ in layout]
        if not self.student.training:  # the trainer toggles the student, not this wrapper
            return None, None
        if self.drop_path_mode == "subset":
            return None, draw_subsets(bb.blocks, sizes, device)
        return draw_drop_path_coins(bb.blocks, sizes, dtype, device), None

    def draws(self, crops):
        """The drop-path draws of one step (coins or subsets), before any block runs."""
        x = crops[0]
        # drop path acts on branch outputs: the autocast dtype under autocast
        dt = (torch.get_autocast_dtype(x.device.type)
              if torch.is_autocast_enabled(x.device.type) else x.dtype)
        return self._draws([(c.shape[0], None) for c in crops], dt, x.device)

    def tokens(self, crops, masks, draws=None, sel_rows=None):
        """Backbone before its final norm: (x [R, D], layout). ``draws``: from :meth:`draws`
        (the whole-step compile draws outside the graph), else drawn here. Swin: its output
        tokens, one pass per group; its DropPath modules draw their own coins, in the
        reference's order (globals, then locals).

        ``sel_rows``: the rows the caller will read. Where the blocks allow it (packed, eager,
        unsharded, no subset drop path) the last block computes only those and ``x`` is
        ``[len(sel_rows), D]`` in their order (``layout`` is then None); elsewhere ``x`` is the
        whole stream. At the recipe's crops about 9 of every 10 student tokens are never read
        (unmasked global patches, every local patch): cutting them in the last block takes a
        ViT-S/16 step (2 x 224 + 10 x 96, B = 4) from 486 to 462 GFLOP."""
        bb = self.student.backbone
        if self._blocks is None:
            return _swin_stream(bb, crops, masks)
        x, layout = prepare_groups(bb, crops, masks)
        coins, subsets = self.draws(crops) if draws is None else draws
        if self.packed:
            if sel_rows is not None and self._blocks.can_cut_rows(subsets):
                return self._blocks.run(x, layout, coins, subsets, out_rows=sel_rows), None
            return self._blocks.run(x, layout, coins, subsets), layout
        outs, start = [], 0
        for g, (b, t) in enumerate(layout):
            pick = (lambda d: None if d is None else
                    [None if blk is None else [[br[g]] for br in blk] for blk in d])
            outs.append(self._blocks.run(x[start:start + b * t], ((b, t),), pick(coins),
                                         pick(subsets)))
            start += b * t
        return (outs[0] if len(outs) == 1 else torch.cat(outs)), layout

    def forward(self, crops, masks, sel_rows=None, n_cls: int = 0, draws=None,
                koleo_rows: int = 0):
        x, layout = self.tokens(crops, masks, draws, sel_rows)
        bb, head = self.student.backbone, self.student.head
        norm = _final_norm(bb)
        if sel_rows is not None:
            x_sel = x if layout is None else x.index_select(0, sel_rows)  # cut in the blocks
            z = head.bottleneck(norm(x_sel))
            out = (_head_fused if self.fused_head else _head_logits)(head, z, n_cls)
            # the first sel rows are the [CLS] tokens, globals first
            return (*out, z[:koleo_rows]) if koleo_rows else out
        outs, start, y_globals = [], 0, None
        for b, t in layout:
            y = norm(x[start:start + b * t]).view(b, t, -1)
            y_globals = y if y_globals is None else y_globals
            outs.append(head(y))
            start += b * t
        if koleo_rows:  # the globals' [CLS] bottleneck (MultiCropWrapper's return_cls_bottleneck)
            outs.append(head.bottleneck(y_globals[:koleo_rows, 0]))
        return outs


class FastPath(StepPath):
    """``--step fast`` (the default): the fast forward and loss of ``Trainer.train_step``.

    Builds, over the trainer's networks and loss: the flat EMA (or, with ``--fsdp``, the
    sharded one), the packed block runners, the student module (:class:`FastStudent`, DDP- or
    FSDP-wrapped when distributed) and fused AdamW (the same ``state_dict`` format as the
    reference's). The cross-flag rules are checked by ``ibot_fast.config`` before anything is
    built; what needs the process group or the device is checked here.
    """

    name = "fast"

    def __init__(self, args, student, teacher, ibot_loss, device: torch.device,
                 world_size: int = 1):
        super().__init__(student, teacher, ibot_loss, args.global_crops_number,
                         args.koleo_weight)
        self.device = device
        self.head_tokens = args.head_tokens
        self.swin = is_swin(student.backbone)
        # config resolves --packed_crops (unset: true for ViT) and refuses the ViT-only
        # options with a Swin arch (the swin-* rules) before anything is built
        self.packed = args.packed_crops
        self.drop_path_mode = args.drop_path_mode
        self.compile = args.compile
        self.fused_head = args.fused_head_loss
        self.sharded = args.fsdp
        self.nl = args.local_crops_number
        check_attn_backend(args.attn_backend, device, training=True)
        for m in (student, teacher):
            m.backbone.set_attn_backend(args.attn_backend)

        # ---- flat EMA (re-homes the parameters into flat buffers; Parameter objects stay) ----
        if self.sharded:  # ibot_fast/fsdp.py: the EMA runs on the shards, FSDP owns their storage
            from ibot_fast.fsdp import check_fsdp
            check_fsdp(device)
            self.ema = None  # built after sharding
        else:
            self.ema = FlatEMA(student, teacher, backend=args.ema_backend,
                               bf16_copy=args.ema_teacher_bf16)

        # ---- blocks, the student module (DDP- or FSDP-wrapped when distributed) ----
        cb = args.compile_backend
        if self.swin:  # the backbone runs whole (models/swin.py), no packed block runners
            self.s_blocks = self.t_blocks = None
        else:
            self.s_blocks = _Blocks(student.backbone, args.attn_backend,
                                    self.compile == "blocks", cb)
            self.t_blocks = _Blocks(teacher.backbone, args.attn_backend,
                                    self.compile == "blocks", cb)
        self.fast_student = FastStudent(student, self.s_blocks, self.packed,
                                        self.drop_path_mode, self.fused_head)
        self.module = self.fast_student
        self.fsdp_teacher = None
        if self.sharded:
            self._shard(device)
        elif world_size > 1:
            self.module = ddp(self.fast_student, device)

        # ---- optimiser: fused AdamW (same state_dict format as the reference's), over the
        # final parameters (FSDP's DTensors when sharded) ----
        groups = get_params_groups(student)
        self.optimizer = (torch.optim.AdamW(groups, fused=True) if args.optimizer == "adamw"
                          else build_optimizer(args.optimizer, groups))
        self._collect_params()
        self._temps = (None, None)
        self._step_fn = None
        if self.compile == "step":
            # one graph for teacher + student forward + loss (static shapes: padded mask
            # indices; draws and temperatures are inputs). The optimiser (fused AdamW) and the
            # EMA (one flat lerp_ / Triton kernel) are single fused kernels already and stay
            # outside: compiling them gains nothing and their per-step lr / momentum floats
            # would be recompiles.
            self._step_fn = torch.compile(self._forward_selected, dynamic=False, backend=cb)
        self._max_masked = MaskGenerator(args.pred_ratio, args.pred_ratio_var,
                                         pred_shape=args.pred_shape,
                                         pred_start_epoch=args.pred_start_epoch).max_masked

    def _shard(self, device):
        """--fsdp true: student and teacher sharded alike (ibot_fast/fsdp.py explains why)."""
        from ibot_fast.fsdp import FSDPTeacher, ShardedEMA, _mesh, shard_blocks_and_root
        mesh = _mesh(device)
        shard_blocks_and_root(self.fast_student, self.s_blocks.blocks, self.s_blocks.runners,
                              mesh)
        self.fsdp_teacher = FSDPTeacher(self.teacher, self._teacher_forward)
        shard_blocks_and_root(self.fsdp_teacher, self.t_blocks.blocks, self.t_blocks.runners,
                              mesh)
        self.s_blocks.fsdp = self.t_blocks.fsdp = True
        self.ema = ShardedEMA(self.student, self.teacher)

    # ---- checkpoints under FSDP: full state dicts in the DDP format (collectives) ----
    def network_state(self) -> dict:
        if not self.sharded:
            return super().network_state()
        from ibot_fast.fsdp import full_model_state_dict, full_optimizer_state_dict
        return {"student": full_model_state_dict(self.student),
                "teacher": full_model_state_dict(self.teacher),
                "optimizer": full_optimizer_state_dict(self.optimizer)}

    def load_network_state(self, state: dict) -> None:
        if not self.sharded:
            return super().load_network_state(state)
        from ibot_fast.checkpoint import strip_prefix
        from ibot_fast.fsdp import load_full_model_state_dict, load_full_optimizer_state_dict
        load_full_model_state_dict(self.student, strip_prefix(state["student"]))
        load_full_model_state_dict(self.teacher, strip_prefix(state["teacher"]))
        load_full_optimizer_state_dict(self.optimizer, state["optimizer"])

    def clip_gradients(self, clip: float):
        if self.sharded:  # full-tensor norms of the sharded gradients (one all_reduce)
            from ibot_fast.fsdp import clip_gradients_per_tensor_sharded
            return clip_gradients_per_tensor_sharded(self.params, clip)
        return super().clip_gradients(clip)

    # ------------------------------------------------------------------------------------------
    def _mask_batch(self, masks, B: int) -> MaskBatch:
        """The loader's MaskBatch (``--mask_backend``), or one built from a list of masks."""
        if isinstance(masks, MaskBatch):
            return masks
        m = torch.stack([mm.reshape(mm.shape[0], *mm.shape[-2:]).bool()
                         for mm in list(masks)[:self.ng]])
        if m.shape[1] != B:
            raise ValueError(f"masks hold {m.shape[1]} images per crop, the crops {B}")
        return MaskBatch.from_masks(m, self._max_masked(*m.shape[-2:]))

    @torch.no_grad()
    def teacher_forward(self, globals_, idx_M: torch.Tensor | None):
        """Teacher on the unmasked global crops; ``idx_M``: ``MaskBatch.idx_M`` (selected head)
        or None (all tokens).

        Selected head: ``(cls [ng·B, K], patch rows [M, K2], patch mean [K2])`` (with
        ``--fused_head_loss`` the patch rows are ``(bottleneck rows [M, bd], W2 [K2, bd])``);
        all tokens: ``(cls, patch [ng·B, N, K2])`` as the reference's teacher output.
        """
        teacher = self.teacher
        if self.fsdp_teacher is not None:
            out = self.fsdp_teacher(globals_, idx_M)
            # the root group stays gathered after its forward (no backward to reshard it):
            # reshard, so the EMA's in-place shard update is what the next all-gather reads
            self.fsdp_teacher.reshard()
            return out
        if getattr(self.ema, "teacher_bf16_flat", None) is not None:
            params = {n: p for n, p in self.ema.bf16_parameters().items()}
            with torch.nn.utils.stateless._reparametrize_module(teacher, params):
                return self._teacher_forward(teacher, globals_, idx_M)
        return self._teacher_forward(teacher, globals_, idx_M)

    def _teacher_forward(self, teacher, globals_, idx_M):
        bb, head = teacher.backbone, teacher.head
        if self.swin:
            y = bb(globals_)  # [ng·B, 1+N, D], normed, pooled [CLS] slot
        else:
            x, layout = prepare_groups(bb, [globals_], [None])
            x = self.t_blocks.run(x, layout)
            (b, t), = layout
            y = bb.norm(x).view(b, t, -1)
        if idx_M is None:
            return head(y)
        z = head.bottleneck(y)                       # [ng·B, 1+N, bottleneck], every token
        z_patch = z[:, 1:].reshape(-1, z.shape[-1])  # [ng·B·N, bottleneck]
        cls = head.last_layer(z[:, 0])
        z_rows = z_patch.index_select(0, idx_M)
        # fused: the K2-way layer stays inside the loss (soft_ce_linear); the weight is taken
        # here, where a bf16 teacher copy or FSDP's all-gathered parameters are in place
        rows = (z_rows, head.last_layer2.weight()) if self.fused_head else \
            head.last_layer2(z_rows)
        # centre statistic by linearity: mean over all patch tokens of W ẑ = W (mean ẑ)
        mean = head.last_layer2(z_patch.mean(0, keepdim=True)).reshape(-1)
        return cls, rows, mean

    # ------------------------------------------------------------------------------------------
    def forward_loss(self, images, masks, epoch):
        ng = self.ng
        B = images[0].shape[0]
        mb = self._mask_batch(masks, B)
        globals_ = images[0] if ng == 1 else torch.cat(images[:ng])
        crops = [globals_]
        if len(images) > ng:
            crops.append(images[ng] if len(images) == ng + 1 else torch.cat(images[ng:]))
        group_masks = [mb.masks_CBHW.reshape(-1, *mb.masks_CBHW.shape[-2:])] + [None] * (
            len(crops) - 1)
        if self.head_tokens == "all":  # the reference's head on every token, dense loss
            t_out = self.teacher_forward(globals_, None)
            n_koleo = globals_.shape[0] if self.koleo_weight > 0 else 0
            outs = self.module(crops, group_masks, koleo_rows=n_koleo)
            z_cls = outs.pop() if n_koleo else None
            s_out = outs[0]
            s_local = outs[1][0] if len(outs) > 1 else None
            terms = self.ibot_loss(s_out, t_out, s_local, masks, epoch)
            if n_koleo:
                terms = self.add_koleo(terms, z_cls)
            return terms, t_out[0], s_out[0]
        N = mb.masks_CBHW.shape[-2] * mb.masks_CBHW.shape[-1]
        # fp64 runs (the equality tests) take the weights in fp64, exact like the reference's
        idx_M, weight_M = mb.idx_M, mb.weights(torch.promote_types(globals_.dtype,
                                                                  torch.float32))
        if self.compile != "step" and mb.n_valid_host is not None:
            # eager: the heads run on the masked rows only. The padding rows (weight 0) add
            # exact zeros to the loss and its gradients, but cost head FLOPs: at the recipe's
            # masking about 3 of every 4 padded rows are padding. The compiled step keeps the
            # static M (a new length would recompile); without a host count (masks made on
            # the GPU) reading it would wait for the device, so the padding stays too.
            idx_M, weight_M = idx_M[:mb.n_valid_host], weight_M[:mb.n_valid_host]
        # [CLS] rows of every crop group, then the masked patch rows of the globals
        sel = torch.cat([self._cls_index(crops), patch_token_rows(idx_M, N)])
        if self.compile == "step":
            # drop-path draws and this epoch's temperatures enter as inputs: the compiled
            # graph holds no RNG and no per-epoch constant
            return self._step_fn(globals_, crops, group_masks, idx_M, weight_M, sel,
                                 self.fast_student.draws(crops), epoch,
                                 self._temperatures(epoch))
        return self._forward_selected(globals_, crops, group_masks, idx_M, weight_M, sel,
                                      None, epoch)

    def _forward_selected(self, globals_, crops, group_masks, idx_M, weight_M, sel, draws,
                          epoch, temperatures=None):
        """Teacher forward, student forward and loss of the selected-head step: the function
        ``--compile step`` compiles whole (static shapes). Returns ``(terms, teacher [CLS]
        logits, student global [CLS] logits)``."""
        ng = self.ng
        B = globals_.shape[0] // ng
        t_cls, t_rows, t_mean = self.teacher_forward(globals_, idx_M)
        n_cls = sum(c.shape[0] for c in crops)
        n_koleo = ng * B if self.koleo_weight > 0 else 0
        s_cls_all, *s_rows = self.module(crops, group_masks, sel, n_cls, draws, n_koleo)
        z_cls = s_rows.pop() if n_koleo else None
        s_cls, s_local = s_cls_all[:ng * B], s_cls_all[ng * B:]
        s_local = s_local if self.nl > 0 else None
        if self.fused_head:  # patch logits never materialised: (z, W) on both sides
            terms = self.ibot_loss.forward_selected_linear(
                s_cls, t_cls, s_local, *s_rows, *t_rows, weight_M, t_mean, epoch,
                temperatures=temperatures)
        else:
            terms = self.ibot_loss.forward_selected(
                s_cls, t_cls, s_local, s_rows[0], t_rows, weight_M, t_mean, epoch,
                temperatures=temperatures)
        if n_koleo:
            terms = self.add_koleo(terms, z_cls)
        return terms, t_cls, s_cls

    def _temperatures(self, epoch):
        """This epoch's teacher temperatures as 0-dim device tensors (made once per epoch: a
        host-to-device copy per step would wait for the GPU)."""
        if self._temps[0] != epoch:
            tau, tau2 = self.ibot_loss.temperatures(epoch)
            dev = self.device
            self._temps = (epoch, (torch.tensor(tau, dtype=torch.float64, device=dev),
                                   torch.tensor(tau2, dtype=torch.float64, device=dev)))
        return self._temps[1]

    def _cls_index(self, crops):
        """Rows of the [CLS] tokens in the student's token stream (globals, then locals)."""
        bb = self.student.backbone
        if self.swin:  # one row per final-stage token
            grids = [bb.token_grid(c.shape[-2], c.shape[-1]) for c in crops]
        else:
            p = bb.patch_size
            grids = [(c.shape[-2] // p, c.shape[-1] // p) for c in crops]
        layout = tuple((c.shape[0], 1 + h * w) for c, (h, w) in zip(crops, grids))
        return cls_rows(layout, crops[0].device)


__all__ = ["COMPILE_MODES", "DROP_PATH_MODES", "FastPath", "FastStudent", "HEAD_TOKENS",
           "patch_token_rows"]
