"""One writer of the MLflow store stress test: ``python -m tests.store_worker URI NAME N``.

Opens the store the way every job does (``tracking.setup``: created/migrated under a file lock,
experiment created if missing), starts a run and logs N values of one metric, one call each."""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

from robustsweep.tracking import store as tracking


def main(uri: str, name: str, n: int) -> None:
    cfg = OmegaConf.create({"tracking": {"uri": uri, "experiment": "stress", "artifact_dir": None}})
    exp = tracking.setup(cfg)
    client = tracking.Client(uri)
    run = client.create_run(exp, run_name=name)
    for step in range(n):
        client.log_metric(run.info.run_id, "m", float(step), step=step)
    client.set_terminated(run.info.run_id, "FINISHED")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
