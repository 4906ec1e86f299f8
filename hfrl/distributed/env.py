"""Find out who we are from whichever launcher started us, and initialise torch.distributed.

Every rank runs the same program. The launcher only differs in the environment variables it sets:

| launcher       | rank             | world             | local rank        | master address               |
|----------------|------------------|-------------------|-------------------|------------------------------|
| torchrun       | RANK             | WORLD_SIZE        | LOCAL_RANK        | MASTER_ADDR / MASTER_PORT    |
| Slurm (srun)   | SLURM_PROCID     | SLURM_NTASKS      | SLURM_LOCALID     | first host of SLURM_NODELIST |
| Open MPI       | OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK             | mpi4py broadcast             |
| MPICH / Hydra  | PMI_RANK         | PMI_SIZE          | MPI_LOCALRANKID   | mpi4py broadcast             |
| none           | 0                | 1                 | 0                 | 127.0.0.1, a free port       |

torchrun is checked first because it also runs inside Slurm allocations and MPI jobs; an explicit
MASTER_ADDR/MASTER_PORT in the environment always wins over a derived one.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_PORT = 29500
# Slurm jobs derive their port from the job id so concurrent jobs on one node don't collide.
SLURM_PORT_BASE = 20000
SLURM_PORT_RANGE = 10000


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None
    """None under MPI when no MASTER_ADDR was exported: filled in by an mpi4py broadcast."""
    master_port: int | None
    launcher: str
    """One of "torchrun", "slurm", "openmpi", "mpich", "none"."""


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def expand_first_host(nodelist: str) -> str:
    """First host of a Slurm hostlist: "gpu[007-009,012],cpu1" -> "gpu007"; "r[2-3]-n[1-2]" ->
    "r2-n1". Zero padding is kept, as Slurm keeps it. Only the first host is needed, so the rest
    of the list is not expanded.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("SLURM_NODELIST is empty; cannot find the master host")
    host, depth, bracket = [], 0, []
    for char in nodelist:
        if char == "[":
            depth += 1
            bracket = []
        elif char == "]":
            depth -= 1
            host.append("".join(bracket).split(",")[0].split("-")[0])
        elif depth:
            bracket.append(char)
        elif char == ",":
            break
        else:
            host.append(char)
    if depth or not host:
        raise ValueError(f"cannot parse SLURM_NODELIST={nodelist!r}")
    return "".join(host)


def slurm_port(job_id: str) -> int:
    """A port derived from the Slurm job id, the same on every task of the job."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return SLURM_PORT_BASE + int(digits[-9:]) % SLURM_PORT_RANGE


# MPI launchers: (name, rank, size, local rank, local size). The master address is not among
# them: rank 0 broadcasts it with mpi4py (resolve_master_with_mpi).
_MPI_VARIABLES = (
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read rank, world size, local rank/size and master address from the launcher's variables."""
    env = os.environ if environ is None else environ
    addr = env.get("MASTER_ADDR")
    port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else None

    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        return _checked(DistEnv(
            rank=_int(env, "RANK"), world_size=world,
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            master_addr=addr or "127.0.0.1", master_port=port or DEFAULT_PORT, launcher="torchrun"))

    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST") \
            or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        world = _int(env, "SLURM_NTASKS")
        return _checked(DistEnv(
            rank=_int(env, "SLURM_PROCID"), world_size=world,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=_slurm_tasks_on_this_node(env, world),
            master_addr=addr or expand_first_host(nodelist),
            master_port=port or slurm_port(env.get("SLURM_JOB_ID", "0")), launcher="slurm"))

    for launcher, rank_var, size_var, local_var, local_size_var in _MPI_VARIABLES:
        if rank_var in env:
            world = _int(env, size_var)
            return _checked(DistEnv(
                rank=_int(env, rank_var), world_size=world,
                local_rank=int(env.get(local_var, 0)),
                local_world_size=int(env.get(local_size_var, world)),
                master_addr=addr, master_port=port, launcher=launcher))

    return DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1,
                   master_addr=addr or "127.0.0.1", master_port=port, launcher="none")


def _slurm_tasks_on_this_node(env: Mapping[str, str], world: int) -> int:
    # The step's own count first: inside an sbatch/salloc allocation, SLURM_NTASKS_PER_NODE is
    # the job's and is inherited by steps that launch a different number of tasks. The value
    # looks like "4(x2),3"; the first entry describes this job's first node.
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") \
        or env.get("SLURM_NTASKS_PER_NODE")
    if per_node:
        return int(re.match(r"\d+", per_node).group(0))
    return world


def _checked(denv: DistEnv) -> DistEnv:
    if denv.world_size < 1:
        raise ValueError(f"{denv.launcher}: world size {denv.world_size} must be >= 1")
    if not 0 <= denv.rank < denv.world_size:
        raise ValueError(f"{denv.launcher}: rank {denv.rank} is outside [0, {denv.world_size})")
    if not 0 <= denv.local_rank < max(denv.local_world_size, 1):
        raise ValueError(f"{denv.launcher}: local rank {denv.local_rank} is outside "
                         f"[0, {denv.local_world_size})")
    return denv


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def resolve_master_with_mpi(denv: DistEnv) -> DistEnv:
    """Under MPI without MASTER_ADDR, rank 0 picks its host and a free port and broadcasts them."""
    if denv.master_addr is not None and denv.master_port is not None:
        return denv
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError(
            f"launched by {denv.launcher} without MASTER_ADDR/MASTER_PORT: install mpi4py "
            "(pip install 'hfrl[mpi]') so rank 0 can broadcast its address, or export "
            "MASTER_ADDR and MASTER_PORT") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != denv.world_size:
        raise RuntimeError(
            f"mpi4py sees a world of {comm.Get_size()} but {denv.launcher}'s variables say "
            f"{denv.world_size}: mpi4py is linked against a different MPI than the launcher")
    payload = None
    if denv.rank == 0:
        payload = (denv.master_addr or socket.gethostname(), denv.master_port or free_port())
    addr, port = comm.bcast(payload, root=0)
    return DistEnv(**{**denv.__dict__, "master_addr": addr, "master_port": port})


@dataclass
class DistContext:
    """What init_distributed set up: the environment, device, backend and the control group."""

    env: DistEnv
    backend: str
    device: torch.device
    control_group: object
    """A gloo group over the whole world for control messages, with its own long timeout: a
    worker waits for its next command as long as rank 0 keeps the job alive."""
    timeout_s: float

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size


def pick_backend(requested: str) -> str:
    import torch   # here, not above: detect_env (every `hfrl` error message) stays free of torch

    if requested not in ("auto", "gloo", "nccl"):
        raise ValueError(f"distributed.backend={requested!r}: expected 'auto', 'gloo' or 'nccl'")
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise ValueError("distributed.backend='nccl' needs CUDA, which this machine lacks; "
                         "use 'gloo' or 'auto'")
    return requested


def init_distributed(backend: str = "auto", timeout_s: float = 600.0,
                     environ: Mapping[str, str] | None = None,
                     control_timeout_s: float = 7 * 24 * 3600.0) -> DistContext:
    """Initialise the default process group from the launcher's environment.

    The default group (NCCL on CUDA, gloo on CPU) carries the models' collectives with
    `timeout_s`. A separate gloo group over the same ranks carries control messages (NCCL cannot
    do CPU point-to-point) with `control_timeout_s`: waiting for the next command is not a
    stall, while a dead peer still shows at once as a closed connection.
    A world of 1 with no launcher works and still creates a (single-rank) process group, so code
    paths are the same with and without a launcher.
    """
    import torch
    import torch.distributed as dist

    denv = detect_env(environ)
    if denv.launcher in ("openmpi", "mpich"):
        denv = resolve_master_with_mpi(denv)
    elif denv.master_port is None:
        denv = DistEnv(**{**denv.__dict__, "master_port": free_port()})
    backend = pick_backend(backend)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", denv.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, init_method=f"tcp://{_url_host(denv.master_addr)}:{denv.master_port}",
            rank=denv.rank, world_size=denv.world_size, timeout=timeout,
            **({"device_id": device} if backend == "nccl" else {}))
    control = dist.new_group(backend="gloo",
                             timeout=datetime.timedelta(seconds=control_timeout_s))
    return DistContext(env=denv, backend=backend, device=device, control_group=control,
                       timeout_s=timeout_s)


def _url_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr


def destroy_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def collective_device(group=None) -> "torch.device":
    """Where a tensor handed to a collective on ``group`` (None: the default group) must live: the
    current CUDA device when the group runs NCCL, which takes no host tensors, the CPU otherwise
    (gloo, MPI, or no process group at all). Small bookkeeping tensors (flags, counts, metric sums)
    go through this, so the same code runs under gloo on a laptop and NCCL on a cluster."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
