"""The command line (ibot_fast/config.py): every flag rule fails before any work with exit code 2
and a short message; choice lists have one source; defaults fit the machine; ``--help`` shows
every default; the namespace holds resolved values."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

from ibot_fast import config
from ibot_fast.config import CROSS_FLAG_RULES, build_parser, default_args, parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--arch", "vit_nano", "--patch_size", "8", "--global_crops_size", "16",
         "--local_crops_size", "8", "--batch_size_per_gpu", "4", "--epochs", "2",
         "--warmup_teacher_temp_epochs", "1", "--warmup_epochs", "1",
         "--data_path", "synthetic:16"]


@pytest.fixture
def cpu(monkeypatch):
    """A CPU-only machine, not under torchrun, no Triton interpreter."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "TRITON_INTERPRET"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def gpu(monkeypatch):
    """A faked CUDA machine with bf16 support (only the flag validation runs)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "TRITON_INTERPRET"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def no_work(monkeypatch):
    """Reading data or building a model fails the test: a usage error must come first."""
    import ibot_fast.train as train

    def reached(*a, **k):
        raise AssertionError("data or models were built before the flags were checked")

    for name in ("Trainer", "resolve_data", "build_ibot_models", "init_distributed"):
        monkeypatch.setattr(train, name, reached)
    return train


def _usage_error(argv, capsys, train_module=None) -> str:
    """Run ``ibot_fast.train.main(argv)`` (or parse_args); assert exit 2; return stderr."""
    with pytest.raises(SystemExit) as exc:
        (train_module.main if train_module else parse_args)(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


# ----------------------------------------------------------------------- cross-flag rules
# One command line per rule that breaks exactly that rule's condition.
SWIN_SMALL = ["--arch", "swin_nano", "--patch_size", "4", "--global_crops_size", "32",
              "--local_crops_size", "16"]
RULE_EXAMPLES = {
    "step-vs-fast_step": ("cpu", ["--step", "fast", "--fast_step", "false"]),
    "use_fp16-vs-precision": ("cpu", ["--use_fp16", "true", "--precision", "bf16"]),
    "reference-step-head_tokens": ("cpu", ["--step", "reference", "--head_tokens", "all"]),
    "reference-step-packed_crops": ("cpu", ["--step", "reference", "--packed_crops", "false"]),
    "reference-step-ema_backend": ("cpu", ["--step", "reference", "--ema_backend", "torch"]),
    "reference-step-ema_teacher_bf16": ("gpu", ["--step", "reference",
                                                "--ema_teacher_bf16", "true"]),
    "reference-step-drop_path_mode": ("cpu", ["--fast_step", "false",
                                              "--drop_path_mode", "subset"]),
    "reference-step-compile": ("cpu", ["--step", "reference", "--compile", "blocks"]),
    "reference-step-fused_head_loss": ("cpu", ["--step", "reference",
                                               "--fused_head_loss", "true"]),
    "reference-step-fsdp": ("cpu", ["--step", "reference", "--fsdp", "true"]),
    "fused_head_loss-head_tokens": ("cpu", ["--fused_head_loss", "true",
                                            "--head_tokens", "all"]),
    "compile-step-head_tokens": ("cpu", ["--compile", "step", "--head_tokens", "all"]),
    "compile-step-fsdp": ("cpu", ["--compile", "step", "--fsdp", "true"]),
    "loss_backend-eager-selected": ("cpu", ["--loss_backend", "eager"]),
    "loss_backend-triton-device": ("cpu", ["--loss_backend", "triton"]),
    "loss_backend-triton-fp64": ("gpu", ["--loss_backend", "triton", "--precision", "fp64"]),
    "ema_teacher_bf16-precision": ("cpu", ["--ema_teacher_bf16", "true"]),
    "ema_teacher_bf16-fsdp": ("gpu", ["--ema_teacher_bf16", "true", "--fsdp", "true"]),
    "ema_backend-triton-fsdp": ("gpu", ["--ema_backend", "triton", "--fsdp", "true"]),
    "ema_backend-triton-device": ("cpu", ["--ema_backend", "triton"]),
    "attn_backend-varlen-precision": ("gpu", ["--attn_backend", "varlen", "--precision", "fp32"]),
    "attn_backend-device": ("cpu", ["--attn_backend", "xformers"]),
    "attn_backend-flex-cpu": ("cpu", ["--attn_backend", "flex"]),
    "mask_backend-cuda-device": ("cpu", ["--mask_backend", "cuda"]),
    "data_backend-dali-synthetic": ("cpu", ["--data_backend", "dali"]),
    "fsdp-torchrun": ("cpu", ["--fsdp", "true"]),
    "koleo_weight-batch_size_per_gpu": ("cpu", ["--koleo_weight", "0.3",
                                                "--batch_size_per_gpu", "1"]),
    "swin-attn_backend": ("gpu", SWIN_SMALL + ["--attn_backend", "flex"]),
    "swin-packed_crops": ("cpu", SWIN_SMALL + ["--packed_crops", "true"]),
    "swin-compile": ("cpu", SWIN_SMALL + ["--compile", "blocks"]),
    "swin-drop_path_mode": ("cpu", SWIN_SMALL + ["--drop_path_mode", "subset"]),
    "swin-fsdp": ("gpu", SWIN_SMALL + ["--fsdp", "true"]),
}


def test_every_rule_has_an_example():
    assert set(RULE_EXAMPLES) == {r.name for r in CROSS_FLAG_RULES}


@pytest.mark.parametrize("name", sorted(RULE_EXAMPLES))
def test_cross_flag_rule_is_a_usage_error_before_any_work(name, request, no_work, capsys):
    machine, extra = RULE_EXAMPLES[name]
    request.getfixturevalue(machine)
    err = _usage_error(SMALL + extra, capsys, no_work)
    rule = next(r for r in CROSS_FLAG_RULES if r.name == name)
    # the rule's own message (its fixed part; "{}" / "{flag}" is where the flags are named)
    assert max(re.split(r"\{\w*\}", rule.message), key=len).strip() in err, err
    assert "usage:" not in err and len(err.strip().splitlines()) == 2  # message + hint


def test_broken_rules_are_reported_together(cpu, capsys):
    err = _usage_error(SMALL + ["--compile", "step", "--head_tokens", "all",
                                "--attn_backend", "xformers"], capsys)
    assert "--compile step compiles" in err and "xformers" in err


def test_the_fixed_part_of_each_message_names_a_flag():
    for rule in CROSS_FLAG_RULES:
        assert "--" in rule.message, rule.name


# ---------------------------------------------------------------------------- step path
@pytest.mark.parametrize("extra, step", [
    ([], "fast"), (["--fast_step", "true"], "fast"), (["--fast_step", "false"], "reference"),
    (["--step", "reference"], "reference"), (["--step", "fast", "--fast_step", "true"], "fast"),
    (["--step", "reference", "--fast_step", "false"], "reference"),
])
def test_step_and_its_alias(cpu, extra, step):
    args = parse_args(SMALL + extra)
    assert args.step == step and args.fast_step == (step == "fast")


def test_reference_step_accepts_the_neutral_fast_values(cpu):
    args = parse_args(SMALL + ["--step", "reference", "--head_tokens", "selected",
                               "--compile", "false", "--packed_crops", "true"])
    assert args.step == "reference"


# ------------------------------------------------------------------- one source of truth
def test_choice_lists_come_from_the_implementing_modules():
    from ibot_fast.ema import EMA_BACKENDS
    from ibot_fast.fast_step import DROP_PATH_MODES, HEAD_TOKENS
    from ibot_fast.loss import LOSS_BACKENDS
    from ibot_fast.models.packed import ALL_ATTN_BACKENDS
    from ibot_fast.models.vit import ATTN_BACKENDS
    from ibot_fast.step import STEP_PATHS
    actions = build_parser()._option_string_actions
    assert actions["--attn_backend"].choices is ALL_ATTN_BACKENDS is ATTN_BACKENDS
    assert actions["--head_tokens"].choices is HEAD_TOKENS
    assert actions["--drop_path_mode"].choices is DROP_PATH_MODES
    assert actions["--loss_backend"].choices is LOSS_BACKENDS
    assert actions["--ema_backend"].choices is EMA_BACKENDS
    assert actions["--step"].choices is STEP_PATHS


@pytest.mark.parametrize("module", ["train.py", "step.py", "fast_step.py", "fsdp.py", "optim.py",
                                    "ema.py", "config.py", "reference_repo.py"])
def test_no_getattr_defaults_on_args(module):
    """parse_args sets every field: the trainer reads args.name, never a second default."""
    with open(os.path.join(REPO, "ibot_fast", module)) as f:
        assert "getattr(args" not in f.read()


def test_default_args_has_every_flag():
    args = default_args(epochs=3)
    dests = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert dests <= set(vars(args)) and args.epochs == 3
    with pytest.raises(AttributeError, match="no_such"):
        default_args(no_such=1)


# ------------------------------------------------------------------------------- --help
def test_help_shows_a_default_for_every_flag(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    blocks = re.split(r"\n  (?=-)", out.split("options:", 1)[1])[1:]
    flags = [b for b in blocks if not b.startswith("-h")]
    assert len(flags) == len([a for a in build_parser()._actions if a.dest != "help"])
    for b in flags:
        assert "(default:" in " ".join(b.split()), b
    for title in ("reference flags", "speed", "exactness and verification", "data",
                  "faults", "evaluation"):
        assert title in out
    assert "opt-in until measured on a GPU" in out  # --compile, --fused_head_loss


def test_unknown_flag_is_one_line_not_a_usage_dump(capsys):
    err = _usage_error(SMALL + ["--no_such_flag", "1"], capsys)
    assert "unrecognized arguments" in err and "usage:" not in err
    assert len(err.strip().splitlines()) == 2


# ----------------------------------------------------------------- defaults for the device
def test_precision_follows_the_device(cpu, monkeypatch):
    assert parse_args(SMALL).precision == "fp32"
    args = parse_args(SMALL + ["--use_fp16", "true"])
    assert args.precision == "fp16" and args.use_fp16  # the reference's fp16 + GradScaler
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    args = parse_args(SMALL)
    assert (args.device, args.precision, args.use_fp16) == ("cuda", "bf16", False)
    assert parse_args(SMALL + ["--use_fp16", "true"]).precision == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert parse_args(SMALL).precision == "fp32"


@pytest.mark.parametrize("device, cores, ranks, want", [
    ("cpu", 2, 1, (1, 1)), ("cpu", 16, 2, (4, 4)), ("cpu", 1, 1, (0, 1)),
    ("cuda", 16, 1, (10, 6)), ("cuda", 16, 4, (3, 1)), ("cuda", 2, 4, (0, 1)),
])
def test_workers_and_threads_share_the_usable_cores(monkeypatch, device, cores, ranks, want):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    assert config.default_workers_and_threads(device) == want


def test_auto_workers_and_threads_in_args(cpu, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    args = parse_args(SMALL)
    assert (args.num_workers, args.threads) == (4, 4)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert parse_args(SMALL).threads == 1  # an explicit environment wins
    args = parse_args(SMALL + ["--num_workers", "0", "--threads", "3"])
    assert (args.num_workers, args.threads) == (0, 3)
    monkeypatch.delenv("OMP_NUM_THREADS")
    args = parse_args(SMALL + ["--num_workers", "0"])  # no workers: their cores compute
    assert (args.num_workers, args.threads) == (0, 8)


def test_args_hold_resolved_values(cpu):
    args = parse_args(SMALL)
    for name in ("device", "precision", "data_backend", "mask_backend", "num_workers",
                 "threads", "step"):
        assert getattr(args, name) != "auto" and getattr(args, name) is not None, name
    assert (args.device, args.data_backend, args.step) == ("cpu", "torch", "fast")
    assert args.mask_backend in ("cpp", "python")
    json.dumps(vars(args))  # what args.json records


# ------------------------------------------------------------------- errors before work
@pytest.mark.parametrize("make, needle", [
    (lambda p: str(p / "missing"), "does not exist"),
    (lambda p: (p / "f.png").write_bytes(b"x") and str(p / "f.png"), "is a file"),
    (lambda p: (p / "e").mkdir() or str(p / "e"), "no class sub-folders"),
    (lambda p: (p / "d" / "c").mkdir(parents=True) or str(p / "d"), "no images"),
    (lambda p: ((p / "s" / "c").mkdir(parents=True), (p / "s" / "c" / "a.png").write_bytes(b""))
     and str(p / "s"), "fewer than one global batch"),
])
def test_bad_data_path_is_a_usage_error(tmp_path, cpu, no_work, capsys, make, needle):
    path = make(tmp_path)
    err = _usage_error(SMALL + ["--data_path", path, "--output_dir", str(tmp_path / "o")],
                       capsys, no_work)
    assert needle in err and "--data_path" in err


def test_bad_output_dir_is_a_usage_error(tmp_path, cpu, no_work, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    err = _usage_error(SMALL + ["--output_dir", str(tmp_path / "file")], capsys, no_work)
    assert "is an existing file" in err
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root may write anywhere
    err = _usage_error(SMALL + ["--output_dir", str(tmp_path / "new" / "run")], capsys, no_work)
    assert "not writable" in err and str(tmp_path) in err


@pytest.mark.parametrize("flag, value", [
    ("--lr", "-1"), ("--lr", "0"), ("--lr", "nan"), ("--min_lr", "-1e-6"),
    ("--weight_decay", "-1"), ("--weight_decay_end", "-0.1"), ("--batch_size_per_gpu", "0"),
    ("--epochs", "0"), ("--epochs", "-2"), ("--clip_grad", "-1"), ("--num_workers", "-1"),
    ("--koleo_weight", "-0.1"), ("--koleo_weight", "nan"),
])
def test_non_positive_values_are_usage_errors(cpu, capsys, flag, value):
    assert flag in _usage_error(SMALL + [flag, value], capsys)


def test_every_schedule_rule_is_reported_at_once(cpu, capsys):
    err = _usage_error(SMALL + ["--epochs", "2", "--warmup_teacher_temp_epochs", "30",
                                "--warmup_epochs", "10"], capsys)
    assert "--warmup_teacher_temp_epochs 30" in err and "--warmup_epochs 10" in err
    assert len(err.strip().splitlines()) == 2  # one message (and the hint)
