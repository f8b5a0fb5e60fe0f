"""Process-group set-up for every launcher: deepspeed, torchrun, srun, or plain `python` (one process).

- Rank/world come from the launcher's environment; with none, a single process group of one is made.
- CUDA -> NCCL, CPU -> gloo (DeepSpeed's CPU accelerator). On CPU the shared-memory comm op that DeepSpeed would
  JIT-compile (~45 s, needs g++) is skipped: gloo is used directly.
- A collective that waits longer than ``timeout_minutes`` raises on the rank that waits, so one dead rank ends the
  job instead of hanging it. Where the other ranks wait while the main rank does long one-off work (tokenizing a
  large corpus into the token cache), they wait in :func:`wait_for_main`: for a key the main rank sets in the
  process group's store, with a timeout of hours, not the training collectives' minutes (a main rank that fails
  takes the store's connection with it, which ends their wait).
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import sys

import torch
import torch.distributed as dist

from ds_hybrid.errors import ConfigError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list in its compressed form ("gpu[007-012,020],cpu3" -> "gpu007"), as
    ``scontrol show hostnames`` would list it first."""
    depth, end = 0, len(nodelist)
    for i, c in enumerate(nodelist):  # the first entry: up to a comma outside brackets
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end]
    while "[" in entry:  # each bracket group's first value ("a[1-2]-ib[3-4]" -> "a1-ib3")
        head, rest = entry.split("[", 1)
        group, tail = rest.split("]", 1)
        entry = head + group.split(",")[0].split("-")[0] + tail
    return entry


def node_address(host: str) -> str:
    """A Slurm node's NodeAddr (``scontrol show node``: the address its name may not resolve to), else the name."""
    import shutil
    import subprocess

    if shutil.which("scontrol"):
        try:
            shown = subprocess.run(["scontrol", "show", "node", host], capture_output=True, text=True,
                                   timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            shown = ""
        for token in shown.split():
            if token.startswith("NodeAddr=") and len(token) > len("NodeAddr="):
                return token.split("=", 1)[1]
    return host


def _tasks_per_node(value: str) -> str:
    """SLURM_TASKS_PER_NODE's count on this job's first nodes ("8(x4)" or "8,4(x2)" -> "8")."""
    return value.split(",")[0].split("(")[0]


def _env_from_slurm() -> None:
    """Under `srun` (one task per rank) translate Slurm's variables into torch's, the rendezvous included (the first
    node of the job, a port derived from the job id, as launchers/distill_70b.slurm sets them) where the launch did
    not set it: ``srun python ds_hybrid/train.py ...`` from any batch script."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    if int(os.environ["SLURM_NTASKS"]) <= 1 and "MASTER_ADDR" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    if per_node:  # (what torchrun sets: the memory plan shares a node's host memory among its ranks)
        os.environ.setdefault("LOCAL_WORLD_SIZE", _tasks_per_node(per_node))
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or \
        os.environ.get("SLURM_NODELIST")
    if "MASTER_ADDR" not in os.environ and nodes:
        os.environ["MASTER_ADDR"] = node_address(first_host(nodes))
    if "MASTER_PORT" not in os.environ and os.environ.get("SLURM_JOB_ID", "").isdigit():
        os.environ["MASTER_PORT"] = str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000)


def bind_local_gpu() -> None:
    """A cluster that binds one GPU per task (``--gpus-per-task=1``, ``--gpu-bind``) shows each rank one device,
    its own: LOCAL_RANK becomes 0 for DeepSpeed and torch (the node-local index stays in DS_HYBRID_LOCAL_INDEX).
    More ranks on a node than GPUs it shows is refused by name (two ranks would share a GPU)."""
    n, lr = torch.cuda.device_count(), local_rank()
    if lr < n:
        return
    if n == 1:
        os.environ["DS_HYBRID_LOCAL_INDEX"] = str(lr)
        os.environ["LOCAL_RANK"] = "0"
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    raise ConfigError("LOCAL_RANK", lr, f"this rank sees {n} GPUs (CUDA_VISIBLE_DEVICES={visible!r}); start one task "
                      "per GPU (e.g. srun --ntasks-per-node equal to the GPUs per node)")


WAIT_FOR_MAIN_HOURS = 12.0
_WAITS = [0]  # wait_for_main's calls so far (every rank makes them at the same points): each its own store key


def init_distributed(timeout_minutes: float = 30) -> None:
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
        bind_local_gpu()
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


def wait_for_main(value: str = "1") -> str:
    """The other ranks wait here until the main rank arrives, for up to WAIT_FOR_MAIN_HOURS: for one-off work that
    only the main rank does (the token cache of a large corpus can take longer than the training collectives'
    timeout, ``dist_timeout_minutes``, which a plain barrier would end the job at). The main rank sets a key in the
    process group's store and goes on; the others wait for it there, holding no collective and no GPU kernel (no
    group of another backend either: only the store that every launcher's group already has). A main rank that fails
    takes the store's connection with it (or, under torchrun, its agent stops the job), which ends the wait.

    Returns the main rank's ``value`` on every rank (what the ranks must agree on, such as the token cache's folder,
    when each would compute it from its own view of the files)."""
    if not (dist.is_initialized() and world_size() > 1):
        return value
    from torch.distributed import distributed_c10d

    _WAITS[0] += 1
    key = f"ds_hybrid/wait_for_main/{_WAITS[0]}"
    store = distributed_c10d._get_default_store()
    if is_main():
        store.set(key, value)
        return value
    store.wait([key], datetime.timedelta(hours=WAIT_FOR_MAIN_HOURS))
    return store.get(key).decode()


def parse_device(name: str) -> torch.device:
    """--device: a torch.device that exists here, or a ConfigError naming the option (before any model is read)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError("--device", name, "give cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", name, "no CUDA device here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError("--device", name, f"this machine has {torch.cuda.device_count()} CUDA device(s): use "
                          f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
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


class MainRankFailed(RuntimeError):
    """On the other ranks: what the main rank raised in a :func:`main_reads` (where that error does not cross
    processes as itself)."""


def _portable(e: Exception) -> Exception:
    """``e`` as the other ranks can receive it: itself where it pickles back to its type and message (ConfigError
    does), else a MainRankFailed naming it."""
    try:
        back = pickle.loads(pickle.dumps(e))
        if type(back) is type(e) and str(back) == str(e):
            return e
    except Exception:  # noqa: BLE001 (any error of pickling: the stand-in below)
        pass
    return MainRankFailed(f"the main rank failed: {type(e).__name__}: {e}")


def main_reads(read):
    """``read()`` run on the main rank only, its result on every rank: what the ranks decide on together (a marker
    seen, a file's contents) must not differ where another node sees the file system a moment later. Where
    ``read()`` raises, every rank raises it (the main rank its own; the others a copy), instead of the others waiting
    in the broadcast until a time-out or the launcher ends them."""
    if not (dist.is_initialized() and world_size() > 1):
        return read()
    failed = value = None
    if is_main():
        try:
            value = read()
        except Exception as e:  # noqa: BLE001 (raised below, on every rank)
            failed = e
    kind, out = broadcast_object(("failed", _portable(failed)) if failed is not None else ("ok", value))
    if kind == "failed":
        raise failed if failed is not None else out
    return out


def all_gather(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not (dist.is_initialized() and world_size() > 1):
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
