"""LoRA Lab: Low-Rank Adaptation built from scratch, measured on a toy transformer.

The public API that notebooks, tests and users rely on is listed in `__all__`. Importing `lab`
changes nothing in the process (torch's thread count, the environment, the working folder) and
loads only the core: each public name's module is imported the first time the name is used
(PEP 562), so `import lab; lab.sweep(...)` loads the sweep engine then, not before. The lab's
thread rule (lab.threads) is applied where training starts.
"""

import importlib
import importlib.util

# Every flavour registers itself in lab.config.VARIANTS / INITS when its module is imported, so
# the registry is full whatever part of the lab is used first (lab.variants imports lab.lora).
# lab.threads notes torch's thread count now (it changes nothing) so that training can tell a
# count set on purpose later from torch's own.
from . import threads, variants  # noqa: F401

# Public name -> the module that defines it ("module:attribute" where the names differ).
_WHERE = {
    "BASE_MODEL_PATH": "base",
    "load_base_model": "base",
    "save_base_model": "base",
    "INITS": "config",
    "VARIANTS": "config",
    "LoRAConfig": "config",
    "Finding": "diagnosis",
    "doctor": "diagnosis",
    "doctor_report": "diagnosis:report",
    "LoRALinear": "lora",
    "ParamCount": "surgery",
    "add_lora": "surgery",
    "check_trainable": "surgery",
    "count_parameters": "surgery",
    "lora_layers": "surgery",
    "merge_lora": "surgery",
    "parameter_groups": "surgery",
    "remove_lora": "surgery",
    "unmerge_lora": "surgery",
    "load_adapter": "adapters",
    "load_lora_state_dict": "adapters",
    "lora_state_dict": "adapters",
    "save_adapter": "adapters",
    "MemoryBreakdown": "memory",
    "analytic_flops": "memory",
    "analytic_memory": "memory",
    "flops_per_step": "memory",
    "measure_step_memory": "memory",
    "PRESETS": "model",
    "ModelConfig": "model",
    "ToyTransformer": "model",
    "default_device": "model",
    "get_preset": "model",
    "NF4_LEVELS": "quant",
    "Linear4bit": "quant",
    "quantization_error": "quant",
    "quantize_base": "quant",
    "amplification_factor": "spectra",
    "energy_rank": "spectra",
    "intruder_counts": "spectra",
    "intruder_dimensions": "spectra",
    "layer_spectra": "spectra",
    "scale_intruders": "spectra",
    "scale_model_intruders": "spectra",
    "SweepCache": "sweeps",
    "SweepCacheError": "sweeps",
    "SweepFailed": "sweeps",
    "SweepPoint": "sweeps",
    "SweepResult": "sweeps",
    "full_point": "sweeps",
    "grid": "sweeps",
    "sweep": "sweeps",
    "TASKS": "tasks",
    "Task": "tasks",
    "get_task": "tasks",
    "TrainingDiverged": "training",
    "TrainResult": "training",
    "train": "training",
    "DoRALinear": "variants.dora",
    "threads": "threads",  # the module itself
}

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


def __getattr__(name: str) -> object:
    """Import a public name's module on first use (then keep the name here).

    A submodule works too, as it did when `import lab` loaded everything: `lab.plots`.
    """
    if name not in _WHERE:
        if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module 'lab' has no attribute {name!r}")
        return importlib.import_module(f".{name}", __name__)
    module, _, attribute = _WHERE[name].partition(":")
    loaded = importlib.import_module(f".{module}", __name__)
    value = loaded if name == module else getattr(loaded, attribute or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
