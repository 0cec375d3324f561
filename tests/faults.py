"""Fault injection for CLI tests (imported by the job process through a Hydra callback).

``+hydra.callbacks.faults._target_=tests.faults.Faults`` registers attack ``fault``: FGSM, except
that at ``attack.fault_eps`` it performs the fault named by the environment variable
``ROBUSTSWEEP_TEST_FAULT`` in the middle of the cell (after its MLflow run started): raise | exit |
interrupt (SIGINT to itself, as Ctrl-C) | kill (SIGKILL to itself) | hang (sleeps 300 s: a cell
that is still computing when its launcher is killed) | slow (sleeps 10 s: a cell others wait for).
With ``ROBUSTSWEEP_TEST_FAULT_FROM_JOB=N`` the fault strikes instead in every job numbered N or later
(Hydra's ``job.num``; a search's trial number): "kill the sweep mid-cell after N finished cells"
with cells that otherwise take a second, not a slow attack on every cell.
At the end of a multirun, ``summary_oserror`` and ``summary_interrupt`` make the sweep summary fail
(a full disk) or be interrupted (Ctrl-C). The environment, not the config, chooses the fault, so a
relaunch without it has the same cells.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from hydra.experimental.callback import Callback

from robustsweep.steps.attacks import fgsm, register_attack


@register_attack("fault")
def fault(model: Any, eps: float, fault_eps: float = -1.0, **_: object):
    inner = fgsm(model, eps)
    fault = os.environ.get("ROBUSTSWEEP_TEST_FAULT", "")

    from_job = os.environ.get("ROBUSTSWEEP_TEST_FAULT_FROM_JOB")
    if from_job:
        from hydra.core.hydra_config import HydraConfig

        strikes = int(HydraConfig.get().job.num) >= int(from_job)
    else:
        strikes = abs(eps - fault_eps) < 1e-9

    def attack(x, y):
        if strikes:
            if fault == "raise":
                raise RuntimeError("injected fault")
            if fault == "exit":
                sys.exit(3)
            if fault == "interrupt":
                # Ctrl-C in a terminal reaches Python's own handler; a job launched in the background
                # (nohup ... &) starts with SIGINT ignored and would never see it: install the handler
                signal.signal(signal.SIGINT, signal.default_int_handler)
                os.kill(os.getpid(), signal.SIGINT)
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if fault == "hang":
                time.sleep(300)
            if fault == "slow":
                time.sleep(10)
        return inner(x, y)
    return attack


class Faults(Callback):
    """Importing this module registers the attack in every Hydra process. Hydra calls the ``*_end``
    callbacks in reverse order, so this one (added last) runs before the sweep summary's."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        import robustsweep.summary

        fault = os.environ.get("ROBUSTSWEEP_TEST_FAULT", "")

        def broken(*args: Any, **kw: Any) -> Any:
            if fault == "summary_oserror":
                raise OSError(28, "No space left on device")
            raise KeyboardInterrupt

        if fault in ("summary_oserror", "summary_interrupt"):
            robustsweep.summary.write_summary = broken
