"""`python -m ibot_fast.data.check DIR`: counts per class, unreadable files, exit codes."""

import json

import pytest
from PIL import Image

from ibot_fast.data.check import check_folder, main


@pytest.fixture
def folder(tmp_path):
    for cls, n in (("cat", 3), ("dog", 2)):
        (tmp_path / cls).mkdir()
        for k in range(n):
            Image.new("RGB", (40, 30), (20 * k, 50, 90)).save(tmp_path / cls / f"{k}.jpg")
    (tmp_path / "empty").mkdir()
    return tmp_path


def break_files(root):
    (root / "cat" / "garbage.jpg").write_bytes(b"<html>not found</html>")
    good = (root / "dog" / "0.jpg").read_bytes()
    (root / "dog" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "dog" / "zero.png").write_bytes(b"")
    return {str(root / "cat" / "garbage.jpg"), str(root / "dog" / "truncated.jpg"),
            str(root / "dog" / "zero.png")}


def test_clean_folder(folder, capsys):
    report = check_folder(folder)
    assert report["classes"] == {"cat": 3, "dog": 2, "empty": 0}
    assert report["num_images"] == 5 and report["bad"] == []
    assert main([str(folder)]) == 0
    out = capsys.readouterr().out
    assert "5 images in 3 classes" in out and "all images decode" in out
    assert "empty classes (no image files): empty" in out


def test_bad_files_are_listed_with_reasons(folder, tmp_path_factory, capsys):
    bad = break_files(folder)
    report = check_folder(folder)
    assert report["classes"] == {"cat": 4, "dog": 4, "empty": 0}
    assert {b["path"] for b in report["bad"]} == bad
    by_path = {b["path"]: b for b in report["bad"]}
    assert by_path[str(folder / "dog" / "truncated.jpg")]["class"] == "dog"
    assert "truncated" in by_path[str(folder / "dog" / "truncated.jpg")]["error"].lower()
    assert "UnidentifiedImageError" in by_path[str(folder / "cat" / "garbage.jpg")]["error"]
    out_json = tmp_path_factory.mktemp("out") / "report.json"
    assert main([str(folder), "--json", str(out_json), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "3 unreadable file(s)" in out and all(p in out for p in bad)
    assert json.loads(out_json.read_text())["bad"] == report["bad"]


def test_dali_decoder_check(folder):
    pytest.importorskip("nvidia.dali")
    from ibot_fast.data.check import dali_undecodable

    bad = break_files(folder)
    paths = sorted(str(p) for p in folder.rglob("*.*"))
    found = dali_undecodable(paths, num_threads=1)
    assert set(found) == bad  # the good files decode, every broken one is named
    assert all(reason.startswith("DALI: ") for reason in found.values())


def test_not_an_image_folder(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2  # no class sub-folders


def test_unfaithful_files_are_listed_and_conversions_counted(tmp_path, capsys):
    from image_modes import write_mode_images

    images = write_mode_images(tmp_path / "modes")
    report = check_folder(tmp_path)
    refused = {p for p, want, _ in images.values() if want is None}
    assert {b["path"] for b in report["bad"]} == refused
    assert all("UnfaithfulImageError" in b["error"] for b in report["bad"])
    conv = report["converted"]
    assert conv["16-bit scaled to 8-bit"] == 3  # I;16, I;16B, I (the 48-bit PNG reads as RGB)
    assert conv["alpha composited on white"] == 3  # RGBA, LA, palette with transparency
    assert conv["CMYK converted to RGB (no ICC profile applied)"] == 1
    assert sum(v for k, v in conv.items() if k.startswith("EXIF orientation")) == 4
    assert main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "file(s) decoded with a conversion" in out and "2 unreadable file(s)" in out
