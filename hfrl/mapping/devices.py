"""Device profiles for the cost model: peak FLOP/s, memory bandwidth and capacity, link bandwidths.

Two profiles come from public specifications (A100-80GB and H100-80GB SXM, 8 per node, as in the
paper's testbed); `hfrl.mapping.calibration.calibrate()` measures "this machine" (CPU or whatever
torch runs on here) so that predictions can be put next to measured `hfrl train` iterations.
Profiles save to and load from JSON, so a calibration made once is reused by
`hfrl plan --device PATH`. Pure Python.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

GIB = 2**30
OVERHEAD_FIELDS = ("call_overhead_s", "pass_overhead_s", "layer_overhead_s", "train_pass_overhead_s",
                   "train_layer_overhead_s", "decode_step_overhead_s", "decode_layer_overhead_s",
                   "optimizer_step_overhead_s", "optimizer_layer_overhead_s", "dp_sync_overhead_s")
"""The profile's fixed costs (seconds per event), measured by `calibrate`, 0 in datasheet profiles."""


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
    # Fixed costs that do not scale with FLOPs or bytes: framework dispatch, kernel launches, the
    # controller. Negligible at the paper's scale (0 in the datasheet profiles, whose GEMMs take
    # milliseconds), they are most of the time of the small models `calibrate` measures on a CPU.
    call_overhead_s: float = 0.0
    """One dataflow stage: rank 0 dispatching the call to the role's ranks and collecting its result."""
    pass_overhead_s: float = 0.0
    """One model pass over a micro-batch, beyond its decoder layers (batch preparation, embedding,
    head, log-probs)."""
    layer_overhead_s: float = 0.0
    """One decoder layer in one forward pass over a micro-batch."""
    train_pass_overhead_s: float = 0.0
    """One training micro-batch (forward + backward + loss), beyond its decoder layers."""
    train_layer_overhead_s: float = 0.0
    """One decoder layer in one training micro-batch (its forward and backward)."""
    decode_step_overhead_s: float = 0.0
    """One decode step, beyond its decoder layers (scheduling, sampling, KV-cache bookkeeping)."""
    decode_layer_overhead_s: float = 0.0
    """One decoder layer in one decode step (paged attention's gathers and writes included)."""
    optimizer_step_overhead_s: float = 0.0
    """One optimizer step, beyond its per-layer part (gradient norm, clip, skip check, LR schedule)."""
    optimizer_layer_overhead_s: float = 0.0
    """One decoder layer's tensors in one optimizer step (their Adam update and zeroed gradients)."""
    dp_sync_overhead_s: float = 0.0
    """One optimizer step of a data-parallel layout (dp > 1), beyond its all-reduce's bytes: the
    step's small collectives (token counts, metrics, norm, skip check) and the ranks waiting for
    each other."""

    def __post_init__(self) -> None:
        for field in ("peak_flops", "mem_bandwidth", "memory_bytes", "intra_node_bandwidth",
                      "inter_node_bandwidth", "devices_per_node"):
            if not getattr(self, field) > 0:
                raise ValueError(f"device {self.name!r}: {field}={getattr(self, field)!r} must be > 0")
        for field in ("matmul_efficiency", "bandwidth_efficiency"):
            if not 0 < getattr(self, field) <= 1:
                raise ValueError(f"device {self.name!r}: {field}={getattr(self, field)!r} must be "
                                 f"in (0, 1]")
        for field in ("collective_latency_s",) + OVERHEAD_FIELDS:
            if not getattr(self, field) >= 0:
                raise ValueError(f"device {self.name!r}: {field}={getattr(self, field)!r} must be >= 0")

    def oversubscribed(self, processes: int) -> "DeviceProfile":
        """The profile each of `processes` ranks sees when they time-share this node's
        `devices_per_node` devices (more CPU ranks than cores): every rate divided and every fixed
        cost multiplied by processes / devices_per_node (unchanged when the ranks fit)."""
        share = processes / self.devices_per_node
        if processes < 1:
            raise ValueError(f"processes={processes!r} must be >= 1")
        if share <= 1:
            return self
        rates = ("peak_flops", "mem_bandwidth", "intra_node_bandwidth", "inter_node_bandwidth")
        return dataclasses.replace(
            self, name=f"{self.name} ({processes} ranks on {self.devices_per_node})",
            devices_per_node=processes, memory_bytes=int(self.memory_bytes / share),
            **{f: getattr(self, f) / share for f in rates},
            **{f: getattr(self, f) * share for f in ("collective_latency_s",) + OVERHEAD_FIELDS})

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
