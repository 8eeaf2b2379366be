"""Image files in every mode the loaders must decode, with the RGB each should become.

`write_mode_images(folder)` writes them with PIL (and one 48-bit PNG by hand, which PIL cannot
write) and returns {name: (path, expected uint8 [H, W, 3] or None, tolerance)}; expected is
computed here with numpy, independently of `ibot_fast.data.dataset.decode_image`. None marks a
file that must be refused (no defined 8-bit rendering). Shared by the torch, check and DALI
tests.
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
from PIL import Image

SIZE = 24  # square: a full-image crop keeps every pixel, and EXIF turns keep the size
WHITE = 255


def _sixteen_bit(seed=0):
    """Values like a real 16-bit scan (3084..56026): convert("RGB") would make them all 255."""
    rng = np.random.default_rng(seed)
    return rng.integers(3084, 56027, size=(SIZE, SIZE)).astype(np.uint16)


def _grey_rgb(v8):
    return np.repeat(v8[..., None], 3, axis=2).astype(np.uint8)


def _scale16(v):
    return np.round(v.astype(np.float64) / 257.0).astype(np.uint8)


def _composite(rgb, alpha):
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.round(rgb * a + WHITE * (1.0 - a)).astype(np.uint8)


def _write_png_rgb16(path, rgb16):
    """A 48-bit RGB PNG (bit depth 16, colour type 2), written by hand."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


ORIENT_OPS = {  # EXIF orientation -> what a viewer shows of the stored pixels
    1: lambda x: x, 2: np.fliplr, 3: lambda x: np.rot90(x, 2), 4: np.flipud,
    5: lambda x: x.swapaxes(0, 1), 6: lambda x: np.rot90(x, -1),
    7: lambda x: np.rot90(x, 2).swapaxes(0, 1), 8: lambda x: np.rot90(x, 1),
}


def write_mode_images(folder, orientations=(3, 6, 8)) -> dict:
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    out = {}

    def path(name):
        return os.path.join(folder, name)

    v16 = _sixteen_bit()
    Image.fromarray(v16).save(path("gray16.png"))  # opens as I;16
    out["gray16.png"] = (path("gray16.png"), _grey_rgb(_scale16(v16)), 0)
    Image.frombytes("I;16B", (SIZE, SIZE), v16.astype(">u2").tobytes()).save(path("gray16b.tif"))
    out["gray16b.tif"] = (path("gray16b.tif"), _grey_rgb(_scale16(v16)), 0)
    Image.fromarray(v16.astype(np.int32)).save(path("int32.tif"))  # mode I, 16-bit values
    out["int32.tif"] = (path("int32.tif"), _grey_rgb(_scale16(v16)), 0)
    rgb16 = rng.integers(0, 65536, size=(SIZE, SIZE, 3)).astype(np.uint16)
    _write_png_rgb16(path("rgb16.png"), rgb16)  # PIL reads the high byte of each sample
    out["rgb16.png"] = (path("rgb16.png"), (rgb16 >> 8).astype(np.uint8), 0)

    rgb = rng.integers(0, 256, size=(SIZE, SIZE, 3)).astype(np.uint8)
    Image.fromarray(rgb[..., 1], "L").save(path("gray.png"))  # 8-bit grey (the MNIST demo's)
    out["gray.png"] = (path("gray.png"), _grey_rgb(rgb[..., 1]), 0)
    alpha = rng.integers(0, 256, size=(SIZE, SIZE)).astype(np.uint8)
    alpha[:4] = 0    # fully transparent rows: white, whatever colour is stored there
    alpha[4:8] = 255
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path("rgba.png"))
    out["rgba.png"] = (path("rgba.png"), _composite(rgb, alpha), 1)
    Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA").save(path("la.png"))
    out["la.png"] = (path("la.png"), _composite(_grey_rgb(rgb[..., 0]), alpha), 1)

    palette = rng.integers(0, 256, size=(16, 3)).astype(np.uint8)
    index = rng.integers(0, 16, size=(SIZE, SIZE)).astype(np.uint8)
    p_img = Image.fromarray(index, "P")
    p_img.putpalette(palette.flatten().tolist())
    p_img.save(path("palette.png"))
    out["palette.png"] = (path("palette.png"), palette[index], 0)
    p_img.save(path("palette_trns.png"), transparency=3)  # colour 3 is transparent
    want = palette[index].copy()
    want[index == 3] = WHITE
    out["palette_trns.png"] = (path("palette_trns.png"), want, 0)

    cmyk = rng.integers(0, 256, size=(SIZE, SIZE, 4)).astype(np.uint8)
    Image.fromarray(cmyk, "CMYK").save(path("cmyk.tif"))
    c = cmyk.astype(np.float64)
    want = (255 - c[..., :3]) * (255 - c[..., 3:]) / 255.0
    out["cmyk.tif"] = (path("cmyk.tif"), np.round(want).astype(np.uint8), 1)

    # EXIF-rotated JPEGs: the same stored pixels, so the expected image is the decoded
    # orientation-1 file turned as a viewer would turn it.
    smooth = np.kron(rng.integers(0, 256, size=(SIZE // 4, SIZE // 4, 3)),
                     np.ones((4, 4, 1))).astype(np.uint8)
    Image.fromarray(smooth).save(path("exif1.jpg"), quality=95)
    stored = np.asarray(Image.open(path("exif1.jpg")).convert("RGB"))
    out["exif1.jpg"] = (path("exif1.jpg"), stored, 0)
    for o in orientations:
        exif = Image.Exif()
        exif[0x0112] = o
        Image.fromarray(smooth).save(path(f"exif{o}.jpg"), quality=95, exif=exif.tobytes())
        out[f"exif{o}.jpg"] = (path(f"exif{o}.jpg"), np.ascontiguousarray(ORIENT_OPS[o](stored)), 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(path("exif6.png"), exif=exif.tobytes())
    out["exif6.png"] = (path("exif6.png"), np.ascontiguousarray(ORIENT_OPS[6](rgb)), 0)

    Image.fromarray(rng.random((SIZE, SIZE)).astype(np.float32)).save(path("float.tif"))
    out["float.tif"] = (path("float.tif"), None, 0)
    big = v16.astype(np.int32) * 4  # 32-bit values beyond 65535
    Image.fromarray(big).save(path("int32_big.tif"))
    out["int32_big.tif"] = (path("int32_big.tif"), None, 0)
    return out
