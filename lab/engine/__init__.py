"""The sweep engine: points, results, the cache and its locks, planning, training, Ray, calibration.

Nothing is imported here: `import lab.engine.points` loads only what points need. The public
face is lab.sweeps (`lab.sweep`); docs/architecture.md maps the files.
"""
