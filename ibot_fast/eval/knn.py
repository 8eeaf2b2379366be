"""Weighted k-NN evaluation of frozen features (the DINO/iBOT protocol, reference §9).

Features are the final-norm [CLS] token of the backbone (teacher by default), L2-normalised.
Each query votes with its k most cosine-similar training features, each vote weighted by
``exp(sim / T)`` with T = 0.07; top-1 and top-5 are reported for k in {10, 20, 100, 200}.

    python -m ibot_fast.eval.knn --checkpoint output/demo/checkpoint.pth \
        --train_path DIR --val_path DIR [--which teacher|student] [--random_init]

Architecture and crop size are read from the checkpoint's ``args``.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_KS = (10, 20, 100, 200)


@torch.no_grad()
def extract_features(backbone: nn.Module, loader, device) -> tuple[torch.Tensor, torch.Tensor]:
    backbone.eval()
    feats, labels = [], []
    for images, target in loader:
        out = backbone(images.to(device), return_all_tokens=False)  # [B, D] final-norm [CLS]
        feats.append(F.normalize(out.float(), dim=-1).cpu())
        labels.append(torch.as_tensor(target))
    return torch.cat(feats), torch.cat(labels).long()


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor,
                 test_feats: torch.Tensor, test_labels: torch.Tensor, k: int,
                 temperature: float = 0.07, num_classes: int | None = None,
                 chunk: int = 1024) -> tuple[float, float]:
    """Returns (top1 %, top5 %). Features must already be L2-normalised."""
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train_feats.shape[0])
    top1 = top5 = 0
    for start in range(0, test_feats.shape[0], chunk):
        q = test_feats[start:start + chunk]                      # [b, D]
        target = test_labels[start:start + chunk]                # [b]
        sim, idx = (q @ train_feats.T).topk(k, dim=1)           # [b, k]
        weight = (sim / temperature).exp()                       # [b, k]
        votes = torch.zeros(q.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[idx], weight)         # [b, C] weighted votes
        ranked = votes.argsort(dim=1, descending=True)
        correct = ranked == target[:, None]
        top1 += correct[:, :1].sum().item()
        top5 += correct[:, :min(5, num_classes)].sum().item()
    n = test_feats.shape[0]
    return 100.0 * top1 / n, 100.0 * top5 / n


def knn_table(train_feats, train_labels, test_feats, test_labels, ks=DEFAULT_KS,
              temperature=0.07) -> dict:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    return {int(k): dict(zip(("top1", "top5"),
                             knn_classify(train_feats, train_labels, test_feats, test_labels,
                                          k, temperature, num_classes)))
            for k in ks}


def _loaders(train_dir, val_dir, crop_size, batch_size=256, num_workers=0):
    from ibot_fast.data import ImageFolderEval, build_eval_transform

    tf = build_eval_transform(crop_size)
    mk = lambda d: torch.utils.data.DataLoader(  # noqa: E731
        ImageFolderEval(d, tf), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return mk(train_dir), mk(val_dir)


def evaluate_backbones(backbones: dict, train_dir: str, val_dir: str, crop_size: int,
                       device, ks=DEFAULT_KS, num_workers=0) -> dict:
    train_loader, val_loader = _loaders(train_dir, val_dir, crop_size, num_workers=num_workers)
    results = {}
    for name, backbone in backbones.items():
        tr_f, tr_l = extract_features(backbone, train_loader, device)
        va_f, va_l = extract_features(backbone, val_loader, device)
        results[name] = knn_table(tr_f, tr_l, va_f, va_l, ks)
    return results


def format_results(results: dict) -> str:
    names = list(results)
    ks = list(next(iter(results.values())))
    lines = ["k-NN top-1 / top-5 (%) on the held-out split, T=0.07",
             "  k   " + "".join(f"{n:>22}" for n in names)]
    for k in ks:
        lines.append(f"{k:>4}  " + "".join(
            f"{results[n][k]['top1']:>13.2f} / {results[n][k]['top5']:>6.2f}" for n in names))
    return "\n".join(lines)


def random_init_backbone(args, device) -> nn.Module:
    from ibot_fast.models import build_vit

    torch.manual_seed(args.seed)
    return build_vit(args.arch, args.patch_size, img_size=args.global_crops_size).to(device)


def evaluate_run(trainer) -> dict | None:
    """End-of-training evaluation: the trained teacher next to a randomly initialised net."""
    args = trainer.args
    if not (trainer.knn_train_dir and trainer.knn_val_dir):
        print("[ibot_fast] k-NN evaluation skipped: give --knn_val_path (and optionally "
              "--knn_train_path) to evaluate on a held-out labelled split", flush=True)
        return None
    backbones = {"teacher (trained)": trainer.teacher.backbone,
                 "random init": random_init_backbone(args, trainer.device)}
    results = evaluate_backbones(backbones, trainer.knn_train_dir, trainer.knn_val_dir,
                                 args.global_crops_size, trainer.device)
    print(format_results(results), flush=True)
    with open(os.path.join(args.output_dir, "knn.json"), "w") as f:
        json.dump({"train_dir": trainer.knn_train_dir, "val_dir": trainer.knn_val_dir,
                   "results": results}, f, indent=1)
    return results


def main(argv=None):
    from ibot_fast.checkpoint import load_checkpoint, strip_prefix
    from ibot_fast.models import build_vit

    p = argparse.ArgumentParser("ibot_fast.eval.knn", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--train_path", required=True, help="labelled ImageFolder (k-NN memory)")
    p.add_argument("--val_path", required=True, help="labelled ImageFolder (queries)")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher")
    p.add_argument("--random_init", action="store_true",
                   help="also evaluate a randomly initialised network of the same architecture")
    p.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_KS))
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--output", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    state = load_checkpoint(a.checkpoint)
    run_args = argparse.Namespace(**state["args"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = build_vit(run_args.arch, run_args.patch_size, img_size=run_args.global_crops_size)
    prefix = "backbone."
    sd = {k[len(prefix):]: v for k, v in strip_prefix(state[a.which]).items()
          if k.startswith(prefix)}
    missing, unexpected = backbone.load_state_dict(sd, strict=False)
    if [m for m in missing if m != "masked_embed"]:
        raise SystemExit(f"checkpoint {a.checkpoint!r} lacks backbone weights: {missing[:5]}")
    backbones = {f"{a.which} (epoch {state['epoch']})": backbone.to(device)}
    if a.random_init:
        backbones["random init"] = random_init_backbone(run_args, device)
    results = evaluate_backbones(backbones, a.train_path, a.val_path, run_args.global_crops_size,
                                 device, ks=a.k, num_workers=a.num_workers)
    print(format_results(results))
    if a.output:
        with open(a.output, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
