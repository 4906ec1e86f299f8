"""Device profiles for the cost model: peak FLOP/s, memory bandwidth and capacity, link bandwidths.

Two profiles come from public specifications (A100-80GB and H100-80GB SXM, 8 per node, as in the
paper's testbed); `calibrate()` measures "this machine" (CPU or whatever torch runs on here) so
that predictions can be put next to measured `hfrl train` iterations. Profiles save to and load
from JSON, so a calibration made once is reused by `hfrl plan --device PATH`.

Everything except `calibrate` is pure Python; `calibrate` imports torch when called.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class DeviceProfile:
    """One device type and the links between devices. Rates are per device, in SI units."""

    name: str
    peak_flops: float
    """Dense bf16 FLOP/s of one device (fp32 for a calibrated CPU)."""
    mem_bandwidth: float
    """Bytes/s of device memory."""
    memory_bytes: int
    """Usable device memory (bytes)."""
    intra_node_bandwidth: float
    """Bytes/s per device, one direction, for collectives inside a node (NVLink/NVSwitch)."""
    inter_node_bandwidth: float
    """Bytes/s per device, one direction, for collectives across nodes (InfiniBand)."""
    devices_per_node: int
    matmul_efficiency: float = 0.5
    """Achieved fraction of `peak_flops` in training / prefill GEMMs (model FLOPs utilisation)."""
    bandwidth_efficiency: float = 0.8
    """Achieved fraction of `mem_bandwidth` when decoding (streaming weights and KV cache)."""
    collective_latency_s: float = 2e-5
    """Fixed cost of one collective call (seconds), whatever its size."""

    def __post_init__(self) -> None:
        for field in ("peak_flops", "mem_bandwidth", "memory_bytes", "intra_node_bandwidth",
                      "inter_node_bandwidth", "devices_per_node"):
            if not getattr(self, field) > 0:
                raise ValueError(f"device {self.name!r}: {field}={getattr(self, field)!r} must be > 0")
        for field in ("matmul_efficiency", "bandwidth_efficiency"):
            if not 0 < getattr(self, field) <= 1:
                raise ValueError(f"device {self.name!r}: {field}={getattr(self, field)!r} must be "
                                 f"in (0, 1]")
        if self.collective_latency_s < 0:
            raise ValueError(f"device {self.name!r}: collective_latency_s must be >= 0")

    def to_dict(self) -> dict:
        """Plain JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DeviceProfile":
        """Inverse of `to_dict`; unknown keys are an error (a typo must not pass silently)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"device profile: unknown keys {unknown}; expected a subset of "
                             f"{sorted(names)}")
        d = dict(d)
        if "memory_bytes" in d:
            d["memory_bytes"] = int(d["memory_bytes"])
        if "devices_per_node" in d:
            d["devices_per_node"] = int(d["devices_per_node"])
        try:
            return cls(**d)
        except TypeError as err:  # a required field is missing
            raise ValueError(f"device profile: {err}") from None


PROFILES: dict[str, DeviceProfile] = {
    # NVIDIA A100 SXM4 80GB datasheet (nvidia.com/en-us/data-center/a100): 312 TFLOP/s dense BF16,
    # 2,039 GB/s HBM2e, 80 GB (81,920 MiB); NVLink 3 600 GB/s total = 300 GB/s per direction.
    # DGX A100: 8 GPUs, 8x 200 Gb/s HDR InfiniBand = 25 GB/s per GPU.
    "a100-80gb": DeviceProfile("a100-80gb", peak_flops=312e12, mem_bandwidth=2.0e12,
                               memory_bytes=80 * GIB, intra_node_bandwidth=300e9,
                               inter_node_bandwidth=25e9, devices_per_node=8),
    # NVIDIA H100 SXM5 80GB datasheet (nvidia.com/en-us/data-center/h100): 989 TFLOP/s dense BF16,
    # 3.35 TB/s HBM3, 80 GB; NVLink 4 900 GB/s total = 450 GB/s per direction.
    # DGX H100: 8 GPUs, 8x 400 Gb/s NDR InfiniBand = 50 GB/s per GPU.
    "h100-80gb": DeviceProfile("h100-80gb", peak_flops=989e12, mem_bandwidth=3.35e12,
                               memory_bytes=80 * GIB, intra_node_bandwidth=450e9,
                               inter_node_bandwidth=50e9, devices_per_node=8),
}


def get_profile(name_or_path: str) -> DeviceProfile:
    """A built-in profile by name (case-insensitive), or one saved by `save_profile` (a JSON path)."""
    key = str(name_or_path).strip().lower()
    if key in PROFILES:
        return PROFILES[key]
    if os.path.isfile(name_or_path):
        return load_profile(name_or_path)
    raise ValueError(f"unknown device {name_or_path!r}: expected one of {sorted(PROFILES)} or the "
                     f"path of a JSON profile (write one with `hfrl plan --calibrate`)")


def save_profile(profile: DeviceProfile, path: str) -> None:
    """Write `profile` as JSON to `path`."""
    with open(path, "w") as f:
        json.dump(profile.to_dict(), f, indent=2)
        f.write("\n")


def load_profile(path: str) -> DeviceProfile:
    """Read a profile written by `save_profile`."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"device profile {path!r}: cannot read it as JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"device profile {path!r}: expected a JSON object")
    return DeviceProfile.from_dict(data)


# ---- calibration ("this machine") ----------------------------------------------------------
_COLLECTIVE_BYTES = 64 * 2**20


def calibrate(seconds: float = 2.0, devices_per_node: int | None = None) -> DeviceProfile:
    """Measure this machine into a profile named "this-machine" (takes `seconds` + ~10 s).

    - peak_flops: best fp32 `torch.mm` rate (1024^3, at the current torch thread count);
    - mem_bandwidth: best large-tensor copy rate (bytes read + written per second);
    - intra_node_bandwidth: gloo all-reduce (64 MiB) and all-gather (64 MiB out) between 2 local
      processes, converted to the per-device ring bandwidth the cost model divides by (all-reduce
      moves 2(n-1)/n of the bytes per rank, all-gather (n-1)/n of the output); the mean of the two;
    - collective_latency_s: a 4-byte all-reduce;
    - inter_node_bandwidth = intra (one node); devices_per_node = os.cpu_count() unless given;
    - memory_bytes: physical memory / devices_per_node (ranks share it);
    - efficiencies 1.0: these are measured roofs, not datasheet peaks.
    """
    import torch

    dpn = devices_per_node or os.cpu_count() or 1
    budget = max(float(seconds), 0.2)
    peak = _measure_matmul(torch, budget * 0.5)
    bandwidth = _measure_copy(torch, budget * 0.5)
    link, latency = _measure_collectives()
    total_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return DeviceProfile("this-machine", peak_flops=peak, mem_bandwidth=bandwidth,
                         memory_bytes=int(total_memory // dpn), intra_node_bandwidth=link,
                         inter_node_bandwidth=link, devices_per_node=int(dpn),
                         matmul_efficiency=1.0, bandwidth_efficiency=1.0,
                         collective_latency_s=latency)


def _best_rate(fn, work: float, seconds: float, min_reps: int = 3) -> float:
    """Best of repeated `fn()` calls (work units per second) within about `seconds`."""
    fn()  # warm-up
    best, start, reps = 0.0, time.perf_counter(), 0
    while reps < min_reps or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        best = max(best, work / max(time.perf_counter() - t0, 1e-9))
        reps += 1
    return best


def _measure_matmul(torch, seconds: float) -> float:
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    return _best_rate(lambda: torch.mm(a, b, out=out), 2.0 * n**3, seconds)


def _measure_copy(torch, seconds: float) -> float:
    src = torch.ones(32 * 2**20)  # 128 MiB fp32: far beyond any cache
    dst = torch.empty_like(src)
    return _best_rate(lambda: dst.copy_(src), 2.0 * src.numel() * src.element_size(), seconds)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure_collectives() -> tuple[float, float]:
    """(per-device ring bandwidth in bytes/s, latency of one collective in s) from 2 gloo ranks."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "collectives.json")
        mp.spawn(_collective_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        with open(out) as f:
            result = json.load(f)
    return result["bandwidth"], result["latency"]


def _collective_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank of the collective measurement (spawned; rank 0 writes the result)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        tiny = torch.zeros(1)
        latency = min(_timed(dist, lambda: dist.all_reduce(tiny)) for _ in range(20))
        full = torch.ones(_COLLECTIVE_BYTES // 4)
        t_ar = min(_timed(dist, lambda: dist.all_reduce(full)) for _ in range(3))
        shard = torch.ones(full.numel() // world)
        parts = list(full.chunk(world))
        t_ag = min(_timed(dist, lambda: dist.all_gather(parts, shard)) for _ in range(3))
        ring = (world - 1) / world
        bw_ar = 2 * ring * _COLLECTIVE_BYTES / max(t_ar - latency, 1e-9)
        bw_ag = ring * _COLLECTIVE_BYTES / max(t_ag - latency, 1e-9)
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"bandwidth": (bw_ar + bw_ag) / 2, "latency": latency}, f)
    finally:
        dist.destroy_process_group()


def _timed(dist, fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
