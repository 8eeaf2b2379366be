"""Backbone + head over a list of crops, and the student/teacher pair of iBOT."""
import torch
import torch.nn as nn

from ibot_fast.models.head import IBOTHead
from ibot_fast.models.swin import build_swin, is_swin
from ibot_fast.models.vit import build_vit


def build_backbone(arch, patch_size, img_size, window_size=7, **kwargs):
    """A ViT (``vit_*`` / ``deit_*``) or a Swin (``swin_*``, windows of ``window_size``; the
    stage windows are sized for ``img_size``) by name."""
    if is_swin(arch):
        return build_swin(arch, patch_size, window_size=window_size, img_size=img_size,
                          **kwargs)
    return build_vit(arch, patch_size, img_size=img_size, **kwargs)


def _cat(tensors):
    """torch.cat along the batch, without the copy when there is only one tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


class MultiCropWrapper(nn.Module):
    """Run the backbone once per run of same-size crops, then the head once on everything.

    forward(x, mask=None, return_backbone_feat=False, return_cls_bottleneck=False):
      x     Tensor [B, C, H, W] or list of them (one per crop).
      mask  None, or (same length as x) a list of bool [B, H/p, W/p]; a single tensor goes with
            a single-tensor x.
    Consecutive crops of equal H×W are concatenated along the batch and go through the
    backbone together (with their concatenated masks). Outputs are concatenated crop-major
    (all images of crop 0, then crop 1, ...), which the loss's chunk() relies on, and go
    through the head in one call. Returns the head output ((cls, patch) for token outputs) or,
    with return_backbone_feat, (head_out, backbone_tokens). Note: the reference returns the
    two in the opposite order, (backbone_tokens, head_out). With return_cls_bottleneck (not
    in the reference; ``--koleo_weight``), ``(head_out, z)``: the head's normalised bottleneck
    vectors of the [CLS] tokens, [n·B, bottleneck], computed inside this forward so that DDP
    and FSDP see every use of the head's parameters.
    Extra keyword arguments go to the backbone (e.g. return_all_tokens=False).
    """

    def __init__(self, backbone, head=None):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Identity() if head is None else head

    def forward(self, x, mask=None, return_backbone_feat=False, return_cls_bottleneck=False,
                **backbone_kwargs):
        crops = list(x) if isinstance(x, (list, tuple)) else [x]
        if mask is None:
            masks = None
        else:
            masks = list(mask) if isinstance(mask, (list, tuple)) else [mask]
            if len(masks) != len(crops):
                raise ValueError(f"got {len(masks)} masks for {len(crops)} crops; pass one mask "
                                 "per crop (or mask=None)")
        if not crops:
            raise ValueError("MultiCropWrapper got an empty list of crops")

        # runs of consecutive crops with equal spatial size: [(start, end), ...]
        groups, start = [], 0
        for i in range(1, len(crops) + 1):
            if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
                groups.append((start, i))
                start = i

        feats = []
        for s, e in groups:
            kwargs = dict(backbone_kwargs)
            if masks is not None:
                group_masks = masks[s:e]
                if any(m is None for m in group_masks):
                    if not all(m is None for m in group_masks):
                        raise ValueError(f"crops {s}..{e - 1} have the same size but only some "
                                         "have a mask; give all of them a mask or none")
                else:
                    kwargs["mask"] = _cat(group_masks)  # [n·B, h, w]
            feats.append(self.backbone(_cat(crops[s:e]), **kwargs))  # [n·B, T, D] or [n·B, D]

        if len({tuple(f.shape[1:]) for f in feats}) > 1:
            sizes = ", ".join(f"{tuple(crops[s].shape[-2:])}->{tuple(f.shape[1:])}"
                              for (s, _), f in zip(groups, feats))
            raise ValueError(f"backbone outputs of the crop groups differ in shape ({sizes}); "
                             "crops of different sizes give different token counts, so call "
                             "the wrapper separately for global and local crops (or use "
                             "return_all_tokens=False)")
        feats = _cat(feats)
        out = self.head(feats)
        if return_backbone_feat:
            return out, feats
        if return_cls_bottleneck:
            # the MLP again on the [CLS] rows only: IBOTHead.forward keeps the reference's
            # return value, and these few rows cost little next to the head on every token
            return out, self.head.bottleneck(feats[:, 0] if feats.ndim == 3 else feats)
        return out


def build_ibot_models(arch, patch_size, img_size, out_dim, patch_out_dim, shared_head,
                      shared_head_teacher=True, norm_last_layer=True, drop_path=0.1,
                      use_masked_im_modeling=True, head_hidden_dim=2048,
                      head_bottleneck_dim=256, window_size=7):
    """Build the (student, teacher) MultiCropWrapper pair as the reference's train_ibot does.

    * student: ViT (or Swin: ``swin_*`` arch, ``window_size``) with stochastic depth `drop_path` and a mask token (if
      use_masked_im_modeling); head with `norm_last_layer` and `shared_head`.
    * teacher: ViT without drop path or mask token; head with the default norm_last_layer=True
      and `shared_head_teacher`; starts as a copy of the student (load_state_dict,
      strict=False, which skips the student's masked_embed); no parameter requires grad.

    Quirk kept from the reference: with a shared teacher head and separate student heads the
    teacher's single last layer receives both the student's last_layer.* and last_layer2.*
    keys; load_state_dict visits last_layer2 last, so the teacher starts from the student's
    *patch* layer (later EMA steps pair it with the student's last_layer by name).
    """
    if shared_head != shared_head_teacher and patch_out_dim != out_dim:
        raise ValueError(
            f"patch_out_dim ({patch_out_dim}) must equal out_dim ({out_dim}) when exactly one "
            f"of the student (shared_head={shared_head}) and teacher "
            f"(shared_head_teacher={shared_head_teacher}) heads is shared: the shared one's "
            "patch layer is its out_dim-way [CLS] layer, and the teacher is copied from the "
            "student")
    student_backbone = build_backbone(arch, patch_size, img_size, window_size,
                                      drop_path_rate=drop_path,
                                      masked_im_modeling=use_masked_im_modeling)
    teacher_backbone = build_backbone(arch, patch_size, img_size, window_size,
                                      drop_path_rate=0.0)
    embed_dim = student_backbone.num_features  # Swin: the final stage's width
    # head widths are fixed in the reference (2048 hidden, 256 bottleneck); flags here so the
    # CPU demo can use a narrower head
    dims = dict(hidden_dim=head_hidden_dim, bottleneck_dim=head_bottleneck_dim)
    student = MultiCropWrapper(student_backbone, IBOTHead(
        embed_dim, out_dim, patch_out_dim=patch_out_dim, norm_last_layer=norm_last_layer,
        shared_head=shared_head, **dims))
    teacher = MultiCropWrapper(teacher_backbone, IBOTHead(
        embed_dim, out_dim, patch_out_dim=patch_out_dim, shared_head=shared_head_teacher,
        **dims))
    teacher.load_state_dict(student.state_dict(), strict=False)
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher
