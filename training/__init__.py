"""percept's shared training package.

`training.nets`, `training.perceptual` and `training.assets` are inference-safe (pure torch
and stdlib) and may be imported by the services; everything else here is trainer code.
"""
