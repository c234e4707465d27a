"""The sweep explorer's parts; `lab.widgets` is its public face (`lab.widgets.sweep_explorer`).

- choices.py: what the controls offer (ranks, targets, flavours from the registry) and the point
  a setting of them names;
- estimates.py: how long a run will take, learned from the last runs on this machine;
- plots.py: the figures the explorer draws from the cache and the shipped grids.
"""
