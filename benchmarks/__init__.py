"""The lab's benchmarks: measurements of its claims about speed and memory (not part of `lab`).

Run from the repository root as modules, so that they import `lab` (installed) and each other:

    python -m benchmarks.bench [names] [--quick]   # speed and memory, side by side
    python -m benchmarks.gpu                       # the same on a CUDA GPU, in bf16
    python -m benchmarks.tasks                     # accuracy on the lab's tasks
"""
