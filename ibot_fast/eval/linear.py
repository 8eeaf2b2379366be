"""Linear probe on frozen features, with a learning-rate sweep in one pass (reference §9).

    python -m ibot_fast.eval.linear --checkpoint CKPT --train_path DIR --val_path DIR \
        [--which teacher|student] [--n_last_blocks 4] [--avgpool_patchtokens 0|1|2] \
        [--lrs 0.001 0.01 0.1 1] [--epochs 100] [--cache_dir DIR] [--output probe.json]

Features (the reference's ``eval_linear.py``): the final-norm [CLS] token of each of the last
``n_last_blocks`` blocks, concatenated (4 for ViT-S in the reference); ``--avgpool_patchtokens 2``
appends the mean patch token of the last block, ``1`` uses only that mean. They are extracted
once from the centre-cropped evaluation images (``EvalTransform``) and can be cached on disk.

Training (the reference's classifier and optimiser): ``Linear(F, C)`` with weights N(0, 0.01²)
and zero bias, SGD momentum 0.9 without weight decay, cross-entropy, the learning rate annealed
per epoch by a cosine to 0 (``CosineAnnealingLR``), batch 256. Every learning rate of the sweep
trains its own head on the same minibatches in the same pass over the cached features: one
batched matmul ``[H heads, C, F]`` per step (``backend="batched"``); ``backend="loop"`` trains
the heads one after the other with ``nn.Linear`` + ``torch.optim.SGD`` and is the reference the
tests compare the batched path with. All heads start from the same initial weights. The best
learning rate is chosen on the val split, as the reference's ``eval_linear_multi.py`` does.

Difference from the reference, on purpose: no RandomResizedCrop/flip per epoch (the backbone
would have to run every epoch; cached features are what make a sweep cheap), so the numbers can
sit a little below a 100-epoch augmented probe.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
BACKENDS = ("batched", "loop")


def probe_features(outputs: list[torch.Tensor], avgpool: int = 0) -> torch.Tensor:
    """Outputs of the last n blocks (final norm applied), each [B, T, D] -> features [B, F]."""
    if avgpool not in (0, 1, 2):
        raise ValueError(f"avgpool_patchtokens must be 0, 1 or 2, got {avgpool}")
    mean_patch = outputs[-1][:, 1:].mean(dim=1)  # [B, D]
    if avgpool == 1:
        return mean_patch
    cls = [x[:, 0] for x in outputs]  # n × [B, D]
    return torch.cat(cls + ([mean_patch] if avgpool == 2 else []), dim=-1)


@torch.no_grad()
def extract_probe_features(backbone: nn.Module, loader, device, n_last_blocks: int = 4,
                           avgpool: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    if not 1 <= n_last_blocks <= backbone.get_num_layers():
        raise ValueError(f"n_last_blocks must be in 1..{backbone.get_num_layers()}, "
                         f"got {n_last_blocks}")
    backbone.eval()
    dtype = next(backbone.parameters()).dtype
    feats, labels = [], []
    for images, target in loader:
        outs = backbone.get_intermediate_layers(images.to(device, dtype), n_last_blocks)
        feats.append(probe_features(outs, avgpool).float().cpu())
        labels.append(torch.as_tensor(target))
    return torch.cat(feats), torch.cat(labels).long()


def _batches(n: int, batch_size: int, seed: int, epoch: int):
    # the same minibatch order for every head and both back ends
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm.split(batch_size)


def _init(num_features: int, num_classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_classes, num_features, generator=g) * 0.01, torch.zeros(num_classes)


@torch.no_grad()
def _accuracy(logits_HNC: torch.Tensor, labels: torch.Tensor) -> list[tuple[float, float]]:
    k = min(5, logits_HNC.shape[-1])
    top = logits_HNC.topk(k, dim=-1).indices  # [H, N, k]
    hit = top == labels[None, :, None]
    n = labels.numel()
    return [(100.0 * hit[h, :, 0].sum().item() / n, 100.0 * hit[h].any(-1).sum().item() / n)
            for h in range(top.shape[0])]


def _train_batched(x, y, lrs, epochs, batch_size, momentum, weight_decay, seed, num_classes):
    H = len(lrs)
    w0, b0 = _init(x.shape[1], num_classes, seed)
    W = w0.expand(H, -1, -1).clone().to(x.device).requires_grad_(True)  # [H, C, F]
    b = b0.expand(H, -1).clone().to(x.device).requires_grad_(True)      # [H, C]
    bufs = [torch.zeros_like(W), torch.zeros_like(b)]
    lr0 = torch.tensor(lrs, dtype=x.dtype, device=x.device)
    for epoch in range(epochs):
        # CosineAnnealingLR(T_max=epochs, eta_min=0) in closed form, per head: [H]
        lr = lr0 * (0.5 * (1.0 + math.cos(math.pi * epoch / epochs)))
        for idx in _batches(x.shape[0], batch_size, seed, epoch):
            xb, yb = x[idx], y[idx]
            logits = torch.einsum("bf,hcf->hbc", xb, W) + b[:, None, :]  # [H, B, C]
            # heads are independent: the gradient of the sum is each head's own gradient
            loss = F.cross_entropy(logits.reshape(-1, num_classes), yb.repeat(H),
                                   reduction="sum") / yb.numel()
            W.grad = b.grad = None
            loss.backward()
            with torch.no_grad():
                # torch.optim.SGD: d = g + wd·p; buf = m·buf + d (buf = d at the first step,
                # which the zero-initialised buffer gives); p -= lr·buf
                for p, buf in zip((W, b), bufs):
                    buf.mul_(momentum).add_(p.grad + weight_decay * p)
                    p.sub_(lr.view(-1, *([1] * (p.ndim - 1))) * buf)
    return W.detach(), b.detach()


def _train_loop(x, y, lrs, epochs, batch_size, momentum, weight_decay, seed, num_classes):
    Ws, bs = [], []
    for base_lr in lrs:
        lin = nn.Linear(x.shape[1], num_classes).to(x.device, x.dtype)
        w0, b0 = _init(x.shape[1], num_classes, seed)
        with torch.no_grad():
            lin.weight.copy_(w0)
            lin.bias.copy_(b0)
        opt = torch.optim.SGD(lin.parameters(), lr=base_lr, momentum=momentum,
                              weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0)
        for epoch in range(epochs):
            for idx in _batches(x.shape[0], batch_size, seed, epoch):
                loss = F.cross_entropy(lin(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
        Ws.append(lin.weight.detach())
        bs.append(lin.bias.detach())
    return torch.stack(Ws), torch.stack(bs)


def train_linear_sweep(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
                       val_y: torch.Tensor, lrs=DEFAULT_LRS, epochs: int = 100,
                       batch_size: int = 256, momentum: float = 0.9, weight_decay: float = 0.0,
                       seed: int = 0, num_classes: int | None = None,
                       backend: str = "batched") -> dict:
    """Train one linear head per learning rate on (train_x, train_y); evaluate on val.

    Returns {"results": {lr: {"top1", "top5"}}, "best_lr", "top1", "top5", "weight" [H, C, F],
    "bias" [H, C]} (accuracies in %, heads in the order of `lrs`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is unknown; valid: {', '.join(BACKENDS)}")
    lrs = [float(lr) for lr in lrs]
    if not lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
        raise ValueError(f"lrs must be a non-empty list of positive learning rates, got {lrs}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs ({epochs}) and batch_size ({batch_size}) must be >= 1")
    if train_x.ndim != 2 or val_x.ndim != 2 or train_x.shape[1] != val_x.shape[1]:
        raise ValueError(f"features must be [N, F] with the same F, got {tuple(train_x.shape)} "
                         f"and {tuple(val_x.shape)}")
    if num_classes is None:
        num_classes = int(max(train_y.max(), val_y.max())) + 1
    x, y = train_x.float(), train_y.long().to(train_x.device)
    train = _train_batched if backend == "batched" else _train_loop
    W, b = train(x, y, lrs, epochs, batch_size, momentum, weight_decay, seed, num_classes)
    with torch.no_grad():
        logits = torch.einsum("nf,hcf->hnc", val_x.float().to(W.device), W) + b[:, None, :]
    acc = _accuracy(logits.cpu(), val_y.long().cpu())
    results = {lr: {"top1": t1, "top5": t5} for lr, (t1, t5) in zip(lrs, acc)}
    best = max(range(len(lrs)), key=lambda h: (acc[h][0], acc[h][1]))
    return {"results": results, "best_lr": lrs[best], "top1": acc[best][0],
            "top5": acc[best][1], "weight": W.cpu(), "bias": b.cpu()}


# ------------------------------------------------------------------------------- CLI
def _cached_features(cache_dir, split, meta, compute):
    """Features of one split from `cache_dir` when they were made with the same settings."""
    if not cache_dir:
        return compute()
    path = os.path.join(cache_dir, f"{split}_features.pt")
    if os.path.isfile(path):
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("meta") == meta:
            print(f"[ibot_fast] using cached {split} features {path}", flush=True)
            return blob["features"], blob["labels"]
    feats, labels = compute()
    from ibot_fast.checkpoint import atomic_save
    atomic_save({"features": feats, "labels": labels, "meta": meta}, path)
    return feats, labels


def format_sweep(res: dict) -> str:
    lines = ["linear probe top-1 / top-5 (%) on the held-out split",
             "        lr    top-1    top-5"]
    for lr, r in res["results"].items():
        mark = "  <- best" if lr == res["best_lr"] else ""
        lines.append(f"{lr:>10.4g}  {r['top1']:>7.2f}  {r['top5']:>7.2f}{mark}")
    return "\n".join(lines)


def main(argv=None):
    from ibot_fast.convert import load_backbone
    from ibot_fast.eval.knn import _loaders

    p = argparse.ArgumentParser("ibot_fast.eval.linear", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="ibot_fast or bytedance/ibot checkpoint, or an exported backbone")
    p.add_argument("--train_path", required=True, help="labelled ImageFolder (probe training)")
    p.add_argument("--val_path", required=True, help="labelled ImageFolder (evaluation)")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher")
    p.add_argument("--n_last_blocks", type=int, default=None,
                   help="blocks whose [CLS] features are concatenated (default: 4 for ViT, as "
                        "the reference's ViT-S; 1 for Swin: the pooled final-stage feature)")
    p.add_argument("--avgpool_patchtokens", type=int, choices=[0, 1, 2], default=0)
    p.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS))
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=BACKENDS, default="batched")
    p.add_argument("--crop_size", type=int, default=None,
                   help="evaluation crop (default: the run's global crop size)")
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--cache_dir", default=None, help="keep the extracted features here")
    p.add_argument("--trust_pickle", action="store_true",
                   help="open checkpoints that need weights_only=False (trusted files only)")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone, info = load_backbone(a.checkpoint, a.which, trust_pickle=a.trust_pickle)
    backbone.to(device)
    if a.n_last_blocks is None:
        from ibot_fast.models import is_swin
        a.n_last_blocks = 1 if is_swin(backbone) else 4
    crop = a.crop_size or info["args"].get("global_crops_size") or info["img_size"]
    train_loader, val_loader = _loaders(a.train_path, a.val_path, crop,
                                        num_workers=a.num_workers)
    st = os.stat(a.checkpoint)
    feats = {}
    for split, loader, root in (("train", train_loader, a.train_path),
                                ("val", val_loader, a.val_path)):
        meta = dict(checkpoint=os.path.abspath(a.checkpoint), size=st.st_size,
                    mtime=st.st_mtime, which=a.which, n_last_blocks=a.n_last_blocks,
                    avgpool=a.avgpool_patchtokens, crop=crop, root=os.path.abspath(root))
        feats[split] = _cached_features(
            a.cache_dir, split, meta,
            lambda ld=loader: extract_probe_features(backbone, ld, device, a.n_last_blocks,
                                                     a.avgpool_patchtokens))
    res = train_linear_sweep(*feats["train"], *feats["val"], lrs=a.lrs, epochs=a.epochs,
                             batch_size=a.batch_size, weight_decay=a.weight_decay,
                             seed=a.seed, backend=a.backend)
    print(format_sweep(res))
    out = {k: v for k, v in res.items() if k not in ("weight", "bias")}
    out.update(checkpoint=a.checkpoint, which=a.which, n_last_blocks=a.n_last_blocks,
               avgpool_patchtokens=a.avgpool_patchtokens, epochs=a.epochs,
               num_features=int(feats["train"][0].shape[1]))
    if a.output:
        with open(a.output, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
