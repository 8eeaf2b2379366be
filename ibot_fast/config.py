"""Command line and presets for ``torchrun -m ibot_fast.train``.

Flag names and defaults are the reference's (``main_ibot.py:get_args_parser``) so its users feel
at home; flags the reference hard-codes (crop sizes, head widths, precision) are added with the
reference value as default. Presets set defaults for the published recipes; any flag given on
the command line wins over the preset. Unknown flags and inconsistent combinations fail in
``parse_args`` before any work is done, with a message saying what to fix.
"""
from __future__ import annotations

import argparse
import math
import sys

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
    # A few minutes on 2 CPU cores: the embedded MNIST digits, small crops, a small model and
    # head. Measured on the MNIST digits (README): a vit_tiny at the recipe's lr/momentum gets
    # ~120 steps in that time and its teacher is no better than random init (momentum 0.99 keeps
    # it mostly the initial weights); this 4-block model gets 625 steps, with a faster teacher
    # (0.95) and a constant teacher temperature of 0.04 (0.07 flattens its targets to uniform here).
    # The teacher's k-NN is evaluated after every epoch (knn_every=1) so the curve shows it. Its
    # [CLS] head still collapses to uniform outputs late in the run (README, "Demo result").
    "demo": dict(
        arch="vit_nano", patch_size=8, out_dim=512, shared_head=True, norm_last_layer=False,
        head_hidden_dim=256, teacher_temp=0.04, warmup_teacher_temp=0.04,
        warmup_teacher_temp_epochs=1, pred_ratio=[0.0, 0.3], pred_ratio_var=[0.0, 0.2],
        batch_size_per_gpu=32, epochs=5, global_crops_size=32, local_crops_size=16,
        global_crops_scale=(0.25, 1.0), local_crops_number=4, local_crops_scale=(0.05, 0.25),
        lr=2e-3, min_lr=1e-6, warmup_epochs=1, drop_path=0.1, precision="fp32",
        momentum_teacher=0.95, freeze_last_layer=1, num_workers=2, data_path="mnist_5k",
        knn_eval=True, knn_every=1, output_dir="./output/demo", saveckp_freq=0,
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
    if value.lower() in ("blocks", "step"):
        return value.lower()
    try:
        return "blocks" if _bool(value) else False
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected false, blocks (= true) or step, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "ibot_fast.train", description="iBOT pre-training of Vision Transformers",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="named recipe; explicit flags override it")

    g = p.add_argument_group("model")
    g.add_argument("--arch", default="vit_small",
                   help="vit_tiny | vit_small | vit_base | vit_large (deit_* accepted)")
    g.add_argument("--patch_size", type=int, default=16)
    g.add_argument("--out_dim", type=int, default=8192, help="[CLS] head output dimension K")
    g.add_argument("--patch_out_dim", type=int, default=8192,
                   help="patch head output dimension (follows out_dim when a head is shared)")
    g.add_argument("--shared_head", type=_bool, default=False)
    g.add_argument("--shared_head_teacher", type=_bool, default=True)
    g.add_argument("--norm_last_layer", type=_bool, default=True)
    g.add_argument("--head_hidden_dim", type=int, default=2048)
    g.add_argument("--head_bottleneck_dim", type=int, default=256)
    g.add_argument("--momentum_teacher", type=float, default=0.996)
    g.add_argument("--drop_path", type=float, default=0.1)
    g.add_argument("--use_masked_im_modeling", type=_bool, default=True)

    g = p.add_argument_group("loss and temperatures")
    g.add_argument("--teacher_temp", type=float, default=0.04)
    g.add_argument("--warmup_teacher_temp", type=float, default=0.04)
    g.add_argument("--teacher_patch_temp", type=float, default=0.07)
    g.add_argument("--warmup_teacher_patch_temp", type=float, default=0.04)
    g.add_argument("--warmup_teacher_temp_epochs", type=int, default=30)
    g.add_argument("--lambda1", type=float, default=1.0, help="[CLS] loss weight")
    g.add_argument("--lambda2", type=float, default=1.0, help="patch (MIM) loss weight")

    g = p.add_argument_group("masking")
    g.add_argument("--pred_ratio", type=float, nargs="+", default=[0.3])
    g.add_argument("--pred_ratio_var", type=float, nargs="+", default=[0.0])
    g.add_argument("--pred_shape", choices=["block", "rand"], default="block")
    g.add_argument("--pred_start_epoch", type=int, default=0)
    g.add_argument("--mask_backend", choices=["python", "cpp", "cuda"], default=None,
                   help="mask generator: python (reference), cpp (C++ extension, in the loader "
                        "workers), cuda (GPU kernel in the training process); default cpp when "
                        "ibot_fast._mask_ext is built, else python")

    g = p.add_argument_group("crops")
    g.add_argument("--global_crops_number", type=int, default=2)
    g.add_argument("--global_crops_scale", type=float, nargs=2, default=(0.14, 1.0))
    g.add_argument("--local_crops_number", type=int, default=0)
    g.add_argument("--local_crops_scale", type=float, nargs=2, default=(0.05, 0.4))
    g.add_argument("--global_crops_size", type=int, default=224)
    g.add_argument("--local_crops_size", type=int, default=96)

    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    g.add_argument("--lr", type=float, default=5e-4, help="base lr at batch 256 (scaled)")
    g.add_argument("--min_lr", type=float, default=1e-6)
    g.add_argument("--warmup_epochs", type=int, default=10)
    g.add_argument("--weight_decay", type=float, default=0.04)
    g.add_argument("--weight_decay_end", type=float, default=0.4)
    g.add_argument("--clip_grad", type=float, default=3.0, help="per-tensor norm; 0 disables")
    g.add_argument("--freeze_last_layer", type=int, default=1)
    g.add_argument("--batch_size_per_gpu", type=int, default=128)
    g.add_argument("--epochs", type=int, default=100)
    g.add_argument("--use_fp16", type=_bool, default=True,
                   help="reference flag: fp16 autocast + GradScaler (see --precision)")
    g.add_argument("--precision", choices=["fp32", "fp16", "bf16", "fp64"], default=None,
                   help="autocast precision; default follows --use_fp16 (fp16 or fp32); "
                        "fp64 runs everything in double, for verification only")

    g = p.add_argument_group("fast step (ibot_fast/fast_step.py; every option has a reference)")
    g.add_argument("--fast_step", type=_bool, default=False,
                   help="the fast training step (same numbers as the reference step, tested): "
                        "selected-token head, packed crops, flat EMA, fused AdamW")
    g.add_argument("--attn_backend", choices=["sdpa", "math", "xformers", "flex", "varlen"],
                   default="sdpa", help="attention: sdpa (default, CPU), math (explicit "
                   "softmax, the reference), xformers / flex / varlen (CUDA)")
    g.add_argument("--head_tokens", choices=["selected", "all"], default="selected",
                   help="fast step: head on [CLS] + masked tokens only, or on every token")
    g.add_argument("--packed_crops", type=_bool, default=True,
                   help="fast step: global and local crops through each block in one pass")
    g.add_argument("--compile", type=_compile_mode, default=False,
                   help="fast step: torch.compile with static shapes: 'blocks' (= true) each "
                        "transformer block, 'step' teacher + student forward + loss as one "
                        "graph (needs --head_tokens selected, not with --fsdp); false: eager")
    g.add_argument("--fused_head_loss", type=_bool, default=False,
                   help="fast step, --head_tokens selected: the patch head's K2-way last "
                        "layer runs inside the patch loss (soft_ce_linear), so no [M, K2] "
                        "logits tensor is materialised (student or teacher)")
    g.add_argument("--ema_backend", choices=["auto", "triton", "torch"], default="auto",
                   help="fast step: flat-buffer EMA kernel (triton on CUDA) or lerp_")
    g.add_argument("--ema_teacher_bf16", type=_bool, default=False,
                   help="fast step: the EMA also writes a bf16 teacher copy for the teacher "
                        "forward (needs --precision bf16)")
    g.add_argument("--drop_path_mode", choices=["sample", "subset"], default="sample",
                   help="fast step: per-sample drop path (reference) or DINOv2's "
                        "compute-skipping batch-subset residual (same expectation)")
    g.add_argument("--fsdp", type=_bool, default=False,
                   help="fast step: FSDP2 (fully_shard per block, then the whole student; the "
                        "teacher sharded the same way) instead of DDP; full-state checkpoints "
                        "interchangeable with DDP ones")

    g = p.add_argument_group("data and run")
    g.add_argument("--data_path", default=None,
                   help="ImageFolder root (class sub-folders), 'mnist_5k' for the embedded "
                        "demo digits, or 'synthetic[:N]' for generated images")
    g.add_argument("--output_dir", default="./output")
    g.add_argument("--saveckp_freq", type=int, default=40,
                   help="also keep checkpointNNNN.pth every N epochs (0: never)")
    g.add_argument("--resume", type=_bool, default=True,
                   help="resume from output_dir/checkpoint.pth when it exists")
    g.add_argument("--load_from", default=None,
                   help="checkpoint to resume from (relative paths are under output_dir)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num_workers", type=int, default=10,
                   help="DataLoader workers (torch data back end) or DALI CPU threads (dali)")
    g.add_argument("--data_backend", choices=["auto", "dali", "torch"], default="auto",
                   help="dali: decode + augment with NVIDIA DALI (on the GPU when training on "
                        "one); torch: PIL in DataLoader workers; auto: dali on a GPU when DALI "
                        "is installed (pip install ibot_fast[dali]), torch otherwise")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--deterministic", type=_bool, default=False,
                   help="deterministic algorithms (slower; used by the resume tests)")
    g.add_argument("--log_freq", type=int, default=10, help="steps between logged lines")
    g.add_argument("--max_steps_per_epoch", type=int, default=0,
                   help="stop each epoch after N steps (0: full epoch); for smoke tests")
    g.add_argument("--progress", type=_bool, default=True, help="progress bar on rank 0")
    g.add_argument("--on_nan", choices=["stop", "skip"], default="stop",
                   help="a non-finite loss or gradient: 'stop' (exit code 3 at the next "
                        "--log_freq sync, naming the step; no checkpoint of it is written) or "
                        "'skip' (that step changes nothing, on every rank; costs one host sync "
                        "per step)")
    g.add_argument("--keep_checkpoints", type=int, default=2,
                   help="keep checkpoint.pth and its K-1 predecessors (checkpoint.1.pth, ...); "
                        "a corrupt newest one falls back to the previous on resume")
    g.add_argument("--knn_eval", type=_bool, default=False,
                   help="k-NN evaluation of the teacher (and of the random init) at the end")
    g.add_argument("--knn_train_path", default=None,
                   help="labelled ImageFolder for the k-NN memory (default: data_path)")
    g.add_argument("--knn_val_path", default=None,
                   help="held-out labelled ImageFolder for the k-NN queries")
    g.add_argument("--knn_every", type=int, default=0,
                   help="every N epochs: teacher k-NN + NMI/ARI on the k-NN folders, one line "
                        "in output_dir/knn.jsonl (0: never)")
    g.add_argument("--tensorboard", type=_bool, default=False,
                   help="also write the scalars to output_dir/tf_logs (needs tensorboard)")
    return p


def _fail(parser: argparse.ArgumentParser, msg: str):
    parser.error(msg)  # prints usage + message, exits with status 2


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None):
    """Reject inconsistent settings before any work starts."""
    parser = parser or build_parser()
    from ibot_fast.models.vit import ARCHS

    arch = args.arch.replace("deit", "vit")
    if arch not in ARCHS:
        _fail(parser, f"--arch {args.arch!r} is unknown; choose one of {sorted(ARCHS)}")
    args.arch = arch
    for name in ("global_crops_size", "local_crops_size"):
        size = getattr(args, name)
        if args.patch_size <= 0 or size % args.patch_size:
            _fail(parser, f"--patch_size {args.patch_size} does not divide --{name} {size}; "
                          f"pick a crop size that is a multiple of the patch size")
    for name in ("global_crops_scale", "local_crops_scale"):
        lo, hi = getattr(args, name)
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
    from ibot_fast.masking import default_mask_backend, extension_available
    if args.mask_backend is None:
        args.mask_backend = default_mask_backend()  # logs why when it falls back to python
    elif args.mask_backend != "python" and not extension_available(args.mask_backend == "cuda"):
        need = " built with CUDA, and a GPU" if args.mask_backend == "cuda" else ""
        _fail(parser, f"--mask_backend {args.mask_backend} needs the C++ extension "
                      f"ibot_fast._mask_ext{need}, which is not available; use --mask_backend "
                      f"python or rebuild it (bash scripts/setup.sh)")
    if args.mask_backend == "cuda" and args.device == "cpu":
        _fail(parser, "--mask_backend cuda generates masks on the GPU; it cannot run with "
                      "--device cpu")
    if args.epochs < 1:
        _fail(parser, "--epochs must be >= 1")
    # The schedules own their length rules (as the mask generator owns the masking rules).
    from ibot_fast.schedules import cosine_scheduler, teacher_temp_schedule
    try:
        teacher_temp_schedule(args.warmup_teacher_temp, args.teacher_temp,
                              args.warmup_teacher_temp_epochs, args.epochs,
                              start_epoch=args.pred_start_epoch)
        cosine_scheduler(args.lr, args.min_lr, args.epochs, 1, warmup_epochs=args.warmup_epochs)
    except ValueError as err:
        _fail(parser, str(err))
    for name in ("batch_size_per_gpu", "out_dim", "patch_out_dim", "head_hidden_dim",
                 "head_bottleneck_dim", "log_freq"):
        if getattr(args, name) < 1:
            _fail(parser, f"--{name} must be >= 1")
    for name in ("teacher_temp", "warmup_teacher_temp", "teacher_patch_temp",
                 "warmup_teacher_patch_temp"):
        if not getattr(args, name) > 0:
            _fail(parser, f"--{name} must be > 0")
    if not 0 <= args.momentum_teacher <= 1:
        _fail(parser, "--momentum_teacher must be in [0, 1]")
    if not 0 <= args.drop_path < 1:
        _fail(parser, "--drop_path must be in [0, 1)")
    if args.keep_checkpoints < 1:
        _fail(parser, "--keep_checkpoints must be >= 1 (checkpoint.pth itself)")
    if args.knn_every < 0:
        _fail(parser, "--knn_every must be >= 0 (0: no periodic k-NN)")
    if args.clip_grad < 0 or args.num_workers < 0 or args.max_steps_per_epoch < 0:
        _fail(parser, "--clip_grad, --num_workers and --max_steps_per_epoch must be >= 0")
    if not all(math.isfinite(x) for x in (args.lr, args.min_lr, args.weight_decay,
                                          args.weight_decay_end)):
        _fail(parser, "--lr, --min_lr, --weight_decay and --weight_decay_end must be finite")
    if args.data_path is None:
        _fail(parser, "--data_path is required: an ImageFolder root (root/<class>/<image>), "
                      "'mnist_5k' for the embedded demo digits, or '--preset demo'")
    # The patch head follows the [CLS] head's size whenever either net shares it (reference).
    if args.shared_head or args.shared_head_teacher:
        args.patch_out_dim = args.out_dim
    if args.precision is None:
        args.precision = "fp16" if args.use_fp16 else "fp32"
    args.use_fp16 = args.precision == "fp16"
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
