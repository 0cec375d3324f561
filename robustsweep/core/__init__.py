"""The bottom layer: errors, parsing, paths, devices, the config schema, registries, guards,
checkpoint IO and progress bars. Nothing here imports another robustsweep module outside
``robustsweep.core`` (tests/test_layers.py enforces it)."""
