"""The LoRA doctor's checks; `lab.diagnosis` is its public face (`lab.doctor`, `lab.doctor_report`).

- findings.py: what a check reports (a Finding with its code and hint) and the report it makes;
- model_checks.py: the checks on a model with adapters (targets, frozen base, scaling, init);
- adapter_file_checks.py: the checks on a saved adapter file against its model;
- lr_evidence.py: the learning rate judged by the shipped grids' runs of the same flavour.
"""
