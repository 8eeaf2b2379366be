"""Check an ImageFolder tree before a long run: ``python -m ibot_fast.data.check DIR``.

Decodes every image as the training loaders do (``ibot_fast.data.dataset.decode_image``, fully:
a truncated JPEG whose header is fine still fails), prints the number of images per class and
every file that cannot be decoded faithfully, with the reason: unreadable files, and files whose
pixels have no defined 8-bit RGB rendering (32-bit float images, 32-bit integers outside
0..65535), which the loaders skip as well. It also counts the files that decode only with a
conversion the reference's ``convert("RGB")`` does not make (16-bit scaled to 8-bit, alpha
composited on white, EXIF orientation applied, CMYK / palette / grey converted), so a dataset's
surprises are visible before a run. Exit status 0 when every image decodes, 1 when some do
not, 2 for a folder that is not an ImageFolder tree. ``--dali`` also decodes with DALI's CPU
decoder every file the DALI loader hands to DALI as it is (the others it decodes with PIL, see
``ibot_fast.data.dali``), which can reject files PIL accepts. ``--json FILE`` writes the same
report as JSON.

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

from ibot_fast.data.dataset import _BAD_IMAGE_ERRORS, decode_image, list_image_folder


def inspect_image(path: str) -> tuple[Optional[str], list[str]]:
    """(error, notes): error None when `path` decodes faithfully to RGB, else the reason
    ("ErrorType: message"); notes: the conversions decoding made (see `decode_image`)."""
    notes: list[str] = []
    try:
        decode_image(path, notes)  # decodes all pixel data
        return None, notes
    except _BAD_IMAGE_ERRORS as err:
        return f"{type(err).__name__}: {err}", notes


def check_image(path: str) -> Optional[str]:
    """None when `path` decodes faithfully to RGB; otherwise the reason ("ErrorType: message")."""
    return inspect_image(path)[0]


def _dali_reason(err: Exception) -> str:
    """The informative line of a DALI pipeline error (the decoder's own reason goes to stderr)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if ln.lower().startswith("failed to decode"):
            return ln.rstrip(" :")
    return lines[-1] if lines else type(err).__name__


def dali_undecodable(paths: list[str], num_threads: int = 2) -> dict[str, str]:
    """{path: reason} for files DALI's CPU decoder rejects (decoded one file per batch, so a
    failure names its file). Each file is handed over as the DALI loader hands it
    (`ibot_fast.data.dali.decoder_input`: as it is, or PIL-decoded; as it is when PIL cannot
    read its header)."""
    import numpy as np
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    from ibot_fast.data.dali import DECODER_ARGS, decoder_input

    @pipeline_def(batch_size=1, num_threads=num_threads, device_id=None, prefetch_queue_depth=1,
                  exec_async=False, exec_pipelined=False)
    def decode():
        data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
        return fn.decoders.image(data, device="cpu", output_type=types.RGB, **DECODER_ARGS)

    bad = {}
    pipe = None
    for path in paths:
        if pipe is None:  # a pipeline that failed is not reused
            pipe = decode()
            pipe.build()
        with open(path, "rb") as f:
            raw = f.read()
        try:
            data, _, _ = decoder_input(raw)
        except _BAD_IMAGE_ERRORS:  # PIL cannot read the header: let DALI say what it makes of it
            data = np.frombuffer(raw, dtype=np.uint8)
        try:
            pipe.feed_input("data", [data])
            pipe.run()
        except RuntimeError as err:
            bad[path] = f"DALI: {_dali_reason(err)}"
            pipe = None
    return bad


def check_folder(root, num_workers: int = 2, dali: bool = False) -> dict:
    """{"root", "classes": {name: count}, "num_images", "bad": [{"path", "class", "error"}],
    "converted": {note: count}, "converted_files": {path: [notes]}}."""
    samples, classes = list_image_folder(root)
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:  # PIL releases the GIL
        results = list(pool.map(inspect_image, [p for p, _ in samples]))
    bad = {p: e for (p, _), (e, _) in zip(samples, results) if e is not None}
    converted = {p: notes for (p, _), (e, notes) in zip(samples, results) if e is None and notes}
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
        "converted": dict(sorted(Counter(n for notes in converted.values()
                                         for n in notes).items())),
        "converted_files": dict(sorted(converted.items())),
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
    if report.get("converted"):
        lines.append(f"{len(report['converted_files'])} file(s) decoded with a conversion:")
        lines += [f"  {n:>6}  {note}" for note, n in report["converted"].items()]
    if report["bad"]:
        lines.append(f"{len(report['bad'])} unreadable file(s) (the training loaders skip them):")
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
