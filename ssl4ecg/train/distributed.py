"""Thin helpers over ``torch.distributed`` for runs launched with ``torchrun``.

Nothing here replaces PyTorch's engine: processes are started by ``torchrun``, gradients
are averaged by DistributedDataParallel; these helpers only answer "which rank am I" and
average a few logged numbers. Without ``torchrun`` every function is a single-process no-op.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as tdist

from ssl4ecg.errors import ConfigError


#: minutes a collective may wait before the group fails (PyTorch's default is 10 for NCCL, 30 for gloo)
TIMEOUT_ENV = "SSL4ECG_DIST_TIMEOUT_MINUTES"


def launched_by_torchrun() -> bool:
    """True under ``torchrun`` (its elastic agent's variables), also with a single process."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout() -> datetime.timedelta | None:
    """The collective timeout from ``$SSL4ECG_DIST_TIMEOUT_MINUTES`` (None: PyTorch's default)."""
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return None
    try:
        minutes = float(value)
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise ConfigError(f"${TIMEOUT_ENV} = {value!r} is not a positive number of minutes")
    return datetime.timedelta(minutes=minutes)


def init(device_type: str) -> None:
    """Join the process group (gloo on CPU, nccl on CUDA) if launched by torchrun."""
    if launched_by_torchrun() and not tdist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        kwargs = {"timeout": timeout()} if timeout() is not None else {}
        tdist.init_process_group(backend=backend, **kwargs)


def shutdown() -> None:
    """Leave the process group once every rank is done (all ranks call this).

    Work that only rank 0 does afterwards (evaluation) then runs without a group, so no
    other rank waits in a collective that could time out the job.
    """
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def active() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    """This process's rank; under torchrun it stays known after :func:`shutdown`."""
    if active():
        return tdist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return tdist.get_world_size() if active() else 1


def is_rank0() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        tdist.barrier()


def _reduce_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo reduces CPU tensors."""
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_float(value: float) -> float:
    """The mean of ``value`` over ranks."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_reduce_device())
    tdist.all_reduce(t)
    return float(t.item()) / world_size()


def min_int(value: int) -> int:
    """The minimum of ``value`` over ranks (so all ranks agree on a schedule length)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_reduce_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    return int(t.item())


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``value`` over ranks, without a host sync (on the reduce device)."""
    if not active():
        return value
    out = value.to(_reduce_device()).clone()
    tdist.all_reduce(out, op=tdist.ReduceOp.MAX)
    return out.to(value.device)


def all_gather_object(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` in a single process)."""
    if not active():
        return [obj]
    gathered: list = [None] * world_size()
    tdist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    holder = [obj]
    tdist.broadcast_object_list(holder, src=0)
    return holder[0]


def replicas_identical(module: torch.nn.Module) -> bool:
    """True when every rank holds bit-identical parameters and buffers of ``module``."""
    if not active():
        return True
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")
    gathered: list = [None] * world_size()
    tdist.all_gather_object(gathered, digest.hexdigest())
    return len(set(gathered)) == 1
