"""Checkpoints that travel: a checkpoint with the reference's exact layout (bytedance/ibot
``main_ibot.py`` save_dict, re-created below from a tiny model) loads, evaluates, resumes and
exports; exported timm-named weights load strictly into a ViT written with timm's module names."""
from __future__ import annotations

import argparse
import json
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ibot_fast import convert
from ibot_fast.config import parse_args
from ibot_fast.models import build_vit
from ibot_fast.models.vit import VisionTransformer

# the tiny model of tests/test_train.py (TINY): vit_tiny/8 on 16-px crops, K = 64, head 32/16
ARCH, PATCH, IMG, K, HIDDEN, BOTTLENECK = "vit_tiny", 8, 16, 64, 32, 16


# ------------------------------------------------------------ the reference's checkpoint layout
class RefHead(nn.Module):
    """The module layout of the reference's ``iBOTHead`` (models/head.py, no norm in the head):
    ``mlp`` = Linear, GELU, Linear, GELU, Linear; bias-free last layer(s) weight-normalised by
    torch's own weight_norm (legacy -> weight_g/weight_v, parametrised ->
    parametrizations.weight.original0/1), g filled with 1 and frozen with norm_last_layer."""

    def __init__(self, in_dim, out_dim, shared_head, parametrized, norm_last_layer=True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN),
                                 nn.GELU(), nn.Linear(HIDDEN, BOTTLENECK))

        def last():
            lin = nn.Linear(BOTTLENECK, out_dim, bias=False)
            if parametrized:
                lin = nn.utils.parametrizations.weight_norm(lin)
                g = lin.parametrizations.weight.original0
            else:
                with pytest.warns(FutureWarning):  # deprecated, but what the reference calls
                    lin = nn.utils.weight_norm(lin)
                g = lin.weight_g
            g.data.fill_(1)
            g.requires_grad = not norm_last_layer
            return lin

        self.last_layer = last()
        self.last_layer2 = self.last_layer if shared_head else last()

    def forward(self, x):
        z = F.normalize(self.mlp(x), dim=-1)
        if x.ndim == 2:
            return self.last_layer(z)
        return self.last_layer(z[:, 0]), self.last_layer2(z[:, 1:])


class RefWrapper(nn.Module):  # utils.MultiCropWrapper: attributes `backbone` and `head`
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head


class FakeDDP(nn.Module):
    """What DistributedDataParallel adds to a state dict: the `module.` attribute."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def ref_params_groups(model):  # utils.get_params_groups, transcribed
    reg, no_reg = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_reg if name.endswith(".bias") or len(p.shape) == 1 else reg).append(p)
    return [{"params": reg}, {"params": no_reg, "weight_decay": 0.0}]


def reference_args(**over) -> argparse.Namespace:
    """main_ibot.py's get_args_parser defaults (+ what init_distributed_mode adds), tiny run.
    ``patch_out_dim`` describes the fake checkpoint's weights (RefHead's patch layer has K
    outputs): a resume compares the model flags with the run's."""
    d = dict(arch=ARCH, patch_size=PATCH, window_size=7, out_dim=K, patch_out_dim=K,
             shared_head=False, shared_head_teacher=True, norm_last_layer=True,
             momentum_teacher=0.996, norm_in_head=None, act_in_head="gelu",
             use_masked_im_modeling=True, pred_ratio=0.3, pred_ratio_var=0, pred_shape="block",
             pred_start_epoch=0, lambda1=1.0, lambda2=1.0, warmup_teacher_temp=0.04,
             teacher_temp=0.04, warmup_teacher_patch_temp=0.04, teacher_patch_temp=0.07,
             warmup_teacher_temp_epochs=1, use_fp16=True, weight_decay=0.04,
             weight_decay_end=0.4, clip_grad=3.0, batch_size_per_gpu=4, epochs=2,
             freeze_last_layer=1, lr=0.0005, warmup_epochs=1, min_lr=1e-6, optimizer="adamw",
             load_from=None, drop_path=0.1, global_crops_number=2,
             global_crops_scale=(0.14, 1.0), local_crops_number=2, local_crops_scale=(0.05, 0.4),
             data_path="/path/to/imagenet/train/", output_dir=".", saveckp_freq=40, seed=0,
             num_workers=10, dist_url="env://", local_rank=0, rank=0, world_size=1, gpu=0)
    d.update(over)
    return argparse.Namespace(**d)


def make_reference_checkpoint(path, parametrized=False, use_fp16=True, epoch=1, seed=0):
    """Write a checkpoint with the reference's structure; returns (student, teacher) modules
    (RefWrapper, the student's DDP wrapper removed) for comparisons."""
    torch.manual_seed(seed)
    student = RefWrapper(VisionTransformer(IMG, PATCH, embed_dim=192, depth=12, num_heads=3,
                                           drop_path_rate=0.1, masked_im_modeling=True),
                         RefHead(192, K, shared_head=False, parametrized=parametrized))
    teacher = RefWrapper(VisionTransformer(IMG, PATCH, embed_dim=192, depth=12, num_heads=3),
                         RefHead(192, K, shared_head=True, parametrized=parametrized))
    ddp = FakeDDP(student)
    teacher.load_state_dict(ddp.module.state_dict(), strict=False)
    for p in teacher.parameters():
        p.requires_grad = False
    # one AdamW step so the optimiser has moments, as after an epoch of training
    opt = torch.optim.AdamW(ref_params_groups(ddp), lr=1e-3)
    x = torch.randn(2, 3, IMG, IMG)
    out = ddp.module.head(ddp.module.backbone(x, mask=torch.zeros(2, 2, 2, dtype=torch.bool)))
    (out[0].square().mean() + out[1].square().mean()).backward()
    opt.step()
    with torch.no_grad():  # an EMA-like teacher that differs from the student
        for pt in teacher.parameters():
            pt.add_(0.01 * torch.randn_like(pt))
    opt_sd = opt.state_dict()
    # torch 1.7 (the reference's) wrote integer steps and knew none of the newer group keys
    for s in opt_sd["state"].values():
        s["step"] = int(s["step"])
    opt_sd["param_groups"] = [{k: g[k] for k in ("lr", "betas", "eps", "weight_decay",
                                                 "amsgrad", "params")}
                              for g in opt_sd["param_groups"]]
    save_dict = {
        "student": ddp.state_dict(),
        "teacher": teacher.state_dict(),
        "optimizer": opt_sd,
        "epoch": epoch,
        "args": reference_args(use_fp16=use_fp16),
        "ibot_loss": {"center": torch.randn(1, K), "center2": torch.randn(1, 1, K)},
    }
    if use_fp16:
        save_dict["fp16_scaler"] = {"scale": 65536.0, "growth_factor": 2.0,
                                    "backoff_factor": 0.5, "growth_interval": 2000,
                                    "_growth_tracker": 0}
    torch.save(save_dict, path)
    return student, teacher


@pytest.fixture(scope="module", params=["weight_g/weight_v", "parametrizations"])
def ref_ckpt(request, tmp_path_factory):
    """(path, student, teacher, parametrized); read-only for the tests."""
    parametrized = request.param == "parametrizations"
    path = tmp_path_factory.mktemp("ref") / "ref_checkpoint.pth"
    student, teacher = make_reference_checkpoint(path, parametrized=parametrized,
                                                 use_fp16=not parametrized)
    return path, student, teacher, parametrized


# ------------------------------------------------------------------------------- loading
def test_layout_of_the_recreated_checkpoint(ref_ckpt):
    """The file really has the reference's quirks (else the tests below prove nothing)."""
    path, *_, parametrized = ref_ckpt
    with pytest.raises(pickle.UnpicklingError):  # the pickled Namespace
        torch.load(path, weights_only=True)
    raw = torch.load(path, weights_only=False)
    assert isinstance(raw["args"], argparse.Namespace)
    assert all(k.startswith(("module.backbone.", "module.head.")) for k in raw["student"])
    assert all(k.startswith(("backbone.", "head.")) for k in raw["teacher"])
    g = ("head.last_layer.parametrizations.weight.original0" if parametrized
         else "head.last_layer.weight_g")
    assert g in raw["teacher"] and g.replace("last_layer", "last_layer2") in raw["teacher"]
    assert "module.backbone.masked_embed" in raw["student"]
    assert isinstance(next(iter(raw["optimizer"]["state"].values()))["step"], int)
    assert convert.is_reference_layout(raw)


def test_load_and_convert_to_ibot_fast_layout(ref_ckpt):
    path, student, teacher, _ = ref_ckpt
    state = convert.load_checkpoint_any(str(path))
    out = convert.to_ibot_fast(state)
    from ibot_fast.models import build_ibot_models
    ours_s, ours_t = build_ibot_models(ARCH, PATCH, IMG, K, K, shared_head=False,
                                       head_hidden_dim=HIDDEN, head_bottleneck_dim=BOTTLENECK)
    assert list(out["student"]) == list(ours_s.state_dict())  # same names, same order
    assert list(out["teacher"]) == list(ours_t.state_dict())
    ours_s.load_state_dict(out["student"])
    ours_t.load_state_dict(out["teacher"])
    # same functions: the weight-norm tensors went to the right places
    x = torch.randn(3, 3, IMG, IMG)
    for ours, ref in ((ours_s, student), (ours_t, teacher)):
        ours.eval(), ref.eval()
        with torch.no_grad():
            a = ours.head(ours.backbone(x))
            b = ref.head(ref.backbone(x))
        for u, v in zip(a, b):  # g·v/||v|| in another operation order than torch's
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
    args = out["args"]
    assert isinstance(args, dict) and args["arch"] == ARCH and args["pred_ratio"] == [0.3]
    assert (args["global_crops_size"], args["head_hidden_dim"], args["head_bottleneck_dim"]) \
        == (IMG, HIDDEN, BOTTLENECK)  # hard-coded in the reference: read from the tensors
    assert out["epoch"] == 1 and set(out["ibot_loss"]) == {"center", "center2"}


class Opaque:  # something weights_only cannot unpickle
    def __init__(self, v):
        self.v = v


def test_weights_only_handling(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"student": {}, "teacher": {}, "args": Opaque(3)}, path)
    with pytest.raises(ValueError, match="trust_pickle"):
        convert.load_checkpoint_any(str(path))
    assert convert.load_checkpoint_any(str(path), trust_pickle=True)["args"].v == 3
    with pytest.raises(FileNotFoundError):
        convert.load_checkpoint_any(str(tmp_path / "missing.pth"))


def test_bad_checkpoints_say_what_is_wrong(tmp_path):
    # Swin checkpoints are read (tests/test_swin.py)
    assert convert.reference_args_to_dict(reference_args(arch="swin_tiny"))["arch"] == \
        "swin_tiny"
    with pytest.raises(ValueError, match="not a full iBOT checkpoint"):
        convert.reference_to_ibot_fast({"teacher": {}, "args": reference_args()})
    with pytest.raises(ValueError, match="no 'student' entry"):
        convert.backbone_state_dict({"teacher": {"backbone.cls_token": torch.zeros(1)}},
                                    "student")
    with pytest.raises(ValueError, match="not a ViT backbone"):
        convert.infer_vit_config({"foo": torch.zeros(1)})
    with pytest.raises(ValueError, match="norm_in_head"):
        convert.infer_head_config({"mlp.0.weight": torch.zeros(2, 2),
                                   "mlp.1.running_mean": torch.zeros(2),
                                   "last_layer.weight_v": torch.zeros(2, 2)})


# ------------------------------------------------------------------------------- evaluate
def test_knn_and_cluster_metrics_on_a_reference_checkpoint(ref_ckpt, tmp_path):
    from helpers import write_image_folder

    from ibot_fast.eval.knn import main as knn_main

    path = ref_ckpt[0]
    write_image_folder(tmp_path / "train")
    write_image_folder(tmp_path / "val", n_per_class=2)
    res = knn_main(["--checkpoint", str(path), "--train_path", str(tmp_path / "train"),
                    "--val_path", str(tmp_path / "val"), "--k", "1", "3",
                    "--cluster_metrics"])
    assert res["teacher (epoch 1)"][1]["top1"] == 100.0  # pure-colour classes
    m = res["teacher (epoch 1) clusters"]
    assert 0.0 <= m["nmi"] <= 1.0 and -1.0 <= m["ari"] <= 1.0


# ------------------------------------------------------------------------------- resume
def _tiny_argv(out_dir, *extra):
    from helpers import TINY
    return TINY + ["--data_path", "synthetic:16", "--output_dir", str(out_dir), *extra]


def _check_loaded(tr, student, state_path):
    raw = torch.load(state_path, weights_only=False)
    ref = {k: v for k, v in student.state_dict().items()}
    ours = convert.normalize_keys(tr.student_without_ddp.state_dict())
    for k, v in convert.normalize_keys(ref).items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=0, msg=k)
    # optimiser moments line up with the parameters by position, as in the reference
    params = [p for g in tr.optimizer.param_groups for p in g["params"]]
    names = {id(p): n for n, p in tr.student_without_ddp.named_parameters()}
    ref_named = dict(student.named_parameters())
    ref_order = [n for g in ref_params_groups(student) for n, p in ref_named.items()
                 if any(p is q for q in g["params"])]
    assert [names[id(p)] for p in params] == [
        convert.normalize_keys({n: 0}).popitem()[0] for n in ref_order]
    for i, p in enumerate(params):
        if i in raw["optimizer"]["state"]:
            torch.testing.assert_close(tr.optimizer.state[p]["exp_avg"],
                                       raw["optimizer"]["state"][i]["exp_avg"], rtol=0, atol=0)
    torch.testing.assert_close(tr.ibot_loss.center, raw["ibot_loss"]["center"])


@pytest.mark.slow
def test_resume_pretraining_from_a_reference_checkpoint(tmp_path):
    """--load_from a reference checkpoint: weights, optimiser state, centres and the epoch are
    taken over and training goes on from epoch 1."""
    from ibot_fast.train import Trainer

    ref = tmp_path / "ref.pth"
    student, _ = make_reference_checkpoint(ref, parametrized=False)
    tr = Trainer(parse_args(_tiny_argv(tmp_path / "run", "--epochs", "2", "--load_from",
                                       str(ref))))
    tr.load(str(ref))
    assert tr.start_epoch == 1
    _check_loaded(tr, student, ref)
    tr.train()  # loads --load_from again, then trains epoch 1
    log = [json.loads(ln) for ln in (tmp_path / "run" / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1]
    saved = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert saved["epoch"] == 2 and isinstance(saved["args"], dict)


def test_resume_from_a_parametrized_checkpoint(tmp_path):
    """Parametrised weight-norm names: --load_from converts on the fly (before the checkpoint
    is verified), and the CLI's --to ibot_fast writes a file that loads the same way."""
    from ibot_fast.train import Trainer

    ref, conv = tmp_path / "ref.pth", tmp_path / "converted.pth"
    student, _ = make_reference_checkpoint(ref, parametrized=True, use_fp16=False)
    convert.main([str(ref), str(conv), "--to", "ibot_fast"])
    assert not convert.is_reference_layout(torch.load(conv, weights_only=True))
    tr = Trainer(parse_args(_tiny_argv(tmp_path / "run", "--epochs", "2")))
    for path in (ref, conv):
        tr.start_epoch = 0
        tr.load(str(path))
        assert tr.start_epoch == 1
        _check_loaded(tr, student, ref)


# ------------------------------------------------------------------------------- export
def extract_backbone_weights(ck: dict, key: str, with_head: bool) -> dict:
    """What the reference's extract_backbone_weights.py writes (its behaviour, transcribed)."""
    out = {}
    for k, v in ck[key].items():
        if k.startswith("backbone"):
            out[k[len("backbone."):]] = v
        elif k.startswith("module.backbone"):
            out[k[len("module.backbone."):]] = v
        elif with_head:
            out[k] = v
    return {"state_dict": out}


def test_export_reference_format(ref_ckpt, tmp_path):
    path = ref_ckpt[0]
    raw = torch.load(path, weights_only=False)
    for which, with_head in (("teacher", False), ("student", False), ("teacher", True)):
        out = tmp_path / f"{which}_{with_head}.pth"
        argv = [str(path), str(out), "--to", "reference", "--which", which]
        convert.main(argv + (["--with_head"] if with_head else []))
        got = torch.load(out, weights_only=True)
        want = extract_backbone_weights(raw, which, with_head)
        # same keys (up to the weight-norm names, which the export normalises)
        assert list(got["state_dict"]) == list(convert.normalize_keys(want["state_dict"]))
        for (k, v), w in zip(got["state_dict"].items(), want["state_dict"].values()):
            torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)
    assert "masked_embed" in torch.load(tmp_path / "student_False.pth",
                                        weights_only=True)["state_dict"]


def test_export_backbone_loads_into_build_vit(ref_ckpt, tmp_path):
    path, _, teacher, _ = ref_ckpt
    out = tmp_path / "backbone.pth"
    convert.main([str(path), str(out), "--to", "backbone"])
    sd = torch.load(out, weights_only=True)
    vit = build_vit(ARCH, PATCH, img_size=IMG)
    vit.load_state_dict(sd)  # strict
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), teacher.backbone(x), rtol=0, atol=0)
    # and an exported backbone is itself a checkpoint the tools can open
    _, info = convert.load_backbone(str(out))
    assert (info["arch"], info["patch_size"], info["img_size"]) == (ARCH, PATCH, IMG)


# a ViT written with timm's module names (timm.models.vision_transformer, class-token pooling,
# no layer scale, no register tokens), so the test needs neither timm nor torchvision
class TimmAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class TimmMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(hidden, dim), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class TimmBlock(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TimmAttention(dim, num_heads)
        self.ls1, self.drop_path1 = nn.Identity(), nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TimmMlp(dim, 4 * dim)
        self.ls2, self.drop_path2 = nn.Identity(), nn.Identity()

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class TimmPatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.norm = nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class TimmViT(nn.Module):
    def __init__(self, img_size, patch, dim, depth, num_heads):
        super().__init__()
        self.patch_embed = TimmPatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch) ** 2 + 1, dim))
        self.pos_drop, self.patch_drop, self.norm_pre = nn.Dropout(0.0), nn.Identity(), \
            nn.Identity()
        self.blocks = nn.Sequential(*[TimmBlock(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc_norm, self.head_drop, self.head = nn.Identity(), nn.Dropout(0.0), nn.Identity()

    def forward_features(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(self.norm_pre(self.patch_drop(self.pos_drop(x)))))

    def forward(self, x):
        return self.head(self.head_drop(self.fc_norm(self.forward_features(x)[:, 0])))


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_export_timm_loads_into_a_timm_named_vit(ref_ckpt, tmp_path, which):
    path, student, teacher, _ = ref_ckpt
    out = tmp_path / "timm.pth"
    convert.main([str(path), str(out), "--to", "timm", "--which", which])
    sd = torch.load(out, weights_only=True)
    timm_vit = TimmViT(IMG, PATCH, 192, 12, 3)
    timm_vit.load_state_dict(sd)  # strict: every timm parameter filled, nothing left over
    ref = (teacher if which == "teacher" else student).backbone.eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(timm_vit(x), ref(x, return_all_tokens=False),
                                   rtol=1e-5, atol=1e-5)


def test_round_trip_of_an_ibot_fast_checkpoint(tmp_path):
    """ibot_fast's own checkpoint: exports, and the ibot_fast layout is left as it is."""
    from ibot_fast.train import Trainer

    args = parse_args(_tiny_argv(tmp_path, "--epochs", "1"))
    tr = Trainer(args)
    path = tmp_path / "ours.pth"
    torch.save(tr.state_dict(1), path)
    state = convert.load_checkpoint_any(str(path))
    assert not convert.is_reference_layout(state) and convert.to_ibot_fast(state) is state
    convert.main([str(path), str(tmp_path / "t.pth"), "--to", "timm"])
    timm_vit = TimmViT(IMG, PATCH, 192, 12, 3)
    timm_vit.load_state_dict(torch.load(tmp_path / "t.pth", weights_only=True))
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(timm_vit(x), tr.teacher.backbone(x, return_all_tokens=False),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(SystemExit):
        convert.main([str(path), str(tmp_path / "x.pth"), "--to", "onnx"])


def test_exports_of_a_fast_step_checkpoint_own_their_tensors(tmp_path):
    """--fast_step true keeps the teacher's parameters as views of one flat EMA buffer: the
    exported backbone / timm files hold only their own tensors' bytes (the same size as from
    a default run, within the zip's per-entry overhead), and the full checkpoint written by a
    fast-step run is no larger than a default run's."""
    from ibot_fast.train import Trainer

    sizes = {}
    for fast in ("false", "true"):
        run = tmp_path / f"fast_{fast}"
        tr = Trainer(parse_args(_tiny_argv(run, "--fast_step", fast)))
        tr.save(1)
        if fast == "true":  # the case this test is about: exports of views
            views = [k for k, v in tr.teacher.state_dict().items()
                     if v.untyped_storage().nbytes() > v.numel() * v.element_size()]
            assert views, "the fast step no longer keeps the teacher in a flat buffer"
        del tr
        ck = run / "checkpoint.pth"
        sizes[fast, "checkpoint"] = ck.stat().st_size
        for fmt in ("backbone", "timm"):
            dst = tmp_path / f"{fmt}_{fast}.pth"
            convert.main([str(ck), str(dst), "--to", fmt])
            sd = torch.load(dst, weights_only=True)
            tensor_bytes = sum(v.numel() * v.element_size() for v in sd.values())
            sizes[fast, fmt] = dst.stat().st_size
            # what is not tensor data: zip headers and the pickled key names, ~1 KB a tensor
            assert tensor_bytes <= sizes[fast, fmt] <= tensor_bytes + 1024 * (len(sd) + 8), fmt
    for fmt in ("backbone", "timm"):
        assert abs(sizes["true", fmt] - sizes["false", fmt]) <= 64 * 1024, (fmt, sizes)
    assert sizes["true", "checkpoint"] <= sizes["false", "checkpoint"] * 1.001, sizes
