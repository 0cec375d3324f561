"""The steps of one cell, in the order ``pipeline.run`` calls them: data, models (the dense
baseline, trained by an objective), compress, defend, evaluate. Each step is a seam: a registry of
plug-ins chosen by a config group. Steps import ``robustsweep.core`` and earlier steps only."""
