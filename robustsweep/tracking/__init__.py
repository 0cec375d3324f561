"""The tracking layer: the MLflow store (``store``), cell identity (``identity``), sweeps and their
parent runs (``sweep``), one cell's run (``cellrun``), per-process reuse (``reuse``) and the checks
across a sweep's cells (``crosscheck``). Imports ``robustsweep.core`` and ``robustsweep.steps``."""
