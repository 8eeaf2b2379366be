"""FSDP2 for the fast step (``--fast_step true --fsdp true``): sharded student *and* teacher.

Layout. ``fully_shard`` is applied to every transformer block, then to the whole student wrapper
(``FastStudent``: patch embedding, tokens, final norm and head form the root group). The fast
step does not call ``Block.forward`` (it runs each block on a packed token stream through
``PackedBlock``), so every block gets a ``packed_forward`` method registered with
``register_fsdp_forward_method``: FSDP's all-gather / reshard / pre-backward hooks then run
around the call the fast step really makes.

The teacher is sharded the same way (per block, then a small root wrapper around its forward).
Why not a replicated teacher: it would cost a full model copy per rank (what FSDP is for is
memory) and an all-gather of the student every step for the EMA. With the same sharding (same
mesh, ``Shard(0)``, same module structure and parameter shapes) the local shard of a teacher
parameter holds exactly the elements of the local shard of its student twin, so the EMA is a
local ``foreach lerp_`` over the shards (:class:`ShardedEMA`), no communication. The flat-buffer
EMA of the DDP path does not apply: FSDP owns the shard storage (its all-gather reads it), so it
cannot be re-homed into one buffer; the Triton kernel and the bf16 teacher copy are DDP-only.

Clipping keeps the reference's per-tensor semantics: each tensor's *full* L2 norm, from the
local squared norms summed across ranks in one ``all_reduce`` (no host sync)
(:func:`clip_gradients_per_tensor_sharded`).

Checkpoints hold full (unsharded, CPU) state dicts in the DDP format, so FSDP and DDP/one-process
checkpoints are interchangeable: ``get_model_state_dict(..., full_state_dict=True,
cpu_offload=True)`` for the networks; the optimiser state keeps torch's integer-keyed format with
every sharded moment gathered to its full tensor (and split again on load).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ibot_fast.ema import _unwrap


def check_fsdp(device: torch.device) -> None:
    """``--fsdp true`` needs a process group (run under torchrun, any number of processes)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("--fsdp true shards over a process group: launch with torchrun "
                         "(torchrun --nproc_per_node G -m ibot_fast.train ...; G may be 1)")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the torch build
        raise ValueError(f"--fsdp true needs FSDP2 (torch.distributed.fsdp.fully_shard): "
                         f"{err}") from None


def _mesh(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device.type, (dist.get_world_size(),))


def shard_blocks_and_root(root: nn.Module, blocks, runners, mesh) -> None:
    """``fully_shard`` each block (its packed call registered as an FSDP forward method), then
    ``root``. ``runners[i](x, coins, subsets)`` runs ``blocks[i]`` on the packed stream."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    for blk, runner in zip(blocks, runners):
        # a plain function, not the runner module: a module attribute would become a child
        # of the block (and the runner holds the block: a cycle in the module tree)
        blk.packed_forward = (lambda x, coins=None, subsets=None, _r=runner:
                              _r(x, coins, subsets))
        fully_shard(blk, mesh=mesh)
        register_fsdp_forward_method(blk, "packed_forward")
    fully_shard(root, mesh=mesh)


class FSDPTeacher(nn.Module):
    """The teacher's root FSDP unit: ``forward(globals_, idx_M)`` is ``fn(teacher, ...)``."""

    def __init__(self, teacher: nn.Module, fn):
        super().__init__()
        self.teacher = teacher
        self._fn = fn

    def forward(self, globals_, idx_M):
        return self._fn(self.teacher, globals_, idx_M)


class ShardedEMA:
    """``t <- m·t + (1-m)·s`` on the local shards of identically sharded networks (pairing by
    name as :class:`ibot_fast.ema.EMATeacherUpdate`); one foreach ``lerp_``, no communication.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module):
        from torch.distributed.tensor import DTensor
        s = dict(_unwrap(student).named_parameters())
        t = dict(_unwrap(teacher).named_parameters())
        self.names = [n for n in t if n in s]
        self.student_local, self.teacher_local = [], []
        for n in self.names:
            ps, pt = s[n], t[n]
            if not (isinstance(ps, DTensor) and isinstance(pt, DTensor)):
                raise ValueError(f"ShardedEMA: {n} is not sharded on both networks")
            if ps.placements != pt.placements or ps.to_local().shape != pt.to_local().shape:
                raise ValueError(f"ShardedEMA: {n} is sharded differently in student "
                                 f"({ps.placements}, {tuple(ps.to_local().shape)}) and teacher "
                                 f"({pt.placements}, {tuple(pt.to_local().shape)})")
            # views of FSDP's shard storage: updating them in place is what the next
            # all-gather reads
            self.student_local.append(ps.to_local())
            self.teacher_local.append(pt.to_local())

    @torch.no_grad()
    def __call__(self, momentum: float):
        torch._foreach_lerp_(self.teacher_local, self.student_local, 1.0 - momentum)


@torch.no_grad()
def clip_gradients_per_tensor_sharded(params, clip: float) -> torch.Tensor | None:
    """:func:`ibot_fast.optim.clip_gradients_per_tensor` for sharded (DTensor) gradients: the
    same ``coef = clip / (norm + 1e-6)``, capped at 1, with ``norm`` the full tensor's L2 norm
    (squared local norms summed over ranks). Returns the full norms (device, no sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or clip <= 0:
        return None
    local = [g.to_local() for g in grads]
    sq = torch.stack(torch._foreach_norm(local)).square_()
    dist.all_reduce(sq, group=grads[0].device_mesh.get_group())
    norms = sq.sqrt_()
    coefs = (clip / (norms + 1e-6)).clamp_(max=1.0)
    torch._foreach_mul_(local, list(coefs.to(local[0].dtype).unbind()))
    return norms


# ------------------------------------------------------------------------------ checkpoints
def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state_dict(module: nn.Module) -> dict:
    """Collective (every rank calls it): the full CPU state dict on rank 0, {} elsewhere."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(module, options=_options(cpu_offload=True))


def load_full_model_state_dict(module: nn.Module, state: dict) -> None:
    """Every rank holds the full ``state``; each keeps its shards. (Not ``set_model_state_dict``:
    it leaves aliased keys -- a shared teacher head's ``last_layer2.*`` is ``last_layer.*`` --
    as plain tensors, which cannot be copied into DTensor parameters.)"""
    own = module.state_dict()
    out = {}
    for k, v in state.items():
        out[k] = _split_like(v, own[k]) if k in own else v  # unknown keys: load_state_dict says
    module.load_state_dict(out)


def _split_like(full: torch.Tensor, like):
    """``full`` as a DTensor sharded like ``like`` (every rank holds ``full``: a local split,
    src_data_rank=None, no communication); ``full`` itself when ``like`` is no DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not isinstance(like, DTensor) or not torch.is_tensor(full) or full.shape != like.shape \
            or full.dim() == 0:
        return full
    return distribute_tensor(full.to(like.to_local().device, like.dtype), like.device_mesh,
                             like.placements, src_data_rank=None)


def full_optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """torch's integer-keyed ``state_dict`` with every sharded tensor gathered (collective)."""
    from torch.distributed.tensor import DTensor
    sd = optimizer.state_dict()
    rank0 = dist.get_rank() == 0
    state = {}
    for k, st in sd["state"].items():
        out = {}
        for name, v in st.items():
            if isinstance(v, DTensor):
                v = v.full_tensor()
                v = v.cpu() if rank0 else None
            out[name] = v
        state[k] = out
    return {"state": state, "param_groups": sd["param_groups"]} if rank0 else {}


def load_full_optimizer_state_dict(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full (DDP-format) optimiser state into an optimiser over sharded parameters."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    converted = {}
    for k, st in state["state"].items():
        p = params[int(k)]
        # moments have the parameter's shape and are sharded like it; "step" stays a scalar
        converted[k] = {name: _split_like(v, p) for name, v in st.items()}
    optimizer.load_state_dict({"state": converted, "param_groups": state["param_groups"]})


__all__ = ["FSDPTeacher", "ShardedEMA", "check_fsdp", "clip_gradients_per_tensor_sharded",
           "full_model_state_dict", "full_optimizer_state_dict", "load_full_model_state_dict",
           "load_full_optimizer_state_dict", "shard_blocks_and_root"]
