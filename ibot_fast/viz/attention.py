"""Last-layer [CLS] self-attention of every head, as in the iBOT paper's Fig. 6 (and DINO's).

    python -m ibot_fast.viz.attention [IMAGE] --checkpoint CKPT [--which teacher|student] \
        [--image_size 480] [--threshold 0.6] --output attention.png

The image is resized (shorter side ``--image_size``, bicubic) and centre-cropped to a multiple
of the patch size; the position table is interpolated to its grid. For each head h the map is
row 0 (the [CLS] query) of the last block's softmax(q kᵀ / √d_h), restricted to the patch keys:
``A[h, n] = attn[0, h, 0, 1 + n]``, each in [0, 1] and summing over n to 1 − attn[CLS → CLS].
The probabilities come from the explicit ("math") attention path, whatever back end the blocks
use for training.

The PNG has two rows of ``1 + heads`` tiles of the crop's size: the image, then each head's map
(min-max scaled per head, viridis, patch cells upsampled by nearest neighbour); below, the image
kept where the head's thresholded mask is on: the smallest set of patches holding ``threshold``
of the head's mass (the reference's ``visualize_attention.py`` default 0.6), the rest dimmed.
Without IMAGE the photo bundled with matplotlib (``grace_hopper.jpg``) is used.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from PIL import Image

from ibot_fast.data.transforms import to_tensor_normalize


def sample_image_path() -> str:
    """A real photo that ships inside matplotlib (Grace Hopper, 512×600 JPEG)."""
    from matplotlib import cbook

    return str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def prepare_image(img: Image.Image, image_size: int, patch_size: int) -> Image.Image:
    """Shorter side -> image_size (bicubic), then a centre crop to multiples of patch_size."""
    if image_size < patch_size:
        raise ValueError(f"image_size ({image_size}) must be >= the patch size ({patch_size})")
    img = img.convert("RGB")
    w, h = img.size
    scale = image_size / min(w, h)
    w, h = max(patch_size, round(w * scale)), max(patch_size, round(h * scale))
    img = img.resize((w, h), Image.BICUBIC)
    cw, ch = w // patch_size * patch_size, h // patch_size * patch_size
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


SWIN_REFUSAL = ("attention maps are drawn for ViT backbones only: a Swin backbone has no "
                "[CLS] token that attends (its [CLS] slot is the average of the final-stage "
                "tokens) and attends within windows")


@torch.no_grad()
def cls_attention_maps(backbone, x: torch.Tensor) -> np.ndarray:
    """[1, 3, H, W] -> [heads, H/p, W/p]: last-layer attention of [CLS] on every patch."""
    from ibot_fast.models import is_swin
    if is_swin(backbone):
        raise ValueError(SWIN_REFUSAL)
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image [1, 3, H, W], got {tuple(x.shape)}")
    backbone.eval()
    p = backbone.patch_size
    param = next(backbone.parameters())
    attn = backbone.get_last_selfattention(x.to(param.device, param.dtype))  # [1, nh, T, T]
    nh = attn.shape[1]
    maps = attn[0, :, 0, 1:].float().reshape(nh, x.shape[-2] // p, x.shape[-1] // p)
    return maps.cpu().numpy()


def threshold_masks(maps: np.ndarray, keep: float = 0.6) -> np.ndarray:
    """Boolean masks [heads, h, w]: per head the highest-attention patches that together hold
    `keep` of its (renormalised) patch mass."""
    if not 0 < keep <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {keep}")
    nh = maps.shape[0]
    flat = maps.reshape(nh, -1).astype(np.float64)
    order = np.argsort(flat, axis=1)  # ascending
    val = np.take_along_axis(flat, order, axis=1)
    cum = np.cumsum(val / val.sum(axis=1, keepdims=True), axis=1)
    sorted_mask = cum > 1 - keep  # the tail of the ascending order: the top `keep` mass
    mask = np.zeros_like(sorted_mask)
    np.put_along_axis(mask, order, sorted_mask, axis=1)
    return mask.reshape(maps.shape)


def render(img: Image.Image, maps: np.ndarray, masks: np.ndarray) -> Image.Image:
    """Two rows of (image, head 0, …, head nh-1) tiles of the image's size."""
    from matplotlib import colormaps

    W, H = img.size
    nh = maps.shape[0]
    base = np.asarray(img, dtype=np.float32) / 255.0  # [H, W, 3]
    canvas = np.zeros((2 * H, (1 + nh) * W, 3), dtype=np.float32)
    canvas[:H, :W] = base
    canvas[H:, :W] = base
    cmap = colormaps["viridis"]

    def up(a):  # [h, w] -> [H, W], each patch cell repeated (nearest neighbour)
        return np.kron(a, np.ones((H // a.shape[0], W // a.shape[1]), dtype=a.dtype))

    for j in range(nh):
        m = maps[j]
        span = m.max() - m.min()
        scaled = (m - m.min()) / span if span > 0 else np.zeros_like(m)
        x0 = (1 + j) * W
        canvas[:H, x0:x0 + W] = cmap(up(scaled))[..., :3]
        keep = up(masks[j].astype(np.float32))[..., None]
        canvas[H:, x0:x0 + W] = base * (0.25 + 0.75 * keep)
    return Image.fromarray((canvas.clip(0, 1) * 255).round().astype(np.uint8))


def attention_figure(backbone, image, image_size: int = 480, threshold: float = 0.6):
    """(PIL picture, maps [heads, h, w], the prepared crop) for a path or a PIL image."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as f:
            image = f.convert("RGB")
    crop = prepare_image(image, image_size, backbone.patch_size)
    x = to_tensor_normalize(crop)[None]
    maps = cls_attention_maps(backbone, x)
    return render(crop, maps, threshold_masks(maps, threshold)), maps, crop


def main(argv=None):
    from ibot_fast.convert import load_backbone

    p = argparse.ArgumentParser("ibot_fast.viz.attention", description=__doc__.split("\n")[0])
    p.add_argument("image", nargs="?", default=None,
                   help="image file (default: the photo bundled with matplotlib)")
    p.add_argument("--checkpoint", required=True,
                   help="ibot_fast or bytedance/ibot checkpoint, or an exported backbone")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher")
    p.add_argument("--image_size", type=int, default=480, help="shorter side after resizing")
    p.add_argument("--threshold", type=float, default=0.6,
                   help="fraction of attention mass kept in the masks (second row)")
    p.add_argument("--output", default="attention.png")
    p.add_argument("--save_maps", action="store_true",
                   help="also write the raw maps [heads, h, w] next to the PNG (.npy)")
    p.add_argument("--trust_pickle", action="store_true",
                   help="open checkpoints that need weights_only=False (trusted files only)")
    a = p.parse_args(argv)
    image = a.image or sample_image_path()
    if not os.path.isfile(image):
        raise SystemExit(f"image {image!r} does not exist")
    backbone, info = load_backbone(a.checkpoint, a.which, trust_pickle=a.trust_pickle)
    if info["arch"].startswith("swin"):
        raise SystemExit(f"{a.checkpoint}: {info['arch']}: {SWIN_REFUSAL}")
    pic, maps, crop = attention_figure(backbone, image, a.image_size, a.threshold)
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    pic.save(a.output)
    if a.save_maps:
        np.save(os.path.splitext(a.output)[0] + ".npy", maps)
    print(f"[ibot_fast] wrote {a.output}: {maps.shape[0]} heads of {info['arch']}/"
          f"{info['patch_size']} on a {crop.size[0]}x{crop.size[1]} crop of {image}")
    return pic, maps


if __name__ == "__main__":
    main()
