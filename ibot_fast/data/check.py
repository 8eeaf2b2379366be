"""Check an ImageFolder tree before a long run: ``python -m ibot_fast.data.check DIR``.

Decodes every image (PIL, fully: a truncated JPEG whose header is fine still fails), prints the
number of images per class and every file that cannot be read, with the reason. Exit status 0
when every image decodes, 1 when some do not, 2 for a folder that is not an ImageFolder tree.
``--dali`` also decodes each file with DALI's CPU decoder (what ``--data_backend dali`` uses),
which can reject files PIL accepts. ``--json FILE`` writes the same report as JSON.

The training loaders skip unreadable files (logged, counted) or fail naming them; this tool
lists them all at once, so they can be removed before the run instead of being met one by one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from PIL import Image

from ibot_fast.data.dataset import _BAD_IMAGE_ERRORS, list_image_folder


def check_image(path: str) -> Optional[str]:
    """None when PIL decodes `path` to RGB; otherwise the reason ("ErrorType: message")."""
    try:
        with Image.open(path) as im:
            im.convert("RGB")  # decodes all pixel data
        return None
    except _BAD_IMAGE_ERRORS as err:
        return f"{type(err).__name__}: {err}"


def _dali_reason(err: Exception) -> str:
    """The informative line of a DALI pipeline error (the decoder's own reason goes to stderr)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if ln.lower().startswith("failed to decode"):
            return ln.rstrip(" :")
    return lines[-1] if lines else type(err).__name__


def dali_undecodable(paths: list[str], num_threads: int = 2) -> dict[str, str]:
    """{path: reason} for files DALI's CPU decoder rejects (decoded one file per batch, so a
    failure names its file)."""
    import numpy as np
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=1, num_threads=num_threads, device_id=None, prefetch_queue_depth=1,
                  exec_async=False, exec_pipelined=False)
    def decode():
        data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
        return fn.decoders.image(data, device="cpu", output_type=types.RGB,
                                 adjust_orientation=False)

    bad = {}
    pipe = None
    for path in paths:
        if pipe is None:  # a pipeline that failed is not reused
            pipe = decode()
            pipe.build()
        with open(path, "rb") as f:
            data = np.frombuffer(f.read(), dtype=np.uint8)
        try:
            pipe.feed_input("data", [data])
            pipe.run()
        except RuntimeError as err:
            bad[path] = f"DALI: {_dali_reason(err)}"
            pipe = None
    return bad


def check_folder(root, num_workers: int = 2, dali: bool = False) -> dict:
    """{"root", "classes": {name: count}, "num_images", "bad": [{"path", "class", "error"}]}."""
    samples, classes = list_image_folder(root)
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:  # PIL releases the GIL
        errors = list(pool.map(check_image, [p for p, _ in samples]))
    bad = {p: e for (p, _), e in zip(samples, errors) if e is not None}
    if dali:
        good = [p for p, _ in samples if p not in bad]
        bad.update(dali_undecodable(good, num_threads=max(1, num_workers)))
    counts = Counter(label for _, label in samples)
    label_of = dict(samples)
    return {
        "root": os.fspath(root),
        "classes": {cls: counts.get(i, 0) for i, cls in enumerate(classes)},
        "num_images": len(samples),
        "bad": [{"path": p, "class": classes[label_of[p]], "error": e}
                for p, e in sorted(bad.items())],
    }


def format_report(report: dict) -> str:
    lines = [f"{report['root']}: {report['num_images']} images in "
             f"{len(report['classes'])} classes"]
    width = max(len(c) for c in report["classes"])
    for cls, n in report["classes"].items():
        lines.append(f"  {cls:<{width}}  {n}")
    empty = [c for c, n in report["classes"].items() if n == 0]
    if empty:
        lines.append(f"empty classes (no image files): {', '.join(empty)}")
    if report["bad"]:
        lines.append(f"{len(report['bad'])} unreadable file(s):")
        lines += [f"  {b['path']}  ({b['error']})" for b in report["bad"]]
    else:
        lines.append("all images decode")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser("python -m ibot_fast.data.check", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("root", help="ImageFolder root (root/<class>/<image>)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="decoding threads")
    p.add_argument("--dali", action="store_true",
                   help="also decode with DALI's CPU decoder (needs nvidia-dali)")
    p.add_argument("--json", default=None, help="also write the report to this JSON file")
    args = p.parse_args(argv)
    try:
        report = check_folder(args.root, args.workers, args.dali)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if report["bad"] else 0


if __name__ == "__main__":
    sys.exit(main())
