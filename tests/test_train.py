"""The trainer: CLI validation, one step against a hand-written reference step, exact resume,
DDP (gloo, 2 processes) against one process, and the end-to-end run with its artefacts."""
from __future__ import annotations

import copy
import json
import math
import os
import re

import pytest
import torch

from ibot_fast.config import parse_args
from ibot_fast.train import Trainer, main
from helpers import (SWIN_TINY, TINY, assert_same_weights, read_jsonl, tiny_args,
                     torchrun_tiny)


# ------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("argv, needle", [
    (["--no_such_flag", "1"], "unrecognized arguments"),
    (["--patch_size", "7"], "does not divide"),
    (["--pred_ratio", "0.2", "--pred_ratio_var", "0.3"], "pred_ratio_var"),
    (["--pred_ratio", "1.2"], "outside [0, 1)"),
    (["--arch", "vit_huge"], "unknown"),
    (["--epochs", "5", "--warmup_teacher_temp_epochs", "30"], "temperature schedule"),
    (["--global_crops_scale", "0.5", "0.2"], "global_crops_scale"),
])
def test_cli_rejects_bad_flags(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--data_path", "synthetic"] + argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_cli_requires_data_path(capsys):
    with pytest.raises(SystemExit):
        parse_args([])
    assert "--data_path is required" in capsys.readouterr().err


def test_presets_and_overrides(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine
    a = parse_args(["--preset", "vit_small_recipe", "--data_path", "synthetic:64",
                    "--epochs", "3", "--warmup_teacher_temp_epochs", "1", "--warmup_epochs", "1"])
    assert (a.arch, a.patch_size, a.epochs, a.local_crops_number) == ("vit_small", 16, 3, 10)
    assert a.shared_head and not a.norm_last_layer and a.pred_ratio == [0.0, 0.3]
    assert a.patch_out_dim == a.out_dim == 8192  # follows out_dim when a head is shared
    assert a.precision == "fp32" and not a.use_fp16  # precision follows the device
    assert a.step == "fast" and a.fast_step  # the default step
    d = parse_args(["--preset", "demo"])
    assert d.data_path == "mnist_5k" and d.precision == "fp32" and not d.use_fp16


@pytest.mark.parametrize("make_root, needle", [
    (lambda p: str(p / "missing"), "does not exist"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "empty"),
])
def test_bad_data_folder_fails_with_message(tmp_path, make_root, needle, capsys):
    root = make_root(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(TINY + ["--data_path", root, "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exc.value.code == 2  # a usage error, before any work
    assert root in err and needle in err.lower()


# ------------------------------------------------------------------- one step, by hand
def _reference_step(student, teacher, loss_fn, opt_state, images, masks, epoch, lr, wd, m, args):
    """The reference's step written out: forward, loss (updates centres), backward, per-tensor
    clip with a norm per tensor, last layer cancelled while frozen, AdamW by hand, EMA by a
    Python loop."""
    ng = args.global_crops_number
    with torch.no_grad():
        t_out = teacher(images[:ng])
    s_out = student(images[:ng], mask=masks[:ng])
    s_local = student(images[ng:])[0]
    loss = loss_fn(s_out, t_out, s_local, masks, epoch)["loss"]
    student.zero_grad(set_to_none=True)
    loss.backward()
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    for _, p in named:  # clip_gradients of the reference
        if p.grad is not None:
            coef = args.clip_grad / (p.grad.norm(2).item() + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)
    if epoch < args.freeze_last_layer:
        for n, p in named:
            if "last_layer" in n:
                p.grad = None
    b1, b2, eps = 0.9, 0.999, 1e-8
    with torch.no_grad():
        for n, p in named:
            if p.grad is None:
                continue
            decay = 0.0 if (n.endswith(".bias") or p.ndim == 1) else wd
            st = opt_state.setdefault(n, {"t": 0, "m": torch.zeros_like(p),
                                          "v": torch.zeros_like(p)})
            st["t"] += 1
            p.mul_(1 - lr * decay)
            st["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
            st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            bc1, bc2 = 1 - b1 ** st["t"], 1 - b2 ** st["t"]
            denom = (st["v"].sqrt() / math.sqrt(bc2)).add_(eps)
            p.addcdiv_(st["m"], denom, value=-lr / bc1)
        s_params = dict(student.named_parameters())
        for n, pt in teacher.named_parameters():
            if n in s_params:
                pt.mul_(m).add_((1 - m) * s_params[n].detach())
    return loss.detach()


@pytest.mark.parametrize("step", ["fast", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_train_step_equals_hand_written_reference_step(tmp_path, dtype, step):
    """Three steps (one in the frozen first epoch, lr > 0) of Trainer.train_step, on both step
    paths (--step fast, the default, and --step reference), against the reference's step
    written out by hand. In fp64 everything must agree to ~1e-9. In fp32 the losses and centres
    agree to 1e-5, but parameters only to a fraction of one lr step: Adam divides by the
    gradient's own running norm, so gradients that are pure rounding noise (the key bias of
    attention has an exactly-zero true gradient) turn last-bit differences between the two
    clipping implementations into updates of up to ~1% of lr."""
    precision = "fp64" if dtype == torch.float64 else "fp32"
    args = tiny_args(tmp_path, "--freeze_last_layer", "1", "--clip_grad", "0.05",
                     "--epochs", "3", "--precision", precision, "--step", step)
    tr = Trainer(args)
    assert tr.path.name == step
    student, teacher = copy.deepcopy(tr.student), copy.deepcopy(tr.teacher)
    loss_fn = copy.deepcopy(tr.ibot_loss)
    opt_state: dict = {}
    initial = {n: p.detach().clone() for n, p in tr.student.named_parameters()}
    batches = [next(iter(tr.loader)) for _ in range(2)]
    n = tr.iters_per_epoch
    lr_step = float(tr.lr_schedule[n])
    assert lr_step > 0
    tight = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    params = (dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64
              else dict(rtol=0, atol=0.02 * lr_step))
    # epoch 0 (last layer frozen), then two steps of epoch 1
    for k, (epoch, it) in enumerate([(0, 1), (1, n + 0), (1, n + 1)]):
        images, _, masks = batches[k % 2]
        images = [im.to(dtype) for im in images]
        torch.manual_seed(100 + k)  # same drop-path draws on both sides
        got = tr.train_step(images, masks, epoch, it)["loss"]
        torch.manual_seed(100 + k)
        want = _reference_step(student, teacher, loss_fn, opt_state, images, masks, epoch,
                               float(tr.lr_schedule[it]), float(tr.wd_schedule[it]),
                               float(tr.momentum_schedule[it]), args)
        torch.testing.assert_close(got, want, **tight)
        if k == 0:  # frozen epoch: the last layer has not moved, the backbone has
            v = tr.student.head.last_layer.weight_v
            assert torch.equal(v, initial["head.last_layer.weight_v"])
            assert not torch.equal(tr.student.backbone.cls_token, initial["backbone.cls_token"])
    for (n1, p1), (n2, p2) in zip(tr.student.named_parameters(), student.named_parameters()):
        torch.testing.assert_close(p1, p2, **params, msg=f"student {n1}")
    for (n1, p1), (n2, p2) in zip(tr.teacher.named_parameters(), teacher.named_parameters()):
        torch.testing.assert_close(p1, p2, **params, msg=f"teacher {n1}")
    torch.testing.assert_close(tr.ibot_loss.center, loss_fn.center, **tight)
    torch.testing.assert_close(tr.ibot_loss.center2, loss_fn.center2, **tight)
    # the frozen epoch left the last layer without optimiser state; epoch 1 created it
    head = tr.student.head.last_layer.weight_v
    assert tr.optimizer.state[head]["step"] == 2
    assert not torch.equal(head, initial["head.last_layer.weight_v"])


@pytest.mark.parametrize("step", ["fast", "reference"])
def test_step_path_builds_its_parts_once(tmp_path, step):
    """The step path owns the student module, optimiser and EMA the trainer uses (one of each,
    built once): fused AdamW and the flat EMA on the fast step, the reference's otherwise."""
    from ibot_fast.ema import EMATeacherUpdate, FlatEMA
    tr = Trainer(tiny_args(tmp_path, "--step", step))
    assert tr.path.name == step
    assert tr.optimizer is tr.path.optimizer and tr.ema is tr.path.ema
    assert type(tr.ema) is (FlatEMA if step == "fast" else EMATeacherUpdate)
    assert bool(tr.optimizer.defaults.get("fused")) == (step == "fast")
    in_optimizer = [id(p) for g in tr.optimizer.param_groups for p in g["params"]]
    assert sorted(in_optimizer) == sorted(id(p) for p in tr.path.params)
    assert tr.path.module is (tr.path.fast_student if step == "fast" else tr.student)


def test_groups_and_frozen_g(tmp_path):
    tr = Trainer(tiny_args(tmp_path, "--norm_last_layer", "true"))
    decayed = {id(p) for p in tr.optimizer.param_groups[0]["params"]}
    names = {n: p for n, p in tr.student.named_parameters()}
    for n in ("backbone.cls_token", "backbone.pos_embed", "backbone.masked_embed",
              "head.last_layer.weight_v", "backbone.blocks.0.attn.qkv.weight"):
        assert id(names[n]) in decayed, n
    for n in ("backbone.blocks.0.norm1.weight", "backbone.blocks.0.attn.qkv.bias"):
        assert id(names[n]) not in decayed, n
    g = names["head.last_layer.weight_g"]
    assert not g.requires_grad
    assert all(id(g) != id(p) for grp in tr.optimizer.param_groups for p in grp["params"])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_equals_straight_run(tmp_path, workers):
    common = ["--epochs", "2", "--deterministic", "true", "--num_workers", str(workers)]
    straight, split = tmp_path / "straight", tmp_path / "split"
    main(TINY + ["--data_path", "synthetic:16", "--output_dir", str(straight)] + common)

    args = parse_args(TINY + ["--data_path", "synthetic:16", "--output_dir", str(split)]
                      + common)
    first = Trainer(args)  # run epoch 0 only, checkpoint, "stop"
    os.makedirs(args.output_dir, exist_ok=True)
    first.train_one_epoch(0, *first._log_files())
    first.save(1)
    del first
    main(TINY + ["--data_path", "synthetic:16", "--output_dir", str(split)] + common)

    a, b = read_jsonl(straight / "steps.jsonl"), read_jsonl(split / "steps.jsonl")
    assert [r["it"] for r in a] == [r["it"] for r in b] == list(range(8))
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=1e-7), ra["it"]
    sa = torch.load(straight / "checkpoint.pth", weights_only=True)
    sb = torch.load(split / "checkpoint.pth", weights_only=True)
    assert sa["epoch"] == sb["epoch"] == 2
    for key in ("student", "teacher", "ibot_loss"):
        for k in sa[key]:
            torch.testing.assert_close(sa[key][k], sb[key][k], rtol=1e-6, atol=1e-7,
                                       msg=f"{key}.{k}")


@pytest.mark.slow
@pytest.mark.parametrize("config, step", [(TINY, "reference"), (SWIN_TINY, "fast")],
                         ids=["vit-reference", "swin-fast"])
def test_two_process_gloo_equals_one_process(tmp_path, config, step):
    """``step`` on 2 gloo processes x 2 images against the reference step in one process with
    4 images: same epoch losses, same weights, same centres. ViT runs the reference step (its
    fast step under DDP: tests/test_fast_step.py); Swin the default fast step (its unpacked
    route under the fast step's own DDP wrapper), which is also the reference step's result.
    Crops and masks are a function of (seed, epoch, image index), so the ranks see the very
    images the single process sees; drop path is off (its draws are per process). In fp64:
    in fp32 the different gradient reduction order is last-bit noise that Adam amplifies on
    the attention key bias (its true gradient is exactly zero), see the train-step test."""
    torchrun_tiny(2, tmp_path / "two", 2, tmp_path, "--step", step, config=config)
    torchrun_tiny(1, tmp_path / "one", 4, tmp_path, "--step", "reference", config=config)
    la, lb = read_jsonl(tmp_path / "two" / "log.txt"), read_jsonl(tmp_path / "one" / "log.txt")
    for ra, rb in zip(la, lb):
        for key in ("train_loss", "train_cls", "train_patch"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-9), key
    assert_same_weights(tmp_path / "two" / "checkpoint.pth", tmp_path / "one" / "checkpoint.pth")


# ------------------------------------------------------------------ artefacts, errors
def test_run_leaves_checkpoint_logs_and_curve(tmp_path, capsys):
    main(TINY + ["--data_path", "synthetic:16", "--output_dir", str(tmp_path),
                 "--epochs", "2", "--saveckp_freq", "1"])
    # the start-up line says what runs, args.json holds the values as resolved
    out = capsys.readouterr().out
    recorded = json.loads((tmp_path / "args.json").read_text())
    for name in ("step", "precision", "attn_backend", "loss_backend", "data_backend",
                 "mask_backend", "num_workers", "threads"):
        assert recorded[name] not in ("auto", None), name
    line = next(ln for ln in out.splitlines() if "step fast on cpu" in ln)
    for word in ("precision fp32", "attention sdpa", "loss torch", "data torch (0 workers)",
                 f"masks {recorded['mask_backend']}", "1 thread(s)"):
        assert word in line, (word, line)
    for name in ("checkpoint.pth", "checkpoint0001.pth", "checkpoint0002.pth", "log.txt",
                 "steps.jsonl", "loss_curve.png", "args.json"):
        assert (tmp_path / name).is_file(), name
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert set(state) >= {"student", "teacher", "optimizer", "epoch", "args", "ibot_loss"}
    assert set(state["ibot_loss"]) == {"center", "center2"}
    epochs = read_jsonl(tmp_path / "log.txt")
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert all(math.isfinite(e["train_loss"]) for e in epochs)
    # nothing to do: a finished run resumes at its last epoch and trains no further
    main(TINY + ["--data_path", "synthetic:16", "--output_dir", str(tmp_path), "--epochs", "2"])
    assert len(read_jsonl(tmp_path / "log.txt")) == 2


def test_nonfinite_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    main(TINY + ["--data_path", "synthetic:16", "--output_dir", str(tmp_path), "--epochs", "2"])
    good = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    args = tiny_args(tmp_path, "--epochs", "3")
    tr = Trainer(args)
    # the default (fast) step calls forward_selected, the reference step forward
    for name in ("forward", "forward_selected"):
        real = getattr(tr.ibot_loss, name)

        def poisoned(*a, _real=real, **k):
            out = _real(*a, **k)
            out["loss"] = out["loss"] * float("nan")
            return out

        monkeypatch.setattr(tr.ibot_loss, name, poisoned)
    with pytest.raises(SystemExit) as exc:
        tr.train()
    assert "loss is nan" in str(exc.value) and "checkpoint.pth" in str(exc.value)
    after = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert after["epoch"] == good["epoch"] == 2
    assert exc.value.code == 3  # EXIT_NONFINITE
    assert not list(tmp_path.glob("*nonfinite*"))  # a non-finite state is never written


def test_img_s_and_eta_from_the_first_step(tmp_path, monkeypatch):
    """The progress bar shows img/s and the run's ETA from step 1 (host clock, no sync), not
    only at the first --log_freq line; steps.jsonl records the ETA."""
    import tqdm
    seen = []

    class Bar(tqdm.tqdm):
        def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
            seen.append((self.n, dict(ordered_dict or {}, **kwargs)))
            super().set_postfix(ordered_dict, refresh, **kwargs)

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    tr = Trainer(tiny_args(tmp_path, "--progress", "true", "--log_freq", "10", "--epochs", "2"))
    os.makedirs(tmp_path, exist_ok=True)
    tr.train_one_epoch(0, *tr._log_files())
    n, first = seen[0]
    assert n == 1 and float(first["img_s"]) > 0
    assert re.fullmatch(r"\d+:\d\d:\d\d", first["eta"])
    recs = read_jsonl(tmp_path / "steps.jsonl")
    assert len(recs) == 1 and recs[0]["eta_s"] > 0  # one log line (step 4 of 4), epoch 1 left
