"""LoRA Lab: Low-Rank Adaptation built from scratch, measured on a toy transformer.

The public API that notebooks, tests and users rely on is listed in `__all__`.
"""

import warnings

from . import threads
from .adapters import load_adapter, load_lora_state_dict, lora_state_dict, save_adapter
from .base import BASE_MODEL_PATH, load_base_model, save_base_model
from .config import INITS, VARIANTS, LoRAConfig
from .diagnosis import Finding, doctor
from .diagnosis import report as doctor_report
from .lora import LoRALinear
from .memory import (
    MemoryBreakdown,
    analytic_flops,
    analytic_memory,
    flops_per_step,
    measure_step_memory,
)
from .model import PRESETS, ModelConfig, ToyTransformer, default_device, get_preset
from .quant import NF4_LEVELS, Linear4bit, quantization_error, quantize_base
from .spectra import (
    amplification_factor,
    energy_rank,
    intruder_counts,
    intruder_dimensions,
    layer_spectra,
    scale_intruders,
    scale_model_intruders,
)
from .surgery import (
    ParamCount,
    add_lora,
    check_trainable,
    count_parameters,
    lora_layers,
    merge_lora,
    parameter_groups,
    remove_lora,
    unmerge_lora,
)
from .sweeps import (
    SweepCache,
    SweepCacheError,
    SweepFailed,
    SweepPoint,
    SweepResult,
    full_point,
    grid,
    keep_torch_cache_at_home,
    sweep,
)
from .tasks import TASKS, Task, get_task
from .training import TrainingDiverged, TrainResult, train
from .variants.dora import DoRALinear  # importing lab.variants registers every flavour

try:
    threads.apply()  # torch's thread count for this kernel: lab.threads.describe() says why
except ValueError as exc:  # a bad LORA_LAB_THREADS: said now; training refuses to start with it
    warnings.warn(str(exc), stacklevel=2)
keep_torch_cache_at_home()  # torch's compiler cache under the user's cache folder, not /tmp

__all__ = [
    "BASE_MODEL_PATH",
    "INITS",
    "NF4_LEVELS",
    "VARIANTS",
    "DoRALinear",
    "Finding",
    "Linear4bit",
    "LoRAConfig",
    "PRESETS",
    "TASKS",
    "LoRALinear",
    "MemoryBreakdown",
    "ModelConfig",
    "ParamCount",
    "SweepCache",
    "SweepFailed",
    "SweepCacheError",
    "SweepPoint",
    "SweepResult",
    "Task",
    "ToyTransformer",
    "TrainingDiverged",
    "TrainResult",
    "add_lora",
    "amplification_factor",
    "check_trainable",
    "analytic_flops",
    "analytic_memory",
    "count_parameters",
    "default_device",
    "doctor",
    "doctor_report",
    "energy_rank",
    "flops_per_step",
    "full_point",
    "get_preset",
    "get_task",
    "grid",
    "intruder_counts",
    "intruder_dimensions",
    "layer_spectra",
    "load_adapter",
    "load_base_model",
    "load_lora_state_dict",
    "lora_layers",
    "lora_state_dict",
    "measure_step_memory",
    "merge_lora",
    "parameter_groups",
    "quantization_error",
    "quantize_base",
    "remove_lora",
    "save_adapter",
    "save_base_model",
    "scale_intruders",
    "scale_model_intruders",
    "sweep",
    "threads",
    "train",
    "unmerge_lora",
]

__version__ = "0.1.0"
