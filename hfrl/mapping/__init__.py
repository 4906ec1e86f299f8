"""Auto-mapping (HybridFlow §7): model shapes, device profiles, the cost model, the iteration
simulator and the placement + parallelism search; `hfrl plan` on the command line.

    from hfrl.mapping import Workload, get_profile, search
    best = search(Workload.paper("ppo", "7b"), 16, get_profile("a100-80gb"))[0]
    print(best.total_s, best.mapping.describe())

Every module here is pure Python except `calibration` (torch and hfrl's engines), which
`calibrate` imports when called.
"""
from __future__ import annotations

from hfrl.mapping.cost_model import GenerationCost, GenLayout, TrainLayout, forward_time, generation_cost, \
    generation_time, inference_memory, min_devices, train_memory, train_time, transition_bytes, transition_time
from hfrl.mapping.devices import PROFILES, DeviceProfile, get_profile, load_profile, save_profile
from hfrl.mapping.models import MODEL_SIZES, ModelSpec
from hfrl.mapping.plan_io import mapping_to_config
from hfrl.mapping.search import Planner, allocations, auto_parallel, brute_force, device_counts, min_allocation, \
    search, set_partitions
from hfrl.mapping.simulator import DATAFLOWS, Estimate, Mapping, RolePlan, Stage, Workload, role_memory, schedule, \
    simulate, stage_time, time_shared

__all__ = ["GenerationCost", "GenLayout", "TrainLayout", "forward_time", "generation_cost", "generation_time",
           "inference_memory", "min_devices", "train_memory", "train_time", "transition_bytes", "transition_time",
           "PROFILES", "DeviceProfile", "calibrate", "get_profile", "load_profile", "save_profile", "MODEL_SIZES",
           "ModelSpec", "Planner", "allocations", "auto_parallel", "brute_force", "device_counts", "min_allocation",
           "search", "set_partitions", "DATAFLOWS", "Estimate", "Mapping", "RolePlan", "Stage", "Workload",
           "role_memory", "schedule", "simulate", "stage_time", "time_shared", "mapping_to_config"]


def calibrate(*args, **kwargs) -> DeviceProfile:
    """`hfrl.mapping.calibration.calibrate` (imported on call: it needs torch)."""
    from hfrl.mapping.calibration import calibrate as measure

    return measure(*args, **kwargs)
