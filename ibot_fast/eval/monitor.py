"""What the trainer watches between epochs: periodic k-NN + NMI/ARI, and TensorBoard scalars.

* ``--knn_every N``: after every N-th epoch, the teacher's weighted k-NN table on the labelled
  k-NN folders (``--knn_train_path`` memory, ``--knn_val_path`` queries) and the NMI/ARI of the
  teacher head's [CLS] argmax against the query labels (the reference logs these per epoch on
  the training set; here on the held-out split). One JSON line per evaluation goes to
  ``output_dir/knn.jsonl`` (``{"epoch", "knn": {k: {top1, top5}}, "nmi", "ari"}``). Rank 0
  evaluates while the other ranks wait at a barrier.
* ``--tensorboard true``: the step records of ``steps.jsonl`` (loss terms, lr, wd, img/s) plus
  the teacher temperatures, the epoch averages and the evaluations as scalars in
  ``output_dir/tf_logs`` (the reference's directory). TensorBoard is imported only then; when
  it is not installed the run goes on without it and says so once.

On resume, records of epochs that will be re-run are dropped from ``knn.jsonl``, as the trainer
does for its own logs.
"""
from __future__ import annotations

import json
import os

import torch.distributed as dist

from ibot_fast.dist import is_distributed


def _log(msg: str):
    print(f"[ibot_fast] {msg}", flush=True)


class TrainingMonitor:
    def __init__(self, trainer):
        self.trainer = trainer
        args = trainer.args
        self.is_main = trainer.info.is_main
        self.every = args.knn_every
        self.knn_path = os.path.join(args.output_dir, "knn.jsonl")
        self.steps_path = os.path.join(args.output_dir, "steps.jsonl")
        self._loaders = None
        self._steps_offset = 0
        self.writer = None
        if self.every and not (trainer.knn_train_dir and trainer.knn_val_dir):
            if self.is_main:
                _log(f"--knn_every {self.every}: periodic k-NN skipped, no labelled k-NN data; "
                     "give --knn_val_path (and --knn_train_path unless --data_path is the "
                     "labelled training folder)")
            self.every = 0
        if args.tensorboard and self.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                _log(f"--tensorboard true: TensorBoard scalars skipped, it cannot be imported "
                     f"({err}); pip install tensorboard to get them")
            else:
                self.writer = SummaryWriter(log_dir=os.path.join(args.output_dir, "tf_logs"))

    # ------------------------------------------------------------------------------------
    def start(self, start_epoch: int):
        """Call once before the first epoch (after resuming)."""
        if not self.is_main:
            return
        if os.path.isfile(self.knn_path):
            with open(self.knn_path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln)["epoch"] < start_epoch]
            with open(self.knn_path, "w") as f:
                f.writelines(keep)
        # TensorBoard gets the step records written from now on
        self._steps_offset = os.path.getsize(self.steps_path) \
            if os.path.isfile(self.steps_path) else 0

    def epoch_end(self, epoch: int, stats: dict | None = None) -> dict | None:
        """Call after each epoch (all ranks); returns the evaluation record, if one ran."""
        record = None
        if self.every and (epoch + 1) % self.every == 0:
            if self.is_main:
                record = self.evaluate(epoch)
            if is_distributed():
                dist.barrier()
        if self.writer is not None:
            self._write_scalars(epoch, stats, record)
        return record

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # ------------------------------------------------------------------------------------
    def evaluate(self, epoch: int) -> dict:
        from ibot_fast.eval.knn import _loaders, evaluate_teacher

        tr = self.trainer
        if self._loaders is None:
            self._loaders = _loaders(tr.knn_train_dir, tr.knn_val_dir,
                                     tr.args.global_crops_size,
                                     num_workers=tr.args.num_workers)
        teacher = tr.teacher
        was_training = teacher.training
        res = evaluate_teacher(teacher.backbone, teacher.head, *self._loaders, tr.device)
        teacher.train(was_training)
        record = {"epoch": epoch, **res}
        with open(self.knn_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        k = 20 if 20 in res["knn"] else next(iter(res["knn"]))
        _log(f"epoch {epoch}: teacher k-NN (k={k}) top-1 {res['knn'][k]['top1']:.2f}%, "
             f"NMI {res['nmi']:.4f}, ARI {res['ari']:.4f}")
        return record

    def _write_scalars(self, epoch: int, stats: dict | None, record: dict | None):
        w, tr = self.writer, self.trainer
        if os.path.isfile(self.steps_path):
            with open(self.steps_path) as f:
                f.seek(self._steps_offset)
                lines = f.readlines()
                self._steps_offset = f.tell()
            for ln in lines:
                if not ln.strip():
                    continue
                r = json.loads(ln)
                for key in ("loss", "cls", "patch", "acc", "lr", "wd", "img_s"):
                    if key in r:
                        w.add_scalar(f"step/{key}", r[key], r["it"])
        t_cls, t_patch = tr.ibot_loss.temperatures(epoch)
        w.add_scalar("epoch/teacher_temp", t_cls, epoch)
        w.add_scalar("epoch/teacher_patch_temp", t_patch, epoch)
        for key, value in (stats or {}).items():
            if key != "epoch":
                w.add_scalar(f"epoch/{key}", value, epoch)
        if record is not None:
            for k, r in record["knn"].items():
                w.add_scalar(f"knn/top1_k{k}", r["top1"], epoch)
            w.add_scalar("knn/nmi", record["nmi"], epoch)
            w.add_scalar("knn/ari", record["ari"], epoch)
        w.flush()
