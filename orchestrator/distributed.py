"""One job run by several processes: where each process sits, and their process group.

A multi-process job has ``world_size`` ranks, one per process (one per GPU on a GPU node).
Every rank builds the same data and distiller; each asks its loader for its own slice of
every global batch (:func:`orchestrator.data.loaders.local_rows`), and the ranks exchange one
buffer per step (gradients, loss sums and preemption flags). The launcher tells a process its
place through environment variables: torchrun's (``RANK``, ``WORLD_SIZE``...) or SLURM's
(``SLURM_PROCID``, ``SLURM_NTASKS``...).

What the ranks compute is deterministic: the all-reduce hands every rank the same bits, so
the ranks keep bit-identical weights with no broadcast, and a run repeats bit for bit (under
SLURM as locally) given the same intra-op thread counts. It does not reproduce a one-process
run (BatchNorm normalises each rank's slice) nor a run with other thread counts (CPU kernels
sum in another order); a short training can turn either difference into points of top-1.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import signal
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn


#: How long a collective waits for the slowest rank (data loading, rank 0's checkpoint writes)
#: before it fails; a rank that died without closing its connection is noticed after this.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
#: MASTER_PORT under SLURM (unless set): BASE_PORT + job id modulo PORT_SPAN.
BASE_PORT = 20000
PORT_SPAN = 20000


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a multi-process job.

    rank:        0-based index of this process among all of the job's processes.
    world_size:  number of processes in the job.
    local_rank:  0-based index of this process among the job's processes on its node (which
                 GPU it drives).
    master_addr: host name or address of rank 0, where the process group rendezvous.
    master_port: TCP port rank 0 listens on for the rendezvous.
    """

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the job's files and talks to MLflow."""
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, without calling ``scontrol``.

    ``node[01-04,07],gpu5`` -> ``node01``; ``a1,b2`` -> ``a1``; ``node3`` -> ``node3``. Each
    bracket group contributes its first entry (zero padding kept).
    """
    depth = 0
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            nodelist = nodelist[:i]
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0],
                  nodelist.strip())


def _port_from_job_id(job_id: str) -> int:
    digits = re.match(r"\d+", job_id)
    return BASE_PORT + (int(digits.group()) if digits else 0) % PORT_SPAN


def env_from_slurm(environ: Mapping[str, str] = os.environ) -> Optional[DistEnv]:
    """The place of a task of an ``srun`` step; None unless SLURM_NTASKS is 2 or more.

    Rank 0 is the first host of the step's (else the job's) node list; the port is
    ``BASE_PORT + SLURM_JOB_ID % PORT_SPAN``. MASTER_ADDR / MASTER_PORT, when set, win.
    """
    world_size = int(environ.get("SLURM_NTASKS", "1"))
    if world_size < 2:
        return None
    port = environ.get("MASTER_PORT") or _port_from_job_id(environ.get("SLURM_JOB_ID", "0"))
    return DistEnv(rank=int(environ["SLURM_PROCID"]), world_size=world_size,
                   local_rank=int(environ.get("SLURM_LOCALID", "0")),
                   master_addr=environ.get("MASTER_ADDR") or first_host(_nodelist(environ)),
                   master_port=int(port))


def _nodelist(environ: Mapping[str, str]) -> str:
    """The step's node list, else the job's; ValueError when SLURM set neither."""
    for key in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if environ.get(key):
            return environ[key]
    raise ValueError("SLURM_NTASKS is set but no SLURM_*NODELIST names rank 0's host; "
                     "set MASTER_ADDR")


def env_from_torchrun(environ: Mapping[str, str] = os.environ) -> Optional[DistEnv]:
    """The place torchrun (or any launcher setting its variables) gave this process; None
    unless WORLD_SIZE is 2 or more."""
    world_size = int(environ.get("WORLD_SIZE", "1"))
    if world_size < 2:
        return None
    return DistEnv(rank=int(environ["RANK"]), world_size=world_size,
                   local_rank=int(environ.get("LOCAL_RANK", "0")),
                   master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
                   master_port=int(environ.get("MASTER_PORT", "29500")))


def detect_env(environ: Mapping[str, str] = os.environ) -> Optional[DistEnv]:
    """torchrun's variables if set, else SLURM's; None for a single-process job."""
    return env_from_torchrun(environ) or env_from_slurm(environ)


def rank_device(device: torch.device, env: DistEnv) -> torch.device:
    """The device rank ``env`` trains on: the GPU of its local rank (modulo the GPUs it can
    see, so one GPU bound per task works too) for CUDA, ``device`` otherwise."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", env.local_rank % torch.cuda.device_count())


@contextlib.contextmanager
def process_group(env: DistEnv, device: torch.device,
                  timeout: timedelta = COLLECTIVE_TIMEOUT) -> Iterator[None]:
    """Within the block, the default process group joins the job's ``world_size`` ranks.

    NCCL on CUDA devices (after making ``device`` the current CUDA device), Gloo otherwise;
    rendezvous over TCP at ``master_addr:master_port``. A group that is already initialised
    (by the caller, who then owns it) is used as is and left alone on exit.
    """
    if dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://{env.master_addr}:{env.master_port}",
                            rank=env.rank, world_size=env.world_size, timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy consecutive pieces of the 1-D ``flat`` into ``tensors`` (in place)."""
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset:offset + tensor.numel()].view(tensor.shape))
        offset += tensor.numel()


def all_reduce_gradients(params: Sequence[torch.Tensor], share: float,
                         received: Sequence[int] = (), stats: Optional[torch.Tensor] = None,
                         read_signals: bool = True) -> Tuple[torch.Tensor, List[int]]:
    """Average the gradients of ``params`` over the ranks, with ONE all-reduce.

    params:    the optimizer's parameters, in the same order on every rank; those whose
               ``grad`` is None on this rank (which must hold for every rank) are left alone.
    share:     this rank's fraction of the global batch (its samples / all ranks' samples).
               Each gradient is multiplied by it before the sum, so for a loss that is a mean
               over samples the result is the gradient of the global batch's mean loss
               (``1 / world_size`` for equal slices: the plain average).
    received:  the numbers of the (preemption) signals this rank received.
    stats:     (K,) float values summed over the ranks unscaled (e.g. loss * samples); a
               (0,) tensor when omitted.
    read_signals: read the signal flags back to the host (a device synchronisation); when
               False the signals returned are empty, and the step queues device work only.
    Returns the summed ``stats`` (K,) and the signals any rank received (ascending; empty
    when none was). The gradients, the stats and one flag per signal number travel in one
    buffer on the parameters' device.
    """
    device = params[0].device
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    stats = torch.zeros(0, device=device) if stats is None else stats
    flags = torch.zeros(signal.NSIG)
    flags[sorted(set(received))] = 1.0
    buffer = torch.cat([g.reshape(-1) for g in grads]
                       + [stats.to(grads[0].dtype), flags.to(device, grads[0].dtype)])
    count = buffer.numel() - stats.numel() - signal.NSIG
    buffer[:count].mul_(share)
    dist.all_reduce(buffer)
    _unflatten_into(buffer[:count], grads)  # the real grads, and zeros that are dropped
    anywhere = (torch.nonzero(buffer[-signal.NSIG:] > 0).flatten().tolist() if read_signals
                else [])
    return buffer[count:-signal.NSIG].to(stats.dtype), anywhere


def broadcast_from_main(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite each tensor in place with rank 0's values (one broadcast per dtype)."""
    groups: Dict[torch.dtype, List[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(tensor.dtype, []).append(tensor)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, src=0)
        _unflatten_into(flat, group)


def average_running_stats(modules: Iterable[nn.Module], world_size: int) -> None:
    """Replace the running mean / variance of every BatchNorm in ``modules`` by their average
    over the ranks (each rank's statistics come from its own slices of the batches), so that
    every rank evaluates the same network. One all-reduce."""
    stats = [s for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.running_mean is not None for s in (m.running_mean, m.running_var)]
    if not stats:
        return
    flat = torch.cat([s.reshape(-1) for s in stats])
    dist.all_reduce(flat)
    _unflatten_into(flat.div_(world_size), stats)


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed element-wise over the ranks (in place; returned for chaining)."""
    dist.all_reduce(tensor)
    return tensor


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` (any picklable value) on every rank; the argument is ignored elsewhere."""
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    """Wait until every rank gets here."""
    dist.barrier()


class Ranks:
    """The processes a job run spans, seen from one of them: what the job runner does across
    ranks.

    ``Ranks(None)`` (or a world of one) is a process running the job alone: every method is
    then the identity and runs no collective, so a single-process run is unchanged.
    """

    def __init__(self, env: Optional[DistEnv]) -> None:
        self.env = env if env is not None and env.world_size > 1 else None

    @property
    def is_main(self) -> bool:
        """Whether this process writes the job's files (rank 0, or the only process)."""
        return self.env is None or self.env.is_main

    @property
    def part(self) -> Tuple[int, int]:
        """(rank, world_size); (0, 1) alone."""
        return (0, 1) if self.env is None else (self.env.rank, self.env.world_size)

    def device(self, device: torch.device) -> torch.device:
        """The device this rank trains on (:func:`rank_device`); alone: ``device``."""
        return device if self.env is None else rank_device(device, self.env)

    def check_batches(self, num_samples: int, batch_size: int) -> None:
        """Raise ValueError if some rank would get no sample of some global batch (a batch, or
        the epoch's last partial one, smaller than the world)."""
        world_size = self.part[1]
        last = num_samples - (math.ceil(num_samples / batch_size) - 1) * batch_size
        if min(batch_size, last) < world_size:
            raise ValueError(f"a batch of {min(batch_size, last)} samples (batch_size "
                             f"{batch_size}, {num_samples} samples) cannot be split over "
                             f"{world_size} processes")

    def reduce_step(self, params: Sequence[torch.Tensor], stats: Dict[str, torch.Tensor],
                    share: float, received: Sequence[int], read_signals: bool = True,
                    ) -> Tuple[Dict[str, torch.Tensor], List[int]]:
        """Average the gradients (:func:`all_reduce_gradients`), sum the scalar ``stats`` over
        the ranks and, if ``read_signals`` (every rank must pass the same), gather the signals
        any rank ``received`` (else none are returned); alone: the arguments."""
        if self.env is None:
            return stats, list(received)
        names = list(stats)
        summed, signals = all_reduce_gradients(params, share, received,
                                               torch.stack([stats[n] for n in names]),
                                               read_signals)
        return dict(zip(names, summed.unbind())), signals

    def from_main(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (:func:`broadcast_object`); alone: ``obj``."""
        return obj if self.env is None else broadcast_object(obj)

    def share_state(self, tensors: Iterable[torch.Tensor]) -> None:
        """Give every rank rank 0's values of ``tensors`` (:func:`broadcast_from_main`)."""
        if self.env is not None:
            broadcast_from_main(tensors)

    def average_norms(self, modules: Iterable[nn.Module]) -> None:
        """Average BatchNorm running statistics over the ranks (:func:`average_running_stats`)."""
        if self.env is not None:
            average_running_stats(modules, self.env.world_size)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks (in place); alone: ``tensor``."""
        return tensor if self.env is None else sum_over_ranks(tensor)

    def wait(self) -> None:
        """Wait for every rank (:func:`barrier`); alone: return at once."""
        if self.env is not None:
            barrier()


#: A process running its job by itself.
ALONE = Ranks(None)
