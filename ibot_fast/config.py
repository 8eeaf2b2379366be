"""Command line and presets for ``torchrun -m ibot_fast.train``: the one place flags are defined
and checked.

Flag names and defaults are the reference's (``main_ibot.py:get_args_parser``) so its users feel
at home; flags the reference hard-codes (crop sizes, head widths) are added with the reference
value as default. Presets set defaults for the published recipes; any flag given on the command
line wins over the preset. ``--help`` groups the flags (the reference's, speed, exactness and
verification, data, faults, evaluation) and shows every default.

``parse_args`` returns a namespace with every field set and resolved (``auto`` values replaced
by what will run: device, precision, step path, data and mask back ends, workers, threads), so
the trainer reads ``args.name`` and nothing else. Every rule -- single flags, flag
combinations (:data:`CROSS_FLAG_RULES`), device-only back ends, the data folder, the output
directory, schedule lengths -- is checked here, before any data is read or model built; a
violation exits with code 2 and one short message naming the flags and the fix.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from ibot_fast.ema import EMA_BACKENDS
from ibot_fast.fast_step import COMPILE_MODES, DROP_PATH_MODES, HEAD_TOKENS
from ibot_fast.loss import LOSS_BACKENDS
from ibot_fast.models.packed import ALL_ATTN_BACKENDS, ATTN_BACKEND_RULES
from ibot_fast.models.swin import (SWIN_ARCHS, SWIN_ATTN_BACKENDS, SWIN_MASK_CELL,
                                   SWIN_PATCH_SIZE, is_swin)
from ibot_fast.step import STEP_PATHS

# Named recipes. Values override the parser defaults; explicit flags override these.
PRESETS: dict[str, dict] = {
    # README ViT-S/16 recipe of the reference (800 epochs, 16 GPUs x 64 images).
    "vit_small_recipe": dict(
        arch="vit_small", patch_size=16, out_dim=8192, shared_head=True, norm_last_layer=False,
        teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30,
        pred_ratio=[0.0, 0.3], pred_ratio_var=[0.0, 0.2], batch_size_per_gpu=64, epochs=800,
        global_crops_scale=(0.25, 1.0), local_crops_number=10, local_crops_scale=(0.05, 0.25),
        lr=5e-4, min_lr=1e-6, warmup_epochs=10, drop_path=0.1,
    ),
    # README Swin-T/14 recipe of the reference (300 epochs, 40 GPUs x 26 images); drop_path
    # 0.1 is the reference's swin_tiny default (its main_ibot passes no --drop_path to Swin).
    "swin_tiny_14_recipe": dict(
        arch="swin_tiny", patch_size=4, window_size=14, out_dim=8192, shared_head=True,
        norm_last_layer=False, teacher_temp=0.07, warmup_teacher_temp_epochs=30,
        pred_ratio=[0.0, 0.3], pred_ratio_var=[0.0, 0.2], pred_start_epoch=50,
        batch_size_per_gpu=26, epochs=300, global_crops_scale=(0.25, 1.0),
        local_crops_number=10, local_crops_scale=(0.05, 0.25), drop_path=0.1,
    ),
    # A few minutes on 2 CPU cores: the embedded MNIST digits, small crops, a small model and
    # head (README, "Demo result", has the measurements behind each choice). A vit_tiny at the
    # recipe's lr/momentum gets ~120 steps in that time and its teacher stays near its random
    # init, so: a 4-block model, a faster teacher (0.95), a constant teacher temperature of 0.04.
    # With the reference's loss alone the [CLS] head collapses here (every digit gets the same
    # near-uniform target); a KoLeo term on the [CLS] bottleneck (not in the reference) with a
    # 32-d bottleneck keeps the targets image-specific. No local crops: the 16-px pieces of a
    # 28-px digit kept the [CLS] loss high; without them 6 epochs take less time than 5 did.
    "demo": dict(
        arch="vit_nano", patch_size=8, out_dim=512, shared_head=True, norm_last_layer=False,
        head_hidden_dim=256, head_bottleneck_dim=32, koleo_weight=1.0, teacher_temp=0.04,
        warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=1, pred_ratio=[0.0, 0.3],
        pred_ratio_var=[0.0, 0.2], batch_size_per_gpu=32, epochs=6, global_crops_size=32,
        global_crops_scale=(0.25, 1.0), local_crops_number=0, local_crops_size=16, lr=2e-3,
        min_lr=1e-6, warmup_epochs=1, drop_path=0.1, precision="fp32", momentum_teacher=0.95,
        freeze_last_layer=1, num_workers=2, data_path="mnist_5k", knn_eval=True, knn_every=1,
        output_dir="./output/demo", saveckp_freq=0,
    ),
}


def _bool(value: str) -> bool:
    """argparse type for the reference's ``--flag true|false`` style."""
    v = value.lower()
    if v in ("true", "1", "yes", "on", "t", "y"):
        return True
    if v in ("false", "0", "no", "off", "f", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def _compile_mode(value: str):
    """``--compile false|blocks|step``; ``true`` is ``blocks`` (older command lines)."""
    modes = [m for m in COMPILE_MODES if m]
    if value.lower() in modes:
        return value.lower()
    try:
        return "blocks" if _bool(value) else False
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected false, {' (= true), '.join(modes)}, got {value!r}") from None


def _count(value: str):
    """``auto`` or an integer >= 0 (workers, threads)."""
    if value.lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or an integer, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected auto or an integer >= 0, got {value!r}")
    return n


HINT = "run python -m ibot_fast.train --help for every flag and its default"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag shows its default; flags whose default is resolved later (None) say in their
    help what unset means."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default:" in text or action.default is argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and a hint, exit code 2 (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n({HINT})\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        "ibot_fast.train", description="iBOT pre-training of Vision Transformers (ViT, "
        "Swin). Defaults "
        "marked auto are resolved for the machine and recorded in output_dir/args.json.",
        formatter_class=_HelpFormatter, allow_abbrev=False)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="named recipe; explicit flags override it (default: none)")

    g = p.add_argument_group("reference flags (bytedance/ibot's names and defaults; crop sizes "
                             "and head widths are hard-coded there)")
    g.add_argument("--arch", default="vit_small",
                   help="vit_nano | vit_tiny | vit_small | vit_base | vit_large (deit_* "
                        "accepted) | swin_tiny | swin_small | swin_base | swin_large | "
                        "swin_nano (not in the reference: a tiny Swin for tests)")
    g.add_argument("--patch_size", type=int, default=16,
                   help="ViT patch size (Swin: 4, the only size it is built for)")
    g.add_argument("--window_size", type=int, default=7,
                   help="Swin attention window side (tokens); ignored by ViT")
    g.add_argument("--out_dim", type=int, default=8192, help="[CLS] head output dimension K")
    g.add_argument("--patch_out_dim", type=int, default=8192,
                   help="patch head output dimension (follows out_dim when a head is shared)")
    g.add_argument("--shared_head", type=_bool, default=False,
                   help="student: one head for [CLS] and patch tokens")
    g.add_argument("--shared_head_teacher", type=_bool, default=True,
                   help="teacher: one head for [CLS] and patch tokens")
    g.add_argument("--norm_last_layer", type=_bool, default=True,
                   help="freeze the weight norm g of the head's last layer at 1")
    g.add_argument("--head_hidden_dim", type=int, default=2048, help="head MLP width")
    g.add_argument("--head_bottleneck_dim", type=int, default=256, help="head bottleneck width")
    g.add_argument("--momentum_teacher", type=float, default=0.996,
                   help="EMA momentum at the start (cosine to 1)")
    g.add_argument("--drop_path", type=float, default=0.1, help="stochastic depth rate")
    g.add_argument("--use_masked_im_modeling", type=_bool, default=True,
                   help="masked patch tokens for the student")
    g.add_argument("--teacher_temp", type=float, default=0.04, help="[CLS] teacher temperature")
    g.add_argument("--warmup_teacher_temp", type=float, default=0.04,
                   help="[CLS] teacher temperature at epoch 0 (linear warm-up)")
    g.add_argument("--teacher_patch_temp", type=float, default=0.07,
                   help="patch teacher temperature")
    g.add_argument("--warmup_teacher_patch_temp", type=float, default=0.04,
                   help="patch teacher temperature at epoch 0 (linear warm-up)")
    g.add_argument("--warmup_teacher_temp_epochs", type=int, default=30,
                   help="epochs of the teacher temperature warm-ups")
    g.add_argument("--lambda1", type=float, default=1.0, help="[CLS] loss weight")
    g.add_argument("--lambda2", type=float, default=1.0, help="patch (MIM) loss weight")
    g.add_argument("--pred_ratio", type=float, nargs="+", default=[0.3],
                   help="masked fraction of the patches (several values: one per image, "
                        "drawn)")
    g.add_argument("--pred_ratio_var", type=float, nargs="+", default=[0.0],
                   help="spread of the masked fraction around each --pred_ratio")
    g.add_argument("--pred_shape", choices=["block", "rand"], default="block",
                   help="block-wise or random masks")
    g.add_argument("--pred_start_epoch", type=int, default=0, help="first epoch with masks")
    g.add_argument("--global_crops_number", type=int, default=2, help="global crops per image")
    g.add_argument("--global_crops_scale", type=float, nargs=2, default=(0.14, 1.0),
                   help="area range of a global crop")
    g.add_argument("--local_crops_number", type=int, default=0, help="local crops per image")
    g.add_argument("--local_crops_scale", type=float, nargs=2, default=(0.05, 0.4),
                   help="area range of a local crop")
    g.add_argument("--global_crops_size", type=int, default=224, help="global crop side (px)")
    g.add_argument("--local_crops_size", type=int, default=96, help="local crop side (px)")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="optimiser")
    g.add_argument("--lr", type=float, default=5e-4, help="base lr at batch 256 (scaled)")
    g.add_argument("--min_lr", type=float, default=1e-6, help="lr at the end of the cosine")
    g.add_argument("--warmup_epochs", type=int, default=10, help="linear lr warm-up epochs")
    g.add_argument("--weight_decay", type=float, default=0.04, help="weight decay at the start")
    g.add_argument("--weight_decay_end", type=float, default=0.4,
                   help="weight decay at the end (cosine)")
    g.add_argument("--clip_grad", type=float, default=3.0, help="per-tensor norm; 0 disables")
    g.add_argument("--freeze_last_layer", type=int, default=1,
                   help="epochs with the head's last layer frozen")
    g.add_argument("--batch_size_per_gpu", type=int, default=128, help="images per process")
    g.add_argument("--epochs", type=int, default=100, help="training epochs")
    g.add_argument("--use_fp16", type=_bool, default=None,
                   help="the reference's fp16 autocast + GradScaler when given as true (default: "
                        "unset: --precision follows the device)")
    g.add_argument("--seed", type=int, default=0, help="seed of weights, crops, masks, drops")

    g = p.add_argument_group("beyond the reference (off by default: the reference's loss)")
    g.add_argument("--koleo_weight", type=float, default=0.0,
                   help="weight of a KoLeo term (DINOv2's spreading regulariser) on the "
                        "student's global-crop [CLS] head-bottleneck vectors, per view and "
                        "rank; 0: none, as in the reference (the demo preset uses 1.0)")

    g = p.add_argument_group(
        "speed (every option computes the reference's numbers unless it says otherwise; "
        "tests compare each with --step reference)")
    g.add_argument("--step", choices=STEP_PATHS, default=None,
                   help="the training step: fast (selected-token head, packed crops, fused "
                        "loss, fused AdamW, flat EMA) or reference (the reference's "
                        "computation order) (default: fast)")
    g.add_argument("--fast_step", type=_bool, default=None,
                   help="older name of --step: true = fast, false = reference (default: unset)")
    g.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16", "fp64"],
                   default="auto",
                   help="autocast precision; auto: bf16 on a CUDA GPU that supports it, fp32 "
                        "otherwise (fp16 with --use_fp16 true); fp64 runs everything in "
                        "double, for verification only")
    g.add_argument("--attn_backend", choices=ALL_ATTN_BACKENDS, default="sdpa",
                   help="attention (both step paths): sdpa (CPU and GPU), math (explicit "
                        "softmax, the reference), xformers / flex / varlen (CUDA; varlen: "
                        "16-bit only)")
    g.add_argument("--head_tokens", choices=HEAD_TOKENS, default="selected",
                   help="fast step: head on [CLS] + masked tokens only, or on every token")
    g.add_argument("--packed_crops", type=_bool, default=None,
                   help="fast step: global and local crops through each block in one pass "
                        "(ViT only; default: unset = true for ViT, Swin runs the crops of "
                        "each resolution in their own pass)")
    g.add_argument("--loss_backend", choices=LOSS_BACKENDS, default="auto",
                   help="loss kernels: auto (triton on CUDA, chunked torch otherwise), "
                        "triton, torch, or eager (the dense reference loss: needs --step "
                        "reference or --head_tokens all)")
    g.add_argument("--ema_backend", choices=EMA_BACKENDS, default="auto",
                   help="fast step: flat-buffer EMA kernel (triton on CUDA) or lerp_")
    g.add_argument("--ema_teacher_bf16", type=_bool, default=False,
                   help="fast step: the EMA also writes a bf16 teacher copy for the teacher "
                        "forward (needs --precision bf16; not with --fsdp)")
    g.add_argument("--drop_path_mode", choices=DROP_PATH_MODES, default="sample",
                   help="fast step: per-sample drop path (reference) or DINOv2's "
                        "compute-skipping batch-subset residual (same expectation, not the "
                        "reference's distribution)")
    g.add_argument("--compile", type=_compile_mode, default=False,
                   help="fast step, opt-in until measured on a GPU: torch.compile with static "
                        "shapes: 'blocks' (= true) each transformer block, 'step' teacher + "
                        "student forward + loss as one graph (needs --head_tokens selected, "
                        "not with --fsdp); false: eager")
    g.add_argument("--fused_head_loss", type=_bool, default=False,
                   help="fast step, --head_tokens selected, opt-in until measured on a GPU: "
                        "the patch head's K2-way last layer runs inside the patch loss "
                        "(soft_ce_linear), so no [M, K2] logits tensor is materialised")
    g.add_argument("--fsdp", type=_bool, default=False,
                   help="fast step under torchrun: FSDP2 (fully_shard per block, then the "
                        "whole student; the teacher sharded the same way) instead of DDP; "
                        "full-state checkpoints interchangeable with DDP ones")
    g.add_argument("--threads", type=_count, default="auto",
                   help="intra-op CPU threads per process; auto: $OMP_NUM_THREADS when set, "
                        "else the cores this process may use (sched_getaffinity) shared "
                        "between the ranks of the host and the loader workers")

    g = p.add_argument_group("exactness and verification")
    g.add_argument("--deterministic", type=_bool, default=False,
                   help="deterministic algorithms (slower; used by the resume tests)")
    g.add_argument("--compile_backend", choices=["inductor", "aot_eager", "eager"],
                   default="inductor",
                   help="torch.compile back end of --compile (aot_eager: graph capture "
                        "without code generation, for tests)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda when torch sees a GPU, else cpu")

    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=None,
                   help="ImageFolder root (class sub-folders), 'mnist_5k' for the embedded "
                        "demo digits, or 'synthetic[:N]' for generated images (default: none; "
                        "required)")
    g.add_argument("--num_workers", type=_count, default="auto",
                   help="DataLoader workers (torch data back end) or DALI CPU threads (dali); "
                        "auto: from the cores this process may use, shared between the ranks "
                        "of the host (at most 10, the reference's value)")
    g.add_argument("--data_backend", choices=["auto", "dali", "torch"], default="auto",
                   help="dali: decode + augment with NVIDIA DALI (on the GPU when training on "
                        "one); torch: PIL in DataLoader workers; auto: dali on a GPU when DALI "
                        "is installed (pip install ibot_fast[dali]), torch otherwise")
    g.add_argument("--mask_backend", choices=["auto", "python", "cpp", "cuda"], default="auto",
                   help="mask generator: python (reference), cpp (C++ extension, in the loader "
                        "workers), cuda (GPU kernel in the training process); auto: cpp when "
                        "ibot_fast._mask_ext is built, else python")

    g = p.add_argument_group("run, checkpoints and faults")
    g.add_argument("--output_dir", default="./output", help="checkpoints, logs, curves")
    g.add_argument("--saveckp_freq", type=int, default=40,
                   help="also keep checkpointNNNN.pth every N epochs (0: never)")
    g.add_argument("--resume", type=_bool, default=True,
                   help="resume from output_dir/checkpoint.pth when it exists")
    g.add_argument("--load_from", default=None,
                   help="checkpoint to resume from (relative paths are under output_dir) "
                        "(default: none)")
    g.add_argument("--keep_checkpoints", type=int, default=2,
                   help="keep checkpoint.pth and its K-1 predecessors (checkpoint.1.pth, ...); "
                        "a corrupt newest one falls back to the previous on resume")
    g.add_argument("--on_nan", choices=["stop", "skip"], default="stop",
                   help="a non-finite loss or gradient: 'stop' (exit code 3 at the next "
                        "--log_freq sync, naming the step; no checkpoint of it is written) or "
                        "'skip' (that step changes nothing, on every rank; costs one host sync "
                        "per step)")
    g.add_argument("--log_freq", type=int, default=10, help="steps between logged lines")
    g.add_argument("--max_steps_per_epoch", type=int, default=0,
                   help="stop each epoch after N steps (0: full epoch); for smoke tests")
    g.add_argument("--progress", type=_bool, default=True, help="progress bar on rank 0")

    g = p.add_argument_group("evaluation")
    g.add_argument("--knn_eval", type=_bool, default=False,
                   help="k-NN evaluation of the teacher (and of the random init) at the end")
    g.add_argument("--knn_train_path", default=None,
                   help="labelled ImageFolder for the k-NN memory (default: data_path)")
    g.add_argument("--knn_val_path", default=None,
                   help="held-out labelled ImageFolder for the k-NN queries (default: none)")
    g.add_argument("--knn_every", type=int, default=0,
                   help="every N epochs: teacher k-NN + NMI/ARI on the k-NN folders, one line "
                        "in output_dir/knn.jsonl (0: never)")
    g.add_argument("--tensorboard", type=_bool, default=False,
                   help="also write the scalars to output_dir/tf_logs (needs tensorboard)")
    return p


def _fail(parser: argparse.ArgumentParser, msg: str):
    parser.error(msg)  # one line + a hint, exit status 2


# ------------------------------------------------------------------------ flag combinations
@dataclass(frozen=True)
class Rule:
    """A rule about two or more flags: ``broken(args)`` is True when they disagree; ``message``
    names the flags and the fix ("{}": the flags as given, "{name}": a flag's resolved value).
    Checked on the resolved namespace (device, precision and step path already decided),
    before any data or model exists."""
    name: str
    broken: Callable[[argparse.Namespace], bool]
    message: str


# Flags only the fast step reads, with the value that leaves them out of the way.
FAST_ONLY_FLAGS = {"head_tokens": "selected", "packed_crops": True, "ema_backend": "auto",
                   "ema_teacher_bf16": False, "drop_path_mode": "sample", "compile": False,
                   "fused_head_loss": False, "fsdp": False}


def _flag(name, value) -> str:
    if value is False:
        value = "false"
    elif value is True:
        value = "true"
    return f"--{name} {value}"


def _fast_only_rule(name: str, neutral) -> Rule:
    return Rule(f"reference-step-{name}",
                lambda a: a.step == "reference" and vars(a)[name] not in (neutral, None),
                f"{{}} is an option of the fast step: drop --step reference (or "
                f"--fast_step false), or leave --{name} at {_flag(name, neutral).split()[1]}")


def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:
        return False


def _triton_ok(a) -> bool:
    return a.device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


CROSS_FLAG_RULES: tuple[Rule, ...] = (
    Rule("step-vs-fast_step",
         lambda a: a.fast_step is not None and a.step is not None
         and a.step != ("fast" if a.fast_step else "reference"),
         "--fast_step is the older name of --step (true = fast, false = reference) and the two "
         "disagree: give only --step"),
    Rule("use_fp16-vs-precision",
         lambda a: a.use_fp16 is not None and a.precision != "auto"
         and (a.precision == "fp16") != a.use_fp16,
         "--use_fp16 and --precision disagree: give only --precision (fp16 is --use_fp16 "
         "true)"),
    *(_fast_only_rule(n, v) for n, v in FAST_ONLY_FLAGS.items()),
    Rule("fused_head_loss-head_tokens",
         lambda a: a.fused_head_loss and a.head_tokens != "selected",
         "--fused_head_loss true fuses the patch head's last layer into the loss on the "
         "selected rows: it needs --head_tokens selected"),
    Rule("compile-step-head_tokens",
         lambda a: a.compile == "step" and a.head_tokens != "selected",
         "--compile step compiles the static-shape step of --head_tokens selected; with "
         "--head_tokens all use --compile blocks"),
    Rule("compile-step-fsdp",
         lambda a: a.compile == "step" and a.fsdp,
         "--compile step is not supported with --fsdp true (FSDP2's per-block all-gather "
         "hooks run inside the step); use --compile blocks"),
    Rule("loss_backend-eager-selected",
         lambda a: a.loss_backend == "eager" and a.step == "fast" and a.head_tokens == "selected",
         "--loss_backend eager is the dense reference loss, --head_tokens selected feeds the "
         "fused one: use --head_tokens all or --step reference with it, or --loss_backend "
         "auto/torch/triton"),
    Rule("loss_backend-triton-device",
         lambda a: a.loss_backend == "triton" and not _triton_ok(a),
         "--loss_backend triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tests); "
         "use --loss_backend auto or torch"),
    Rule("loss_backend-triton-fp64",
         lambda a: a.loss_backend == "triton" and a.precision == "fp64",
         "--loss_backend triton computes in fp32; --precision fp64 needs --loss_backend auto "
         "or torch"),
    Rule("ema_teacher_bf16-precision",
         lambda a: a.ema_teacher_bf16 and a.precision != "bf16",
         "--ema_teacher_bf16 true keeps a bf16 teacher copy for a bf16 forward: it needs "
         "--precision bf16"),
    Rule("ema_teacher_bf16-fsdp",
         lambda a: a.ema_teacher_bf16 and a.fsdp,
         "--ema_teacher_bf16 true is a flat-buffer (DDP) option; with --fsdp true leave it "
         "false"),
    Rule("ema_backend-triton-fsdp",
         lambda a: a.ema_backend == "triton" and a.fsdp,
         "--ema_backend triton updates one flat buffer; with --fsdp true the EMA is a foreach "
         "lerp_ over the shards: use --ema_backend auto or torch"),
    Rule("ema_backend-triton-device",
         lambda a: a.ema_backend == "triton" and not _triton_ok(a),
         "--ema_backend triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tests); use "
         "--ema_backend auto or torch"),
    # the attention back ends' rules are defined next to the back ends (models/packed.py)
    *(Rule(r.name, lambda a, r=r: r.broken(a.attn_backend, a.precision, a.device), r.message)
      for r in ATTN_BACKEND_RULES),
    Rule("mask_backend-cuda-device",
         lambda a: a.mask_backend == "cuda" and a.device != "cuda",
         "--mask_backend cuda generates masks on the GPU; on the CPU use --mask_backend cpp "
         "or python"),
    Rule("data_backend-dali-synthetic",
         lambda a: a.data_backend == "dali" and a.data_path is not None
         and a.data_path.startswith("synthetic"),
         "--data_backend dali decodes image files; --data_path synthetic generates images: "
         "use --data_backend torch (or auto)"),
    # ---- Swin: the packed stream, block compilation, subset drop path and FSDP's per-block
    # sharding are written for ViT blocks ----
    Rule("swin-attn_backend",
         lambda a: is_swin(a.arch) and a.attn_backend not in SWIN_ATTN_BACKENDS,
         "{} is a ViT attention back end; with a Swin --arch use --attn_backend "
         + " or ".join(SWIN_ATTN_BACKENDS)),
    Rule("swin-packed_crops",
         lambda a: is_swin(a.arch) and a.packed_crops is True,
         "--packed_crops true packs ViT crops into one token stream; a Swin --arch runs the "
         "crops of each resolution in their own pass: leave --packed_crops unset (or false)"),
    Rule("swin-compile",
         lambda a: is_swin(a.arch) and a.compile is not False,
         "--compile compiles the ViT blocks of the fast step; with a Swin --arch use "
         "--compile false"),
    Rule("swin-drop_path_mode",
         lambda a: is_swin(a.arch) and a.drop_path_mode != "sample",
         "--drop_path_mode subset is the packed ViT stream's stochastic depth; with a Swin "
         "--arch use --drop_path_mode sample"),
    Rule("swin-fsdp",
         lambda a: is_swin(a.arch) and a.fsdp,
         "--fsdp true shards ViT blocks; with a Swin --arch use DDP (--fsdp false)"),
    Rule("koleo_weight-batch_size_per_gpu",
         lambda a: a.koleo_weight > 0 and a.batch_size_per_gpu < 2,
         "--koleo_weight needs --batch_size_per_gpu >= 2: each [CLS] vector's nearest "
         "neighbour is another image of the same view on the same rank"),
    Rule("fsdp-torchrun",
         lambda a: a.fsdp and "WORLD_SIZE" not in os.environ,
         "--fsdp true shards over a process group: launch with torchrun (torchrun "
         "--nproc_per_node G -m ibot_fast.train ...; G may be 1)"),
)


def _rule_flags(rule: Rule, args) -> str:
    """The flags a fast-only rule is about, as given (for its message)."""
    name = rule.name.removeprefix("reference-step-")
    if name in FAST_ONLY_FLAGS:
        return _flag(name, vars(args)[name])
    if rule.name == "swin-attn_backend":
        return f"--attn_backend {args.attn_backend}"
    return ""


def cross_flag_errors(args) -> list[str]:
    """Messages of every :data:`CROSS_FLAG_RULES` rule ``args`` breaks."""
    # "{}": the flags as given; "{name}": that flag's resolved value
    return [r.message.format(_rule_flags(r, args), **vars(args)) for r in CROSS_FLAG_RULES
            if r.broken(args)]


# ------------------------------------------------------------------------------- the machine
def resolve_device(requested: str) -> str:
    import torch
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def default_precision(device: str) -> str:
    """bf16 autocast on a CUDA GPU that supports it, fp32 elsewhere (fp16 on a CPU is 17-21x
    slower than fp32 and brings a GradScaler for nothing)."""
    import torch
    if device == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_workers_and_threads(device: str) -> tuple[int, int]:
    """(loader workers, intra-op threads) for one process: the usable cores shared between
    the ranks on this host (``LOCAL_WORLD_SIZE``, set by torchrun). On the CPU the training
    process computes, so half the share each; on a GPU most of it decodes images (workers, at
    most 10, the reference's value) and the training process keeps the rest."""
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cores = max(1, usable_cores() // ranks)
    workers = min(10, cores - 1 if device == "cuda" else cores // 2)
    return workers, max(1, cores - workers)


# --------------------------------------------------------------------------- paths, schedules
def _data_path_error(path: str, need: int) -> Optional[str]:
    """Why ``--data_path`` cannot feed one global batch of ``need`` images, or None. Counts
    images only up to ``need`` (a large dataset is not scanned here)."""
    from ibot_fast.data.dataset import IMG_EXTENSIONS
    if path == "mnist_5k" or path.startswith("synthetic"):
        return None  # generated here: nothing to check on disk
    if not os.path.exists(path):
        return (f"--data_path {path} does not exist: pass an ImageFolder root "
                f"(root/<class>/<image>), or mnist_5k for the demo digits")
    if not os.path.isdir(path):
        return (f"--data_path {path} is a file, not a folder: pass the folder that holds one "
                f"sub-folder per class (root/<class>/<image>)")
    classes = [e.path for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".")]
    if not classes:
        return (f"--data_path {path} is empty (no class sub-folders): put the images in at "
                f"least one sub-folder, root/<class>/<image> (one dummy class is fine)")
    found = 0
    for cls in sorted(classes):
        for _dir, _subdirs, files in os.walk(cls, followlinks=True):
            found += sum(f.lower().endswith(IMG_EXTENSIONS) for f in files)
            if found >= need:
                return None
    if found == 0:
        return (f"--data_path {path} is empty: no images ({', '.join(IMG_EXTENSIONS)}) in its "
                f"{len(classes)} class folder(s)")
    return (f"--data_path {path} holds {found} image(s), fewer than one global batch ({need} = "
            f"--batch_size_per_gpu x processes): lower --batch_size_per_gpu or add images")


def _output_dir_error(out: str) -> Optional[str]:
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--output_dir {out} is an existing file: pass a folder (it is created if missing)"
    parent = out
    while not os.path.exists(parent):  # the nearest existing folder is where it gets created
        parent = os.path.dirname(os.path.abspath(parent))
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--output_dir {out}: {parent} is not writable; pick a folder you can write to"
    return None


def _schedule_errors(args) -> list[str]:
    """Every schedule that does not fit in --epochs (all of them, not the first)."""
    errs = []
    # the patch temperature warms up after --pred_start_epoch (the [CLS] one from epoch 0)
    if args.pred_start_epoch + args.warmup_teacher_temp_epochs > args.epochs:
        errs.append(f"the teacher temperature schedule does not fit: --pred_start_epoch "
                    f"{args.pred_start_epoch} + --warmup_teacher_temp_epochs "
                    f"{args.warmup_teacher_temp_epochs} > --epochs {args.epochs}")
    if args.warmup_epochs > args.epochs:
        errs.append(f"the lr warm-up --warmup_epochs {args.warmup_epochs} is longer than "
                    f"--epochs {args.epochs}")
    return errs


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None):
    """Reject inconsistent settings before any work starts; resolve every ``auto``."""
    parser = parser or build_parser()
    from ibot_fast.models.vit import ARCHS

    arch = args.arch.replace("deit", "vit")
    if arch not in ARCHS and arch not in SWIN_ARCHS:
        _fail(parser, f"--arch {args.arch!r} is unknown; choose one of "
                      f"{sorted(ARCHS) + sorted(SWIN_ARCHS)}")
    args.arch = arch
    if args.window_size < 1:
        _fail(parser, f"--window_size {args.window_size} must be >= 1")
    if is_swin(arch):
        if args.patch_size != SWIN_PATCH_SIZE:
            _fail(parser, f"--patch_size {args.patch_size}: a Swin --arch is built for "
                          f"--patch_size {SWIN_PATCH_SIZE}")
        if args.global_crops_size % SWIN_MASK_CELL:
            _fail(parser, f"--global_crops_size {args.global_crops_size} is not a multiple of "
                          f"{SWIN_MASK_CELL}: a Swin --arch masks {SWIN_MASK_CELL}-px cells (one "
                          "per final-stage token)")
    for name in ("global_crops_size", "local_crops_size"):
        size = vars(args)[name]
        if args.patch_size <= 0 or size % args.patch_size:
            _fail(parser, f"--patch_size {args.patch_size} does not divide --{name} {size}; "
                          f"pick a crop size that is a multiple of the patch size")
    for name in ("global_crops_scale", "local_crops_scale"):
        lo, hi = vars(args)[name]
        if not (0 < lo <= hi <= 1):
            _fail(parser, f"--{name} {lo} {hi}: need 0 < min <= max <= 1")
    if args.global_crops_number < 2:
        _fail(parser, "--global_crops_number must be >= 2 (the [CLS] loss pairs different views)")
    if args.local_crops_number < 0:
        _fail(parser, "--local_crops_number must be >= 0")
    # The mask generator owns the masking rules; its ValueError becomes a usage error here.
    from ibot_fast.masking import MaskGenerator
    try:
        MaskGenerator(args.pred_ratio, args.pred_ratio_var, pred_shape=args.pred_shape,
                      pred_start_epoch=args.pred_start_epoch)
    except ValueError as err:
        _fail(parser, f"masking flags: {err} (--pred_ratio / --pred_ratio_var / "
                      f"--pred_start_epoch)")
    for name in ("epochs", "batch_size_per_gpu", "out_dim", "patch_out_dim", "head_hidden_dim",
                 "head_bottleneck_dim", "log_freq"):
        if vars(args)[name] < 1:
            _fail(parser, f"--{name} must be >= 1")
    for name in ("teacher_temp", "warmup_teacher_temp", "teacher_patch_temp",
                 "warmup_teacher_patch_temp"):
        if not vars(args)[name] > 0:
            _fail(parser, f"--{name} must be > 0")
    for name in ("lr", "min_lr", "weight_decay", "weight_decay_end"):
        value = vars(args)[name]
        if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
            need = "> 0" if name == "lr" else ">= 0"
            _fail(parser, f"--{name} {value}: must be finite and {need}")
    if not (math.isfinite(args.koleo_weight) and args.koleo_weight >= 0):
        _fail(parser, f"--koleo_weight {args.koleo_weight}: must be finite and >= 0")
    if not 0 <= args.momentum_teacher <= 1:
        _fail(parser, "--momentum_teacher must be in [0, 1]")
    if not 0 <= args.drop_path < 1:
        _fail(parser, "--drop_path must be in [0, 1)")
    if args.keep_checkpoints < 1:
        _fail(parser, "--keep_checkpoints must be >= 1 (checkpoint.pth itself)")
    for name in ("knn_every", "saveckp_freq", "warmup_epochs", "warmup_teacher_temp_epochs",
                 "freeze_last_layer", "pred_start_epoch", "clip_grad", "max_steps_per_epoch"):
        if vars(args)[name] < 0:
            _fail(parser, f"--{name} must be >= 0")
    errs = _schedule_errors(args)
    if errs:
        _fail(parser, "; ".join(errs) + ": raise --epochs or shorten "
                      + ("these schedules" if len(errs) > 1 else "the schedule"))
    if args.data_path is None:
        _fail(parser, "--data_path is required: an ImageFolder root (root/<class>/<image>), "
                      "'mnist_5k' for the embedded demo digits, or '--preset demo'")

    # ---- resolve what auto means on this machine (recorded in args.json) ----
    args.device = resolve_device(args.device)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            _fail(parser, "--device cuda: torch sees no CUDA device; use --device cpu (or auto)")
    if args.precision == "auto":
        args.precision = "fp16" if args.use_fp16 else default_precision(args.device)
    errs = cross_flag_errors(args)  # before the step path is resolved: it reads --fast_step
    args.step = args.step or ("reference" if args.fast_step is False else "fast")
    args.fast_step = args.step == "fast"
    errs = errs + [e for e in cross_flag_errors(args) if e not in errs]
    if errs:
        _fail(parser, "; ".join(errs))
    if args.packed_crops is None:  # unset: packed where the backbone can be (ViT)
        args.packed_crops = not is_swin(args.arch)
    args.use_fp16 = args.precision == "fp16"
    # The patch head follows the [CLS] head's size whenever either net shares it (reference).
    if args.shared_head or args.shared_head_teacher:
        args.patch_out_dim = args.out_dim

    from ibot_fast.masking import default_mask_backend, extension_available
    if args.mask_backend == "auto":
        args.mask_backend = default_mask_backend()  # logs why when it falls back to python
    elif args.mask_backend != "python" and not extension_available(args.mask_backend == "cuda"):
        need = " built with CUDA, and a GPU" if args.mask_backend == "cuda" else ""
        _fail(parser, f"--mask_backend {args.mask_backend} needs the C++ extension "
                      f"ibot_fast._mask_ext{need}, which is not available; use --mask_backend "
                      f"python or rebuild it (bash scripts/setup.sh)")
    from ibot_fast.data.dali import resolve_data_backend
    if args.data_path.startswith("synthetic") and args.data_backend == "auto":
        args.data_backend = "torch"  # generated images: no files for DALI to decode
    try:
        args.data_backend = resolve_data_backend(args.data_backend, args.device)
    except ValueError as err:
        _fail(parser, str(err))
    try:
        from ibot_fast.models.packed import check_attn_backend
        check_attn_backend(args.attn_backend, args.device, training=True)
    except ValueError as err:
        _fail(parser, str(err))
    if args.loss_backend == "auto":  # what the fused loss's auto picks for these tensors
        args.loss_backend = ("triton" if args.device == "cuda" and args.precision != "fp64"
                             and _triton_installed() else "torch")
    workers, threads = default_workers_and_threads(args.device)
    if args.num_workers == "auto":
        args.num_workers = workers
    elif args.num_workers < workers:  # cores no loader worker takes go to the computation
        threads += workers - args.num_workers
    if args.threads in ("auto", 0):
        env = os.environ.get("OMP_NUM_THREADS", "")
        args.threads = int(env) if env.isdigit() and int(env) > 0 else threads

    global_batch = args.batch_size_per_gpu * max(1, int(os.environ.get("WORLD_SIZE", "1")))
    for err in (_data_path_error(args.data_path, global_batch),
                _output_dir_error(args.output_dir)):
        if err:
            _fail(parser, err)
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    # First pass: find the preset; its values become defaults, explicit flags still win.
    known, _ = parser.parse_known_args(argv)
    if known.preset:
        parser.set_defaults(**PRESETS[known.preset])
    args = parser.parse_args(argv)  # unknown flags fail here
    return validate(args, parser)


def default_args(**overrides) -> argparse.Namespace:
    """The parser's defaults as a namespace (not validated): for code and tests that build
    ``args`` without a command line. ``overrides`` set fields by name."""
    args = build_parser().parse_args([])
    for name, value in overrides.items():
        if not hasattr(args, name):
            raise AttributeError(f"default_args: no flag --{name}")
        setattr(args, name, value)
    return args
