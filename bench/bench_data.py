"""Benchmark: images/s of the full iBOT multi-crop data path, DALI vs the torch/PIL loader.

    python -m pytest bench/bench_data.py --benchmark-only -q

Recipe shapes (README ViT-S/16: 2 x 224 + 10 x 96 crops, scales (0.25, 1) / (0.05, 0.25),
masks for the two global crops on the 14 x 14 grid), one epoch over a small folder of JPEG
photos (matplotlib's grace_hopper.jpg, regions re-encoded at 320-500 px, ImageNet-like sizes)
per round, batch 16, both back ends side by side:

* ``torch``: ImageFolderMask + MultiCropAugmentation (PIL) in DataLoader workers (one per core);
* ``dali-cpu``: the DALI pipeline on the CPU (``device_id=None``), one thread per core;
* ``dali-gpu`` (marked gpu; skipped without CUDA): "mixed" nvJPEG decoding and every op on the
  GPU, 16 images/batch x more images; the goal is >= 3,000 images/s on one H100.

``extra_info`` reports images/s and ms/image (x cores = core-ms per image, the budget figure of
docs/design.md#bounds: the reference's PIL path costs 18-20 ms per image per core).
"""

import os

import pytest
import torch
from PIL import Image

from ibot_fast.data import ImageFolderMask, MultiCropAugmentation, build_pretrain_loader
from ibot_fast.masking import MaskGenerator

N_IMAGES = 64
BATCH = 16
CORES = min(2, os.cpu_count() or 1)
RECIPE = dict(global_crops_scale=(0.25, 1.0), local_crops_scale=(0.05, 0.25),
              global_crops_number=2, local_crops_number=10, global_crops_size=224,
              local_crops_size=96)


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory):
    import matplotlib

    src = Image.open(os.path.join(matplotlib.get_data_path(), "sample_data",
                                  "grace_hopper.jpg")).convert("RGB")
    root = tmp_path_factory.mktemp("bench_photos")
    sizes = [(500, 375), (375, 500), (450, 450), (400, 320)]
    for k in range(N_IMAGES):
        w, h = src.size
        x0, y0 = (k * 13) % (w // 4), (k * 29) % (h // 4)
        img = src.crop((x0, y0, x0 + 3 * w // 4, y0 + 3 * h // 4)).resize(sizes[k % 4])
        d = root / f"c{k % 2}"
        d.mkdir(exist_ok=True)
        img.save(d / f"img{k:03d}.jpg", quality=90)
    return str(root)


def _dataset(root):
    return ImageFolderMask(root, MultiCropAugmentation(**RECIPE), patch_size=16,
                           mask_generator=MaskGenerator([0.0, 0.3], [0.0, 0.2]), seed=0)


def _epoch(loader, epoch):
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    else:
        loader.sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
    n = 0
    for crops, _, _ in loader:
        n += crops[0].shape[0]
    if crops[0].is_cuda:
        torch.cuda.synchronize()
    return n


def _run(benchmark, loader, group, cores):
    benchmark.group = group
    state = {"epoch": 0}

    def one_epoch():
        state["epoch"] += 1
        return _epoch(loader, state["epoch"])

    _epoch(loader, 0)  # warm-up: worker start-up, pipeline build, header cache
    n = benchmark.pedantic(one_epoch, rounds=3, iterations=1)
    mean_s = benchmark.stats.stats.mean
    benchmark.extra_info["images_per_epoch"] = n
    benchmark.extra_info["images_per_s"] = round(n / mean_s, 1)
    benchmark.extra_info["ms_per_image"] = round(mean_s / n * 1e3, 2)
    benchmark.extra_info["core_ms_per_image"] = round(mean_s / n * 1e3 * cores, 1)
    benchmark.extra_info["cores"] = cores


def test_torch_loader(benchmark, photo_root):
    loader = build_pretrain_loader(_dataset(photo_root), BATCH, num_workers=CORES, seed=0)
    _run(benchmark, loader, f"multi-crop 2x224+10x96, batch {BATCH}, {CORES} cores", CORES)


def test_dali_cpu(benchmark, photo_root):
    pytest.importorskip("nvidia.dali")
    from ibot_fast.data.dali import build_dali_pretrain_loader

    loader = build_dali_pretrain_loader(_dataset(photo_root), BATCH, seed=0, device="cpu",
                                        device_id=None, num_threads=CORES)
    _run(benchmark, loader, f"multi-crop 2x224+10x96, batch {BATCH}, {CORES} cores", CORES)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("batch", [64, 128])
def test_dali_gpu(benchmark, photo_root, batch, tmp_path):
    pytest.importorskip("nvidia.dali")
    from ibot_fast.data.dali import build_dali_pretrain_loader

    # more files than one batch per epoch: the same photos under 8 names each
    root = tmp_path / "many"
    for k, (path, _) in enumerate(_dataset(photo_root).samples * 8):
        d = root / f"c{k % 2}"
        d.mkdir(parents=True, exist_ok=True)
        os.link(path, d / f"img{k:04d}.jpg")
    threads = os.cpu_count() or 1
    loader = build_dali_pretrain_loader(_dataset(str(root)), batch, seed=0, device="gpu",
                                        device_id=0, num_threads=min(threads, 16))
    _run(benchmark, loader, f"multi-crop 2x224+10x96 on the GPU, batch {batch}", threads)
