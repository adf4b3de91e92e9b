"""Several processes (`torchrun`, `accelerate launch --multi_gpu`): which process is the main one, each process's
share of the work, and gathering the results back in order.

A thin layer over accelerate's `PartialState`, created on first use: it initialises the process group from the
launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): nccl on GPUs, gloo on CPUs. In one
process every function is a no-op or the identity and neither accelerate nor torch.distributed is imported.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

# The variables launchers set to the number of processes (torchrun/accelerate: WORLD_SIZE; MPI implementations:
# the others), read the way accelerate reads them.
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched() -> bool:
    """True in a run started as several processes by a launcher."""
    return any(int(os.environ.get(name, "1") or "1") > 1 for name in _WORLD_SIZE_VARS)


def state() -> Any:
    """accelerate's PartialState of this process (initialises the process group on the first call). CPU-only
    machines get gloo (accelerate's MULTI_CPU): `cpu=True` is what makes accelerate use the launcher's
    environment there; without it, a CPU process under torchrun would silently run alone."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main() -> bool:
    """True in the process that writes files and prints (global rank 0), and in a single-process run."""
    return not launched() or bool(state().is_main_process)


def rank() -> int:
    return int(state().process_index) if launched() else 0


def world_size() -> int:
    return int(state().num_processes) if launched() else 1


def barrier() -> None:
    """Wait until every process gets here."""
    if launched():
        state().wait_for_everyone()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the body first, the others once it is done (e.g. filling a shared cache that the others
    then read). If the body fails on the main process, the launcher stops the others (torchrun ends every worker
    when one fails)."""
    if not launched():
        yield
        return
    with state().main_process_first():
        yield


def shard_bounds(n: int, ranks: int | None = None) -> list[tuple[int, int]]:
    """[start, end) of each rank's contiguous share of n items: sizes differ by at most one, the first n % ranks
    ranks take one more."""
    ranks = world_size() if ranks is None else ranks
    base, extra = divmod(n, ranks)
    bounds, start = [], 0
    for r in range(ranks):
        end = start + base + (1 if r < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def shard(indices: Sequence[int]) -> list[int]:
    """This process's part of `indices`: a contiguous slice (see `shard_bounds`), so that `gather` of per-item
    results, concatenated in rank order, is in the order of `indices`. A process may get no item when there are
    fewer items than processes."""
    start, end = shard_bounds(len(indices))[rank()]
    return list(indices[start:end])


def gather(tensor: Any) -> Any:
    """Every process's `tensor` concatenated along dim 0 in rank order, on every process (accelerate's
    gather_for_metrics semantics: shards of unequal length are padded for the collective, the padding dropped).
    Tensors must agree in every dimension but the first; returned on the device of the input."""
    if not launched():
        return tensor
    import torch
    import torch.distributed as dist

    device = state().device  # nccl gathers only device tensors, gloo CPU ones
    local = tensor.to(device).contiguous()
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.long, device=device))
    lengths = [int(s.item()) for s in sizes]
    longest = max(lengths)
    if local.shape[0] < longest:
        pad = local.new_zeros((longest - local.shape[0], *local.shape[1:]))
        local = torch.cat([local, pad])
    parts = [torch.empty_like(local) for _ in lengths]
    dist.all_gather(parts, local)
    return torch.cat([p[:n] for p, n in zip(parts, lengths)]).to(tensor.device)


def sync_buffers(module: Any) -> None:
    """Every process takes the main process's buffers of `module` (BatchNorm running statistics), in place, as DDP
    does before each forward: after training in train mode, each process's statistics moved with its own share."""
    if not launched():
        return
    import torch.distributed as dist

    state()
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


def broadcast_object(obj: Any) -> Any:
    """The main process's `obj` (any picklable value, e.g. the run directory path), on every process."""
    if not launched():
        return obj
    from accelerate.utils import broadcast_object_list

    state()  # the process group must exist
    return broadcast_object_list([obj], from_process=0)[0]


def all_true(flag: bool) -> bool:
    """True on every process when `flag` is True on every process (e.g. "my cache file is there")."""
    if not launched():
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.long, device=state().device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


_warned_single_cpu_launch = False


def single_cpu_launch() -> bool:
    """True in the one process that `accelerate launch --cpu --num_processes N` (N > 1) starts: accelerate's CPU
    launcher runs the script once and leaves starting the others to mpirun (`--mpirun_hostfile`). It marks that
    process with ACCELERATE_USE_CPU and the rendezvous address (set only when N > 1), but no WORLD_SIZE."""
    return (not launched() and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true"
            and "MASTER_ADDR" in os.environ)


def warn_single_cpu_launch(log: Any) -> None:
    """Say once, in one line, that a launch asking for several CPU processes got one (it would otherwise run alone
    silently), and which command starts them."""
    global _warned_single_cpu_launch
    if single_cpu_launch() and not _warned_single_cpu_launch:
        _warned_single_cpu_launch = True
        log("affinage: this is a single process: `accelerate launch --cpu --num_processes N` starts one process on "
            "CPUs; for N CPU processes use `accelerate launch --multi_gpu --num_processes N ...` on a machine without "
            "GPUs (or `torchrun --nproc_per_node N -m affinage.cli ...`)")
