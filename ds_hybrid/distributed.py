"""Process-group set-up for every launcher: deepspeed, torchrun, srun, or plain `python` (one process).

- Rank/world come from the launcher's environment; with none, a single process group of one is made.
- CUDA -> NCCL, CPU -> gloo (DeepSpeed's CPU accelerator). On CPU the shared-memory comm op that DeepSpeed would
  JIT-compile (~45 s, needs g++) is skipped: gloo is used directly.
- A collective that waits longer than ``timeout_minutes`` raises on the rank that waits, so one dead rank ends the
  job instead of hanging it.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist

from ds_hybrid.errors import ConfigError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_from_slurm() -> None:
    """Under `srun` (one task per rank) translate Slurm's variables into torch's."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    if int(os.environ["SLURM_NTASKS"]) <= 1 and "MASTER_ADDR" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def init_distributed(timeout_minutes: int = 30) -> None:
    if dist.is_available() and dist.is_initialized():
        return
    _env_from_slurm()
    if "RANK" not in os.environ:  # plain `python ds_hybrid/train.py`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        comm_torch = sys.modules.get("deepspeed.comm.torch")
        if comm_torch is None:
            import deepspeed.comm.torch as comm_torch
        comm_torch.build_shm_op = lambda: None  # no JIT compile of the CPU shm op; plain gloo collectives
    else:
        torch.cuda.set_device(local_rank())
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def shutdown() -> None:
    """Destroy the process group before the interpreter exits. Left to the exit, gloo's worker threads are torn down
    while still joinable and abort the process now and then ("terminate called without an active exception", exit
    -6) after the work has finished."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()


def parse_device(name: str) -> torch.device:
    """--device: a torch.device that exists here, or a ConfigError naming the option (before any model is read)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError("--device", name, "give cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", name, "no CUDA device here; use --device cpu")
    return device


def device() -> torch.device:
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world_size()
    return x


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any rank (used for stop signals and non-finite losses)."""
    if not (dist.is_initialized() and world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj):
    if not (dist.is_initialized() and world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_reads(read):
    """``read()`` run on the main rank only, its result on every rank: what the ranks decide on together (a marker
    seen, a file's contents) must not differ where another node sees the file system a moment later."""
    return broadcast_object(read() if is_main() else None)


def all_gather(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not (dist.is_initialized() and world_size() > 1):
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
