"""The steps of one cell: data, models (the dense baseline, trained by an objective), compress,
defend, evaluate -- the order ``pipeline.run`` calls them. Each step is a seam: a registry of
plug-ins chosen by a config group. Steps import ``robustsweep.core`` and steps of an earlier tier
(or their own), where the tiers are the order in which the steps *build on each other*, which is
not quite the call order: attacks are a tool that adversarial training uses before any evaluation.

    0 data   1 models   2 prune, quantize   3 attacks, attack_zoo, bounds, smoothing
    4 train, objectives, channel, hydra   5 compress, defend, efficiency   6 evaluate (and its modules)

(tests/test_layers.py checks it; a registry's lazy import of the modules that register into it,
such as prune's of channel and hydra, is not an import of code it builds on.)"""
