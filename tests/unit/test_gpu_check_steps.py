"""The GPU check's step runner (tests/gpu/gpu_check.py): a step killed by a signal runs once more, and the
results keep how the first attempt ended; a step that fails by itself is not retried."""

from __future__ import annotations

import sys

from tests.gpu.gpu_check import Check, results_block

# Dies of SIGABRT the first time (no marker file yet), succeeds the second.
ABORT_ONCE = """
import os, signal, sys
marker = sys.argv[1]
if not os.path.exists(marker):
    open(marker, "w").close()
    print("first attempt: aborting", flush=True)
    os.kill(os.getpid(), signal.SIGABRT)
print("second attempt: fine")
"""


def test_a_step_killed_by_a_signal_runs_once_more_and_says_so(tmp_path):
    c = Check(tmp_path, budget_s=60, dry=True)
    code, output = c.run("flaky", [sys.executable, "-c", ABORT_ONCE, str(tmp_path / "marker")], cap_s=30)
    assert code == 0 and "second attempt: fine" in output
    step = c.results["steps"]["flaky"]
    assert step["status"] == "ok"
    assert step["first_attempt"]["status"] == "failed (exit -6)"
    assert "first attempt: aborting" in step["first_attempt"]["output_tail"]
    c.results.update(dry=True, commit="abc", date="today", goals={})
    assert "retried: the first attempt failed (exit -6)" in results_block(c.results, "make gpu-check DRY=1")


def test_a_step_that_exits_with_an_error_is_not_retried(tmp_path):
    c = Check(tmp_path, budget_s=60, dry=True)
    code, _ = c.run(
        "broken", [sys.executable, "-c", "print('ran-' + 'marker'); raise SystemExit(3)"], cap_s=30
    )
    assert code == 3
    step = c.results["steps"]["broken"]
    assert step["status"] == "failed (exit 3)" and "first_attempt" not in step
    assert (tmp_path / "gpu_check.log").read_text().count(
        "ran-marker"
    ) == 2  # the output (once) and its tail under the status line
