"""Checkpoints that travel: bytedance/ibot checkpoints in, backbones out.

    python -m ibot_fast.convert CHECKPOINT OUTPUT --to ibot_fast|backbone|reference|timm \
        [--which teacher|student] [--with_head] [--trust_pickle]

What a reference checkpoint looks like (``main_ibot.py`` ``save_dict``;
docs/reference-semantics.md#checkpoints-and-logs) and what changes on the way in:

* ``student``: DDP state dict, keys ``module.backbone.*`` / ``module.head.*``; ``teacher``:
  ``backbone.*`` / ``head.*`` (``module.`` too when the teacher had BatchNorm and was DDP-wrapped).
  The ``module.`` prefix is stripped.
* The heads' last layers are weight-normalised. The reference's ``nn.utils.weight_norm`` names
  the tensors ``weight_g`` [K, 1] / ``weight_v`` [K, bottleneck] (our names); a port on the
  parametrised ``nn.utils.parametrizations.weight_norm`` writes
  ``parametrizations.weight.original0`` (g) / ``original1`` (v). Both are read.
* ``args`` is a pickled ``argparse.Namespace``: ``torch.load(weights_only=True)`` refuses it
  unless the class is allow-listed, which :func:`load_checkpoint_any` does; anything else
  pickled needs ``trust_pickle=True`` (``weights_only=False``, only for files you trust). It
  becomes a dict; the flags the reference hard-codes (crop sizes, head widths) are read from the
  tensor shapes.
* ``ibot_loss`` (``center``, ``center2``), ``optimizer``, ``epoch`` and ``fp16_scaler`` (present
  only for fp16 runs) are kept as they are; torch's AdamW reads a torch-1.7 state (integer
  ``step``, no ``foreach``/``maximize`` keys) as it is.

Exports of one backbone (teacher by default):

* ``backbone``: a flat state dict that loads into ``ibot_fast.models.build_vit`` (strict),
  ``masked_embed`` (training-only) dropped;
* ``reference``: the reference's ``extract_backbone_weights.py`` format ``{"state_dict": …}``
  with the ``backbone.`` prefix stripped (``masked_embed`` kept, as that script keeps it;
  ``--with_head`` adds the ``head.*`` keys);
* ``timm``: timm's ``VisionTransformer`` key names (``cls_token``, ``pos_embed``,
  ``patch_embed.proj``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
  ``norm``). The DINO/iBOT ViT was written on timm's layout, so the names coincide; the export
  drops what timm has no slot for (``masked_embed``) and checks every remaining name, so
  ``timm.create_model("vit_small_patch16_224", num_classes=0).load_state_dict(sd)`` is strict.
* Swin (``--arch swin_*``): the reference's key names are ours, so its full and
  teacher-backbone files load as they are; the architecture comes from ``args`` (``arch``,
  ``window_size``; the crop size the windows were sized for is 224 unless ``args`` says
  otherwise) or from the tensors. ``timm`` export: timm's ``SwinTransformer`` names, which
  differ in one place: timm's patch merging opens the next stage (our ``layers.{s}.downsample``
  is timm's ``layers.{s+1}.downsample``); ``relative_position_index`` (a non-persistent buffer
  in timm) and ``masked_embed`` are dropped. So ``timm.create_model(
  "swin_tiny_patch4_window7_224", num_classes=0).load_state_dict(sd)`` takes a swin_tiny /
  window 7 export strictly (a window 14 backbone needs ``window_size=14`` at creation). The
  features are ours at 224 px (fp64 rounding once timm's LayerNorms get our eps 1e-6; its
  default 1e-5 moves them by ~1e-5); on grids that are not a multiple of the window (other
  input sizes) timm rolls before zero-padding where the reference pads first, so they differ.
* ``ibot_fast``: the whole checkpoint in ibot_fast's layout (what ``--load_from`` also does on
  the fly), to continue pre-training or to evaluate.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re

import torch

from ibot_fast import checkpoint as ckpt

FORMATS = ("ibot_fast", "backbone", "reference", "timm")

# new-style weight norm -> legacy names (ours and the reference's)
_PARAMETRIZED = (("parametrizations.weight.original0", "weight_g"),
                 ("parametrizations.weight.original1", "weight_v"))

# timm VisionTransformer parameter names (a ViT with a [CLS] token, absolute position
# embedding, qkv bias, no layer scale, no register tokens, classifier removed)
_TIMM_KEY = re.compile(
    r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)|"
    r"blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias))$")


# ------------------------------------------------------------------------------- loading
def load_checkpoint_any(path: str, trust_pickle: bool = False, map_location="cpu") -> dict:
    """torch.load a checkpoint of ibot_fast or of the reference.

    weights_only first (with ``argparse.Namespace`` allow-listed for the reference's ``args``);
    with ``trust_pickle`` a file that still needs arbitrary unpickling is opened with
    ``weights_only=False``. Without it such a file fails with a message saying so.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        state = ckpt.load_checkpoint(path, map_location=map_location)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as err:
        if not trust_pickle:
            raise ValueError(
                f"cannot open {path!r} with torch.load(weights_only=True), even with "
                f"argparse.Namespace allow-listed: {str(err).splitlines()[0]}. If you trust "
                "the file, pass trust_pickle=True (CLI: --trust_pickle), which unpickles "
                "arbitrary objects (weights_only=False).") from err
        state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def normalize_keys(state_dict: dict) -> dict:
    """Strip DDP ``module.`` prefixes and rename parametrised weight-norm tensors to
    ``weight_g``/``weight_v``. Order and tensors are kept (shared tensors stay shared)."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith("module."):
            k = k[len("module."):]
        for new, old in _PARAMETRIZED:
            if k.endswith(new):
                k = k[: -len(new)] + old
        out[k] = v
    return out


def is_reference_layout(state: dict) -> bool:
    """True for a checkpoint that needs :func:`reference_to_ibot_fast` before ibot_fast loads it."""
    if isinstance(state.get("args"), argparse.Namespace):
        return True
    for net in ("student", "teacher"):
        sd = state.get(net)
        if isinstance(sd, dict) and any(
                k.startswith("module.") or ".parametrizations.weight.original" in k for k in sd):
            return True
    return False


def _split(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def infer_vit_config(backbone_sd: dict) -> dict:
    """Architecture facts readable from a backbone state dict (no prefixes):
    embed_dim, patch_size, in_chans, depth, img_size (the position table's square), mlp_ratio."""
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in backbone_sd:
            raise ValueError(f"not a ViT backbone state dict: no {key!r} "
                             f"(first keys: {list(backbone_sd)[:5]})")
    embed_dim = backbone_sd["cls_token"].shape[-1]
    proj = backbone_sd["patch_embed.proj.weight"]  # [D, C, p, p]
    patch_size, in_chans = proj.shape[-1], proj.shape[1]
    depth = len({k.split(".")[1] for k in backbone_sd if k.startswith("blocks.")})
    n = backbone_sd["pos_embed"].shape[1] - 1
    side = round(n ** 0.5)
    if side * side != n:
        raise ValueError(f"pos_embed has {n} patch positions, not a square grid")
    mlp_ratio = backbone_sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim if depth else 4.0
    return dict(embed_dim=embed_dim, patch_size=patch_size, in_chans=in_chans, depth=depth,
                img_size=side * patch_size, mlp_ratio=mlp_ratio)


def is_swin_state(backbone_sd: dict) -> bool:
    return any(k.startswith("layers.") for k in backbone_sd)


def infer_swin_config(backbone_sd: dict) -> dict:
    """Swin facts readable from a backbone state dict: embed_dim, patch_size, in_chans,
    depths, num_heads, window_size (the first stage's window: the ``--window_size`` unless the
    crops were smaller than one window)."""
    proj = backbone_sd["patch_embed.proj.weight"]  # [C0, C, p, p]
    stages = sorted({int(k.split(".")[1]) for k in backbone_sd if k.startswith("layers.")})
    depths, heads = [], []
    for s in stages:
        blocks = {int(k.split(".")[3]) for k in backbone_sd
                  if k.startswith(f"layers.{s}.blocks.")}
        depths.append(len(blocks))
        heads.append(backbone_sd[f"layers.{s}.blocks.0.attn.relative_position_bias_table"]
                     .shape[1])
    table = backbone_sd["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
    return dict(embed_dim=proj.shape[0], patch_size=proj.shape[-1], in_chans=proj.shape[1],
                depths=tuple(depths), num_heads=tuple(heads),
                window_size=(round(table ** 0.5) + 1) // 2)


def swin_arch_for(cfg: dict) -> str:
    from ibot_fast.models.swin import SWIN_CONFIGS

    for name, c in SWIN_CONFIGS.items():
        if (c["embed_dim"], tuple(c["depths"]), tuple(c["num_heads"])) == (
                cfg["embed_dim"], cfg["depths"], cfg["num_heads"]):
            return name
    raise ValueError(f"no known Swin has embed_dim {cfg['embed_dim']}, depths {cfg['depths']}, "
                     f"num_heads {cfg['num_heads']}")


def timm_swin_state_dict(sd: dict) -> dict:
    """Our / the reference's Swin names -> timm's SwinTransformer names (see module doc)."""
    out = {}
    for k, v in sd.items():
        if k == "masked_embed" or k.endswith("relative_position_index"):
            continue
        m = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", k)
        out[f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}" if m else k] = v
    return out


_TIMM_SWIN_KEY = re.compile(
    r"^(patch_embed\.(proj|norm)\.(weight|bias)|norm\.(weight|bias)|"
    r"layers\.\d+\.downsample\.(norm\.(weight|bias)|reduction\.weight)|"
    r"layers\.\d+\.blocks\.\d+\.(attn\.relative_position_bias_table|"
    r"(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)))$")


def arch_for(embed_dim: int, depth: int) -> str:
    """The ibot_fast/reference arch name with this width and depth (built on the meta device)."""
    from ibot_fast.models.vit import ARCHS

    for name, factory in ARCHS.items():
        with torch.device("meta"):
            m = factory(patch_size=16)
        if m.embed_dim == embed_dim and m.depth == depth:
            return name
    raise ValueError(f"no known ViT has embed_dim {embed_dim} and depth {depth} "
                     f"(known: {', '.join(ARCHS)}); pass the arch explicitly")


def infer_head_config(head_sd: dict) -> dict:
    """IBOTHead sizes from a head state dict (no ``head.`` prefix)."""
    linears = sorted(int(m.group(1)) for k in head_sd
                     if (m := re.fullmatch(r"mlp\.(\d+)\.weight", k)))
    unknown = [k for k in head_sd if not re.fullmatch(
        r"mlp\.(\d+\.)?(weight|bias)|last_layer2?\.weight_[gv]", k)]
    if unknown:
        raise ValueError(f"head has keys ibot_fast's IBOTHead does not (a norm in the head, "
                         f"--norm_in_head, is not supported): {unknown[:4]}")
    if linears:
        nlayers, first, last = len(linears), head_sd[f"mlp.{linears[0]}.weight"], \
            head_sd[f"mlp.{linears[-1]}.weight"]
        hidden = first.shape[0]
    else:  # nlayers == 1: mlp is a bare Linear
        nlayers, last, hidden = 1, head_sd["mlp.weight"], 2048
    v1 = head_sd["last_layer.weight_v"]
    v2 = head_sd.get("last_layer2.weight_v", v1)
    return dict(nlayers=nlayers, hidden_dim=hidden, bottleneck_dim=last.shape[0],
                out_dim=v1.shape[0], patch_out_dim=v2.shape[0],
                shared_head=v1.shape == v2.shape and torch.equal(v1, v2))


# ------------------------------------------------------------------------------- conversion
def reference_args_to_dict(args, student_sd: dict | None = None) -> dict:
    """The reference's ``args`` (Namespace or dict) as an ibot_fast args dict.

    Flags the reference hard-codes are filled from the tensors: crop size from the position
    table, head widths from the head; ``precision`` follows ``use_fp16``."""
    d = ckpt.args_to_dict(args) if args is not None else {}
    arch = str(d.get("arch", ""))
    if arch.startswith("deit"):
        d["arch"] = arch.replace("deit", "vit", 1)
    for key in ("pred_ratio", "pred_ratio_var"):  # a scalar default in the reference
        if key in d and not isinstance(d[key], list):
            d[key] = [d[key]]
    if student_sd is not None:
        bb, head = _split(student_sd, "backbone."), _split(student_sd, "head.")
        if bb and is_swin_state(bb):  # Swin: no position table; the reference builds for 224
            cfg = infer_swin_config(bb)
            d.setdefault("global_crops_size", 224)
            d.setdefault("patch_size", cfg["patch_size"])
            d.setdefault("window_size", cfg["window_size"])
            if not d.get("arch"):
                d["arch"] = swin_arch_for(cfg)
        elif bb:
            cfg = infer_vit_config(bb)
            d.setdefault("global_crops_size", cfg["img_size"])
            d.setdefault("patch_size", cfg["patch_size"])
            if not d.get("arch"):
                d["arch"] = arch_for(cfg["embed_dim"], cfg["depth"])
        if head:
            h = infer_head_config(head)
            d.setdefault("head_hidden_dim", h["hidden_dim"])
            d.setdefault("head_bottleneck_dim", h["bottleneck_dim"])
            d.setdefault("out_dim", h["out_dim"])
    d.setdefault("local_crops_size", 96)
    if "precision" not in d and "use_fp16" in d:
        d["precision"] = "fp16" if d["use_fp16"] else "fp32"
    return d


def reference_to_ibot_fast(state: dict) -> dict:
    """A reference (bytedance/ibot) checkpoint dict in ibot_fast's layout (a new dict; the
    tensors are shared, not copied)."""
    missing = [k for k in ("student", "teacher") if k not in state]
    if missing:
        raise ValueError(f"not a full iBOT checkpoint: no {missing} entry (keys: {sorted(state)}"
                         "); a backbone-only file can be evaluated or exported, not resumed")
    student, teacher = normalize_keys(state["student"]), normalize_keys(state["teacher"])
    out = dict(state)
    out.update(student=student, teacher=teacher,
               args=reference_args_to_dict(state.get("args"), student),
               epoch=int(state.get("epoch", 0)),
               fp16_scaler=state.get("fp16_scaler"))
    if "ibot_loss" in state:
        out["ibot_loss"] = dict(state["ibot_loss"])
    return out


def to_ibot_fast(state: dict) -> dict:
    """Any full checkpoint in ibot_fast's layout (ours are returned unchanged)."""
    return reference_to_ibot_fast(state) if is_reference_layout(state) else state


def backbone_state_dict(state: dict, which: str = "teacher") -> dict:
    """The backbone of `which` net as a flat state dict (no prefixes), from a full checkpoint
    (ours or the reference's), an ``extract_backbone_weights`` file or a flat state dict."""
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    if which in state and isinstance(state[which], dict):
        sd = _split(normalize_keys(state[which]), "backbone.")
        if not sd:
            raise ValueError(f"checkpoint entry {which!r} has no backbone.* keys")
        return sd
    if "student" in state or "teacher" in state:
        raise ValueError(f"checkpoint has no {which!r} entry (keys: {sorted(state)})")
    sd = state.get("state_dict", state.get("model", state))  # extract_backbone_weights / flat
    sd = normalize_keys(sd)
    if any(k.startswith("backbone.") for k in sd):
        sd = _split(sd, "backbone.")
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


def head_state_dict(state: dict, which: str = "teacher") -> dict:
    if which not in state:
        raise ValueError(f"the projection head needs a full checkpoint with a {which!r} entry "
                         f"(keys: {sorted(state)[:6]})")
    return _split(normalize_keys(state[which]), "head.")


def export_backbone(state: dict, fmt: str, which: str = "teacher",
                    with_head: bool = False) -> dict:
    """The object to save for export format `fmt` ("backbone", "reference" or "timm")."""
    sd = backbone_state_dict(state, which)
    if fmt == "backbone":
        return {k: v for k, v in sd.items() if k != "masked_embed"}
    if fmt == "reference":
        out = dict(sd)
        if with_head:
            out.update({f"head.{k}": v for k, v in head_state_dict(state, which).items()})
        return {"state_dict": out}
    if fmt == "timm" and is_swin_state(sd):
        out = timm_swin_state_dict(sd)
        bad = [k for k in out if not _TIMM_SWIN_KEY.match(k)]
        if bad:
            raise ValueError(f"keys without a timm SwinTransformer counterpart: {bad[:5]}")
        return out
    if fmt == "timm":
        out = {k: v for k, v in sd.items() if k != "masked_embed"}
        bad = [k for k in out if not _TIMM_KEY.match(k)]
        if bad:
            raise ValueError(f"keys without a timm VisionTransformer counterpart: {bad[:5]}")
        return out
    raise ValueError(f"unknown export format {fmt!r}; choose backbone, reference or timm")


# ------------------------------------------------------------------------------- models
def build_backbone(state: dict, which: str = "teacher", arch: str | None = None):
    """(VisionTransformer with the checkpoint's weights, info dict). The architecture comes from
    ``args`` when the checkpoint has them, else from the tensor shapes (or `arch`)."""
    from ibot_fast.models import build_vit

    sd = backbone_state_dict(state, which)
    args = state.get("args")
    args = ckpt.args_to_dict(args) if args is not None else {}
    if is_swin_state(sd):
        return _build_swin_backbone(state, sd, which, args, arch)
    cfg = infer_vit_config(sd)
    name = arch or args.get("arch") or arch_for(cfg["embed_dim"], cfg["depth"])
    name = name.replace("deit", "vit", 1) if name.startswith("deit") else name
    if name.startswith("swin"):
        raise ValueError(f"arch {name!r}, but the {which} weights are a ViT's")
    backbone = build_vit(name, cfg["patch_size"], img_size=cfg["img_size"],
                         in_chans=cfg["in_chans"])
    sd = {k: v for k, v in sd.items() if k != "masked_embed"}
    try:
        backbone.load_state_dict(sd)
    except RuntimeError as err:
        raise ValueError(f"the {which} weights do not fit a {name}/{cfg['patch_size']} "
                         f"backbone: {str(err)[:400]}") from err
    info = dict(arch=name, patch_size=cfg["patch_size"], img_size=cfg["img_size"],
                epoch=state.get("epoch"), args=args)
    return backbone, info


def _build_swin_backbone(state, sd, which, args, arch):
    from ibot_fast.models.swin import SwinTransformer

    cfg = infer_swin_config(sd)
    name = arch or args.get("arch") or swin_arch_for(cfg)
    img_size = int(args.get("global_crops_size") or 224)
    window = int(args.get("window_size") or cfg["window_size"])
    backbone = SwinTransformer(img_size=img_size, patch_size=cfg["patch_size"],
                               in_chans=cfg["in_chans"], embed_dim=cfg["embed_dim"],
                               depths=cfg["depths"], num_heads=cfg["num_heads"],
                               window_size=window)
    try:
        backbone.load_state_dict({k: v for k, v in sd.items() if k != "masked_embed"})
    except RuntimeError as err:
        raise ValueError(f"the {which} weights do not fit a {name} (window {window}, "
                         f"{img_size}-px crops) backbone: {str(err)[:400]}") from err
    info = dict(arch=name, patch_size=cfg["patch_size"], img_size=img_size,
                window_size=window, epoch=state.get("epoch"), args=args)
    return backbone, info


def build_head(state: dict, which: str = "teacher"):
    """IBOTHead with the checkpoint's `which` head weights."""
    from ibot_fast.models import IBOTHead

    hsd = head_state_dict(state, which)
    if not hsd:
        raise ValueError(f"checkpoint entry {which!r} has no head.* keys")
    h = infer_head_config(hsd)
    bsd = backbone_state_dict(state, which)
    embed_dim = (bsd["norm.weight"].shape[0] if is_swin_state(bsd)
                 else infer_vit_config(bsd)["embed_dim"])
    head = IBOTHead(embed_dim, h["out_dim"], patch_out_dim=h["patch_out_dim"],
                    nlayers=h["nlayers"], hidden_dim=h["hidden_dim"],
                    bottleneck_dim=h["bottleneck_dim"], shared_head=h["shared_head"])
    head.load_state_dict(hsd)
    return head


def load_backbone(path: str, which: str = "teacher", arch: str | None = None,
                  trust_pickle: bool = False):
    """Open any checkpoint ibot_fast understands and return (backbone, info)."""
    return build_backbone(load_checkpoint_any(path, trust_pickle), which, arch)


# ------------------------------------------------------------------------------- CLI
def convert(src: str, dst: str, fmt: str, which: str = "teacher", with_head: bool = False,
            trust_pickle: bool = False) -> dict:
    if fmt not in FORMATS:
        raise ValueError(f"--to {fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
    state = load_checkpoint_any(src, trust_pickle)
    if fmt == "ibot_fast":
        out = to_ibot_fast(state)
    else:
        out = export_backbone(state, fmt, which, with_head)
    # Views into a bigger buffer (the fast step's flat EMA) would drag that whole buffer in.
    out = ckpt.own_storage(out)
    ckpt.atomic_save(out, dst)
    return out


def main(argv=None):
    p = argparse.ArgumentParser("ibot_fast.convert", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="ibot_fast or bytedance/ibot checkpoint (.pth)")
    p.add_argument("output", help="file to write (.pth)")
    p.add_argument("--to", choices=FORMATS, required=True,
                   help="ibot_fast: whole checkpoint in ibot_fast's layout; backbone: flat "
                        "state dict; reference: extract_backbone_weights format; timm: timm "
                        "VisionTransformer keys")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher")
    p.add_argument("--with_head", action="store_true",
                   help="reference format only: keep the head.* keys")
    p.add_argument("--trust_pickle", action="store_true",
                   help="allow arbitrary unpickling (weights_only=False); trusted files only")
    a = p.parse_args(argv)
    out = convert(a.checkpoint, a.output, a.to, a.which, a.with_head, a.trust_pickle)
    n = len(out.get("state_dict", out)) if a.to != "ibot_fast" else len(out["student"])
    print(f"[ibot_fast] wrote {a.output} ({a.to}, {a.which if a.to != 'ibot_fast' else 'all'}"
          f", {n} tensors)")
    return out


if __name__ == "__main__":
    main()
