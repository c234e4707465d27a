"""LoRA flavours beyond the 2021 layer, one module each, registered by name on import.

A module here builds its layer (a lab.lora.LoRALinear subclass) or its initialisation and
calls lab.config.register_variant / register_init. Every module in this package is imported
when `lab` is, so a new flavour needs no edit anywhere else: sweeps, the batched engine, the
explorer, the CLI, the doctor, adapter files and the shared property tests find it in
lab.config.VARIANTS and lab.config.INITS, through registry.py (which registers no flavour).
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
