"""Weighted k-NN evaluation: the vote by hand, the CLI on a checkpoint, and the demo end to end."""
from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F

from ibot_fast.eval.knn import knn_classify, knn_table
from ibot_fast.eval.knn import main as knn_main
from ibot_fast.train import main as train_main
from helpers import write_image_folder


def test_weighted_vote_by_hand():
    # memory: 3 vectors of class 0 close to the query's direction... but 2 of class 1 closer
    train = F.normalize(torch.tensor([[1.0, 0.30], [1.0, 0.35], [1.0, 0.40],
                                      [1.0, 0.05], [1.0, 0.02]]), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1])
    q = F.normalize(torch.tensor([[1.0, 0.0]]), dim=1)
    sims = (q @ train.T)[0]
    w = (sims / 0.07).exp()
    # k=5: class 1 wins when its two exp-weights outweigh class 0's three
    want = 1 if w[3:].sum() > w[:3].sum() else 0
    top1, top5 = knn_classify(train, labels, q, torch.tensor([want]), k=5, num_classes=2)
    assert top1 == 100.0 and top5 == 100.0
    # k=1: nearest neighbour only (class 1)
    assert knn_classify(train, labels, q, torch.tensor([1]), k=1, num_classes=2)[0] == 100.0
    assert knn_classify(train, labels, q, torch.tensor([0]), k=1, num_classes=2)[0] == 0.0


def test_separable_clusters_and_k_larger_than_memory():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    lab = torch.arange(200) % 4
    feats = F.normalize(centres[lab] + 0.05 * torch.randn(200, 16, generator=g), dim=1)
    res = knn_table(feats[:150], lab[:150], feats[150:], lab[150:], ks=(10, 200))
    assert res[10]["top1"] == 100.0
    assert res[200]["top1"] == 100.0  # k is clipped to the memory size (150)


def test_cli_on_a_checkpoint(tmp_path, capsys):
    from helpers import TINY

    write_image_folder(tmp_path / "train")
    write_image_folder(tmp_path / "val", n_per_class=2)
    train_main(TINY + ["--data_path", str(tmp_path / "train"), "--output_dir",
                       str(tmp_path / "run"), "--epochs", "1", "--batch_size_per_gpu", "2"])
    out = tmp_path / "knn.json"
    res = knn_main(["--checkpoint", str(tmp_path / "run" / "checkpoint.pth"), "--train_path",
                    str(tmp_path / "train"), "--val_path", str(tmp_path / "val"),
                    "--random_init", "--k", "1", "5", "--output", str(out)])
    assert set(res) == {"teacher (epoch 1)", "random init"}
    assert json.loads(out.read_text())["random init"]["1"]["top1"] >= 0
    assert "k-NN top-1" in capsys.readouterr().out
    # pure-colour classes are trivially separable for any network
    assert res["teacher (epoch 1)"][1]["top1"] == 100.0


@pytest.fixture(scope="module")
def full_demo(tmp_path_factory):
    """`make demo`'s job (``--preset demo``, in full), run once for the tests below: its output
    directory and what it printed."""
    out = tmp_path_factory.mktemp("full_demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train_main(["--preset", "demo", "--output_dir", str(out), "--progress", "false"])
    return out, printed.getvalue()


@pytest.mark.slow
def test_demo_preset_end_to_end(full_demo):
    """The README's main job: MNIST folder, training, checkpoint, curve and the k-NN table of
    the teacher next to the random init."""
    out, printed = full_demo
    for name in ("checkpoint.pth", "log.txt", "loss_curve.png", "knn.json"):
        assert (out / name).is_file(), name
    res = json.loads((out / "knn.json").read_text())["results"]
    assert set(res) == {"teacher (trained)", "random init"}
    for name in res:
        for k in ("10", "20", "100", "200"):
            assert 10.0 < res[name][k]["top1"] <= 100.0  # better than chance on 10 digits
            assert math.isfinite(res[name][k]["top5"])
    assert "random init" in printed


# What "the demo learns" means, checked on the logs a demo run leaves (log.txt: one line per
# epoch; steps.jsonl: every --log_freq steps; knn.jsonl: the teacher's k-NN after every epoch).
# Epoch means, not single steps: a step's loss moves by ~1 with the masking ratio drawn for it.
LOSS_NOISE = 0.05      # an epoch mean may exceed the previous one by this much in the last half
CLS_MARGIN = 0.5       # the last epoch's mean [CLS] loss stays this far below ln K ...
CLS_AT_LNK = 0.05      # ... and no record of it comes this close to ln K
# Why a mean and a band: a record is one step's loss, which moves by ±0.5 with the crops and
# masks of that step (measured on the demo: records 5.0-5.6 around an epoch mean of 5.1), while
# a collapsed head sits flat at ln K (records 6.236-6.240).


def _jsonl(path):
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def demo_learning_failures(epochs: list[dict], steps: list[dict], knn: list[dict],
                           out_dim: int) -> list[str]:
    """What is wrong with a demo run's curves ([] when nothing is): the mean loss of the last
    epoch is not below the first's; an epoch of the last half is above the one before it by
    more than LOSS_NOISE; the mean [CLS] loss of the last epoch's records is within
    CLS_MARGIN of ln K, or one of them within CLS_AT_LNK (the head's outputs uniform, the
    collapse); the teacher's k-NN top-1 (k = 20) of the last epoch is not above that of the
    first."""
    bad = []
    loss = [e["train_loss"] for e in sorted(epochs, key=lambda e: e["epoch"])]
    if not loss[-1] < loss[0]:
        bad.append(f"last epoch's mean loss {loss[-1]:.3f} is not below the first's "
                   f"{loss[0]:.3f}")
    for e in range(max(1, len(loss) // 2), len(loss)):
        if loss[e] > loss[e - 1] + LOSS_NOISE:
            bad.append(f"epoch {e}'s mean loss {loss[e]:.3f} rose above epoch {e - 1}'s "
                       f"{loss[e - 1]:.3f}")
    last = max(r["epoch"] for r in steps)
    cls = [r["cls"] for r in steps if r["epoch"] == last]
    ln_k = math.log(out_dim)
    if sum(cls) / len(cls) > ln_k - CLS_MARGIN:
        bad.append(f"mean [CLS] loss {sum(cls) / len(cls):.3f} of the last epoch is within "
                   f"{CLS_MARGIN} of ln K = {ln_k:.3f} (uniform head outputs)")
    if max(cls) > ln_k - CLS_AT_LNK:
        bad.append(f"[CLS] loss {max(cls):.3f} in the last epoch is at ln K = {ln_k:.3f} "
                   f"(uniform head outputs)")
    top1 = [r["knn"]["20"]["top1"] for r in sorted(knn, key=lambda r: r["epoch"])]
    if not top1[-1] > top1[0]:
        bad.append(f"teacher k-NN top-1 (k=20) did not improve: {top1[0]} after the first "
                   f"epoch, {top1[-1]} after the last")
    return bad


def test_demo_criteria_reject_the_collapsed_curve():
    """The criteria on the shape of a collapsed demo (the [CLS] loss back at ln K = 6.24 and
    the total loss rising over the last epochs), on a healthy one, and on each rule alone."""
    def epochs(losses):
        return [{"epoch": e, "train_loss": v} for e, v in enumerate(losses)]

    def steps(cls_last):
        return [{"epoch": 0, "cls": 6.0}, {"epoch": 4, "cls": 4.0}, {"epoch": 4, "cls": cls_last}]

    knn = lambda *top1: [{"epoch": e, "knn": {"20": {"top1": v}}}  # noqa: E731
                         for e, v in enumerate(top1)]
    collapsed = demo_learning_failures(epochs([9.05, 8.46, 8.72, 8.9, 9.3]), steps(6.24),
                                       knn(49.0, 51.5, 55.9, 57.0, 59.7), 512)
    assert len(collapsed) == 5 and "ln K" in collapsed[-1], collapsed  # 1 + 3 rises + ln K
    healthy = (epochs([9.0, 8.0, 7.5, 7.2, 7.1]), steps(4.5), knn(50.0, 60.0, 70.0, 72.0, 75.0))
    assert demo_learning_failures(*healthy, 512) == []
    # within the noise allowance a flat end passes; a real rise does not
    assert demo_learning_failures(epochs([9.0, 8.0, 7.5, 7.54, 7.5]), *healthy[1:], 512) == []
    assert len(demo_learning_failures(epochs([9.0, 8.0, 7.5, 7.7, 7.5]), *healthy[1:], 512)) == 1
    assert len(demo_learning_failures(healthy[0], healthy[1], knn(60.0, 55.0), 512)) == 1
    # the two [CLS] rules alone: a last epoch flat at ln K breaks both; a mean too close to
    # ln K breaks one (records 5.8 and 6.0); one record at ln K breaks the other (mean 5.12)
    flat = [{"epoch": 0, "cls": 6.0}] + [{"epoch": 4, "cls": 6.238}] * 3
    near = [{"epoch": 0, "cls": 6.0}, {"epoch": 4, "cls": 5.8}, {"epoch": 4, "cls": 6.0}]
    assert len(demo_learning_failures(healthy[0], flat, healthy[2], 512)) == 2
    assert "mean [CLS]" in demo_learning_failures(healthy[0], near, healthy[2], 512)[0]
    assert len(demo_learning_failures(healthy[0], steps(6.23), healthy[2], 512)) == 1


@pytest.mark.slow
def test_full_demo_learns_and_beats_random_init(full_demo):
    """The README's acceptance claims, run in full (`make demo`'s job, a few minutes on 2
    idle cores): the loss goes down and stays down, the [CLS] term is off ln K in the last epoch,
    the teacher's k-NN improves over the epochs (evaluated after every one), and at the end
    the teacher's k-NN top-1 is above the random-init network's at every k."""
    from ibot_fast.config import PRESETS

    out, _ = full_demo
    res = json.loads((out / "knn.json").read_text())["results"]
    for k in ("10", "20", "100", "200"):
        assert res["teacher (trained)"][k]["top1"] > res["random init"][k]["top1"], (k, res)
    assert len(_jsonl(out / "knn.jsonl")) == PRESETS["demo"]["epochs"]
    failures = demo_learning_failures(_jsonl(out / "log.txt"), _jsonl(out / "steps.jsonl"),
                                      _jsonl(out / "knn.jsonl"), PRESETS["demo"]["out_dim"])
    assert failures == [], failures
