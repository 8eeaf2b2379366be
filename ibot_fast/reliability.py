"""Surviving faults: preemption signals, non-finite steps, resumable data position, RNG states.

* ``PreemptionHandler``: SIGTERM / SIGUSR1 (what SLURM, Kubernetes and torchrun send before a
  kill) and SIGINT (Ctrl-C) only set a flag; the trainer finishes the step it is in, agrees
  with the other ranks at the next sync point, writes a checkpoint with the exact mid-epoch
  position and exits with ``EXIT_PREEMPTED`` (75, EX_TEMPFAIL: "try again"; 130 for SIGINT, as
  a shell reports Ctrl-C), so a wrapper can tell "requeue me" from a crash (1) or a non-finite
  stop (``EXIT_NONFINITE``, 3). A second SIGINT stops at once (``KeyboardInterrupt``). Loader
  workers ignore these signals (``ignore_stop_signals``): a signal to the whole process group
  (a terminal, SLURM) reaches the main process, which owns them, and does not kill a worker.
* ``OutputDirLock``: one trainer per ``--output_dir`` (``fcntl.flock`` on ``.lock``).
* ``NonFiniteMonitor``: every step records on the device whether the loss and the gradients were
  finite (no host sync). ``--on_nan stop`` reads the record at the logging sync, all ranks at
  once; ``--on_nan skip`` has to know before the optimiser step (torch's AdamW keeps its step
  counter on the host), so it reads one all-reduced flag per step, and only that policy pays it.
* ``ResumableDistributedSampler``: ``DistributedSampler`` that can start an epoch at a global
  sample position, which is what a mid-epoch checkpoint stores (valid for any world size).
* ``rng_state`` / ``set_rng_state``: the host RNGs a step draws from (torch CPU/CUDA, Python,
  numpy), stored per rank in mid-epoch checkpoints, in a form ``torch.load(weights_only=True)``
  accepts.
"""
from __future__ import annotations

import fcntl
import math
import os
import random
import signal
import socket
import threading

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

EXIT_PREEMPTED = 75  # EX_TEMPFAIL from sysexits.h: the job was fine, run it again to continue
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for Ctrl-C
EXIT_USAGE = 2  # as argparse: the command line (or what it points at) is wrong

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

# ``--on_nan skip``: an epoch in which more than this share of the steps were skipped stops the
# run (exit 3) instead of saving it: such a run is not learning, whatever its exit code says.
MAX_SKIPPED_SHARE = 0.5


def exit_code_for(signum: int | None) -> int:
    return EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_PREEMPTED


class TrainingStopped(SystemExit):
    """A deliberate stop with a distinct exit code; ``str()`` is the message for people."""

    def __init__(self, code: int, message: str):
        super().__init__(code)
        self.message = message

    def __str__(self):
        return self.message


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


# ---------------------------------------------------------------------------------- preemption
class PreemptionHandler:
    """Context manager: while active, SIGTERM/SIGUSR1/SIGINT set ``signum`` instead of killing
    us. Re-entrant (``main`` holds it for the whole run, ``Trainer.train`` again).

    ``immediate``: a callable run from the handler instead of setting the flag, for phases that
    have nothing to save (after the last epoch); it may raise to stop at once. A second SIGINT
    raises ``KeyboardInterrupt`` (Ctrl-C twice: stop now).
    """

    def __init__(self, signals=PREEMPTION_SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        self.immediate = None
        self._previous: dict = {}
        self._depth = 0

    def _handle(self, signum, frame):
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        if self.immediate is not None:
            self.immediate()
            return
        name = signal.Signals(signum).name
        print(f"[ibot_fast] {name} received: finishing the current step, then writing a "
              f"checkpoint and exiting with code {exit_code_for(signum)}"
              + (" (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""),
              flush=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.signum)

    def __enter__(self):
        self._depth += 1
        # Signal handlers can only be installed from the main thread (tests may use others).
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for sig, prev in self._previous.items():
                signal.signal(sig, prev)
            self._previous.clear()
        return False


def ignore_stop_signals() -> None:
    """In a loader worker: SIGTERM/SIGUSR1/SIGINT are the main process's business (it finishes
    the step, saves and shuts the workers down); a worker killed by a group-wide signal would
    turn a preemption into a crash."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


_reaper_installed = False


def kill_loader_workers_at_exit() -> None:
    """In the main process, once per process: at interpreter exit, SIGKILL the daemonic
    children still alive (persistent loader workers of a trainer that was never torn down).

    multiprocessing's own exit hook stops daemonic children with SIGTERM and then joins them;
    loader workers ignore SIGTERM (:func:`ignore_stop_signals`), so without this the process
    would wait for them forever. atexit runs hooks last-registered-first, so this one runs
    before multiprocessing's.
    """
    global _reaper_installed
    if _reaper_installed:
        return
    import atexit
    import multiprocessing

    def _kill_daemonic_children():
        for child in multiprocessing.active_children():
            if child.daemon:
                child.kill()
                child.join(timeout=5)

    atexit.register(_kill_daemonic_children)
    _reaper_installed = True


# ------------------------------------------------------------------------------------ lock
class OutputDirLock:
    """An exclusive ``fcntl.flock`` on ``<output_dir>/.lock`` for the whole run (rank 0).

    The file holds the holder's pid and host. A second trainer on the directory gets
    ``TrainingStopped(EXIT_USAGE)`` naming them. The kernel drops the lock when its process
    dies, so a file left by a dead trainer (lock free, content still there) is taken over with
    a message. The file is never deleted: deleting it could let two trainers lock two
    different files of the same name.
    """

    NAME = ".lock"

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, self.NAME)
        self._f = None

    def acquire(self, log=print) -> "OutputDirLock":
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown pid and host"
            f.close()
            raise TrainingStopped(EXIT_USAGE, (
                f"another trainer ({holder}) is running on --output_dir "
                f"{os.path.dirname(self.path)!r} (it holds {self.path}). Two trainers would "
                f"overwrite each other's checkpoints and logs: wait for it to finish, stop it, "
                f"or choose another --output_dir."))
        f.seek(0)
        previous = f.read().strip()
        if previous:
            log(f"taking over the lock {self.path} left by {previous}: that process is gone "
                f"(its lock was released)")
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        f.flush()
        self._f = f
        return self

    def release(self) -> None:
        if self._f is None:
            return
        try:
            self._f.seek(0)
            self._f.truncate()  # an empty file: a clean exit, nothing to take over
            self._f.flush()
            fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
        finally:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


# ------------------------------------------------------------------------------- non-finite
class NonFiniteMonitor:
    """Device-side record of the first non-finite step of this rank in the current window.

    ``record`` costs a few scalar kernels and never waits for the device. ``first_it`` is +inf
    until a step has a non-finite loss or gradient norm; ``terms`` then holds that step's
    (loss, cls, patch, gradients finite).
    """

    def __init__(self, device: torch.device, rank: int = 0, world_size: int = 1):
        self.device, self.rank, self.world_size = device, rank, world_size
        self.reset()

    def reset(self):
        self.first_it = torch.full((), math.inf, dtype=torch.float64, device=self.device)
        self.terms = torch.zeros(4, dtype=torch.float64, device=self.device)

    @staticmethod
    @torch.no_grad()
    def grads_finite(params, norms: torch.Tensor | None = None) -> torch.Tensor | None:
        """True (device bool) when every gradient is finite; reuses clipping's norms if given."""
        if norms is None:
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                return None
            norms = torch.stack(torch._foreach_norm(grads))
        return torch.isfinite(norms).all()

    @torch.no_grad()
    def record(self, it: int, terms: dict, grads_ok: torch.Tensor | None) -> torch.Tensor:
        """Returns this rank's [loss non-finite, gradients non-finite] (device, no sync)."""
        loss = terms["loss"].detach()
        ok = torch.isfinite(loss)
        g = torch.ones((), dtype=torch.bool, device=loss.device) if grads_ok is None else grads_ok
        bad = ~(ok & g)
        new = bad & torch.isinf(self.first_it)
        self.first_it = torch.where(new, torch.full_like(self.first_it, it), self.first_it)
        vals = torch.stack([loss.double(), terms["cls"].detach().double(),
                            terms["patch"].detach().double(), g.double()])
        self.terms = torch.where(new, vals, self.terms)
        return torch.stack([~ok, ~g])

    def global_bad_ranks(self, bad: torch.Tensor) -> str:
        """``skip`` policy: '' when every rank's step was finite, else which ranks had a
        non-finite loss / gradient (one all-reduce and one host sync per step)."""
        flags = torch.zeros(2, self.world_size, dtype=torch.float64, device=self.device)
        flags[:, self.rank] = bad.double()
        if _distributed():
            dist.all_reduce(flags)
        loss_r, grad_r = ([r for r, f in enumerate(row) if f] for row in flags.tolist())
        # DDP averages gradients before we look: one rank's NaN shows on every rank
        return ", ".join(([f"loss non-finite on rank(s) {loss_r}"] if loss_r else [])
                         + ([f"gradients non-finite on rank(s) {grad_r}"] if grad_r else []))

    def sync(self, stop_requested: bool) -> tuple[dict[int, float], bool]:
        """The sync point: one all-reduce of [first bad it per rank..., not-stop].

        Returns ({rank: first non-finite iteration} for ranks that had one, any rank asked to
        stop). Every rank gets the same answer, so they all take the same branch.
        """
        buf = torch.full((self.world_size + 1,), math.inf, dtype=torch.float64,
                         device=self.device)
        buf[self.rank] = self.first_it
        buf[-1] = 0.0 if stop_requested else 1.0
        if _distributed():
            dist.all_reduce(buf, op=dist.ReduceOp.MIN)
        vals = buf.tolist()
        bad = {r: v for r, v in enumerate(vals[:-1]) if math.isfinite(v)}
        return bad, vals[-1] == 0.0

    def describe(self, bad: dict[int, float], epoch: int, iters_per_epoch: int) -> str:
        """A message naming the first non-finite step, its loss terms and the rank(s)."""
        terms = self.terms.unsqueeze(0)
        if _distributed():
            gathered = [torch.zeros_like(terms) for _ in range(self.world_size)]
            dist.all_gather(gathered, terms)
            terms = torch.cat(gathered)
        first = min(bad.values())
        ranks = sorted(r for r, v in bad.items() if v == first)
        loss, cls, patch, gok = terms[ranks[0]].tolist()
        it = int(first)
        return (f"non-finite step at epoch {it // iters_per_epoch}, iteration {it} (step "
                f"{it % iters_per_epoch} of the epoch) on rank(s) {ranks}: loss is {loss:.6g} "
                f"(cls {cls:.6g}, patch {patch:.6g}) and the gradients are "
                f"{'finite' if gok else 'non-finite'}")


# --------------------------------------------------------------------------------- sampler
class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` whose epoch can start at a global sample position.

    The epoch's permutation (seed, epoch) is the same for every world size; rank ``r`` of ``W``
    takes ``perm[start + r :: W]``, so the ranks together cover exactly ``perm[start:]``. With
    ``start = 0`` this is ``DistributedSampler`` itself. Every rank gets the same number of
    indices (``(total - start) // W``), so no rank runs a step the others do not.
    ``set_epoch`` resets the start: a position belongs to one epoch.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.start = 0

    def set_start(self, start: int) -> None:
        if not 0 <= start <= self.total_size:
            raise ValueError(f"sampler start {start} is outside the epoch (0..{self.total_size})")
        self.start = int(start)

    def _epoch_indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(len(self.dataset), generator=g).tolist()
        else:
            indices = list(range(len(self.dataset)))
        if not self.drop_last:
            pad = self.total_size - len(indices)
            if pad <= len(indices):
                indices += indices[:pad]
            else:
                indices += (indices * math.ceil(pad / len(indices)))[:pad]
        else:
            indices = indices[: self.total_size]
        return indices

    def __iter__(self):
        indices = self._epoch_indices()
        mine = indices[self.start + self.rank: self.total_size: self.num_replicas]
        return iter(mine[: len(self)])

    def __len__(self) -> int:
        return (self.total_size - self.start) // self.num_replicas


# ------------------------------------------------------------------------------------- RNG
def rng_state(device: torch.device) -> dict:
    """The host-side RNG states a step may draw from, as tensors / plain Python values."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (one all-reduce; a single process: the
    flag itself)."""
    if not _distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj, world_size: int) -> list:
    """Every rank's ``obj`` (a list of one for a single process)."""
    if not _distributed():
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out
