"""``python -m robustsweep.compare cells``: bit-identical or not, cell by cell (timings excepted)."""

from __future__ import annotations

import logging
from pathlib import Path

from robustsweep.compare import main

HEADER = ("run_id,cell_id,suspect,asr,job_s,model.name,data.name,prune.method,attack.name,sparsity,"
          "epsilon,seed\n")


def _csv(path: Path, asr: str, job_s: str) -> Path:
    path.write_text(HEADER + f"r1,c1,,{asr},{job_s},small_cnn,digits,l1_unstructured,fgsm,0.5,0.1,0\n")
    return path


def test_cells_equal_but_for_timings_pass_and_a_changed_metric_fails(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    a = _csv(tmp_path / "a.csv", "0.4166666666666667", "3.1")
    assert main(["cells", str(a), str(_csv(tmp_path / "b.csv", "0.4166666666666667", "9.9"))]) == 0
    assert main(["cells", str(a), str(_csv(tmp_path / "c.csv", "0.41666666666666674", "3.1"))]) == 1
    assert "asr" in caplog.text and "DIFFERS in 1 cells" in caplog.text
