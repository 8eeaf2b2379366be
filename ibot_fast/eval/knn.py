"""Weighted k-NN evaluation of frozen features (the DINO/iBOT protocol, reference §9).

Features are the final-norm [CLS] token of the backbone (teacher by default), L2-normalised.
Each query votes with its k most cosine-similar training features, each vote weighted by
``exp(sim / T)`` with T = 0.07; top-1 and top-5 are reported for k in {10, 20, 100, 200}.

    python -m ibot_fast.eval.knn --checkpoint output/demo/checkpoint.pth \
        --train_path DIR --val_path DIR [--which teacher|student] [--random_init]

The checkpoint may be ibot_fast's, the reference's (bytedance/ibot, read through
``ibot_fast.convert``) or an exported backbone; the architecture comes from its ``args`` or from
the tensor shapes, the crop size from ``args`` or the position table (``--crop_size`` overrides).
``--cluster_metrics`` adds NMI/ARI of the head's [CLS] argmax against the val labels.
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
def extract_features(backbone: nn.Module, loader, device, head: nn.Module | None = None):
    """L2-normalised final-norm [CLS] features [N, D] and labels [N]; with `head`, also the
    argmax of the head's [CLS] logits [N] (cluster ids for NMI/ARI), from the same pass."""
    backbone.eval()
    dtype = next(backbone.parameters()).dtype  # fp64 for verification runs
    feats, labels, preds = [], [], []
    for images, target in loader:
        out = backbone(images.to(device, dtype), return_all_tokens=False)  # [B, D] normed [CLS]
        feats.append(F.normalize(out.float(), dim=-1).cpu())
        labels.append(torch.as_tensor(target))
        if head is not None:
            preds.append(head(out).argmax(-1).cpu())
    feats, labels = torch.cat(feats), torch.cat(labels).long()
    return (feats, labels) if head is None else (feats, labels, torch.cat(preds))


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


def evaluate_teacher(backbone: nn.Module, head: nn.Module | None, train_loader, val_loader,
                     device, ks=DEFAULT_KS, temperature=0.07) -> dict:
    """k-NN table of `backbone` and, with `head`, NMI/ARI of the head's [CLS] argmax against
    the labels of the held-out (query) split: {"knn": {k: {top1, top5}}, "nmi", "ari"}."""
    from ibot_fast.eval.cluster import cluster_metrics

    tr_f, tr_l = extract_features(backbone, train_loader, device)
    if head is None:
        va_f, va_l = extract_features(backbone, val_loader, device)
        return {"knn": knn_table(tr_f, tr_l, va_f, va_l, ks, temperature)}
    va_f, va_l, va_p = extract_features(backbone, val_loader, device, head)
    return {"knn": knn_table(tr_f, tr_l, va_f, va_l, ks, temperature),
            **cluster_metrics(va_l.numpy(), va_p.numpy())}


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
    """A seeded, untrained backbone of the run's architecture (ViT or Swin: for Swin the k-NN
    feature is the average-pooled final-stage token, its [CLS] slot)."""
    from ibot_fast.models import build_backbone

    torch.manual_seed(args.seed)
    return build_backbone(args.arch, args.patch_size, args.global_crops_size,
                          window_size=args.window_size).to(device)


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
    from ibot_fast.convert import build_backbone, build_head, load_checkpoint_any

    p = argparse.ArgumentParser("ibot_fast.eval.knn", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="ibot_fast or bytedance/ibot checkpoint, or an exported backbone")
    p.add_argument("--train_path", required=True, help="labelled ImageFolder (k-NN memory)")
    p.add_argument("--val_path", required=True, help="labelled ImageFolder (queries)")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher")
    p.add_argument("--random_init", action="store_true",
                   help="also evaluate a randomly initialised network of the same architecture")
    p.add_argument("--cluster_metrics", action="store_true",
                   help="also NMI/ARI of the head's [CLS] argmax vs the val labels "
                        "(needs a checkpoint with the head)")
    p.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_KS))
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--crop_size", type=int, default=None,
                   help="evaluation crop (default: the run's global crop size)")
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--trust_pickle", action="store_true",
                   help="open checkpoints that need weights_only=False (trusted files only)")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    state = load_checkpoint_any(a.checkpoint, a.trust_pickle)
    backbone, info = build_backbone(state, a.which)
    run_args = info["args"]
    crop = a.crop_size or run_args.get("global_crops_size") or info["img_size"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    epoch = f" (epoch {info['epoch']})" if info["epoch"] is not None else ""
    name = f"{a.which}{epoch}"
    backbones = {name: backbone.to(device)}
    if a.random_init:
        backbones["random init"] = random_init_backbone(argparse.Namespace(
            arch=info["arch"], patch_size=info["patch_size"], global_crops_size=info["img_size"],
            window_size=info.get("window_size", 7), seed=run_args.get("seed", 0)), device)
    results = evaluate_backbones(backbones, a.train_path, a.val_path, crop, device, ks=a.k,
                                 num_workers=a.num_workers)
    print(format_results(results))
    if a.cluster_metrics:
        head = build_head(state, a.which).to(device)
        from ibot_fast.eval.cluster import cluster_metrics

        _, val_loader = _loaders(a.train_path, a.val_path, crop, num_workers=a.num_workers)
        _, va_l, va_p = extract_features(backbone, val_loader, device, head)
        m = cluster_metrics(va_l.numpy(), va_p.numpy())
        results[f"{name} clusters"] = {"nmi": m["nmi"], "ari": m["ari"]}
        print(f"{name}: NMI {m['nmi']:.4f}, ARI {m['ari']:.4f} ([CLS] argmax vs val labels)")
    if a.output:
        with open(a.output, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
