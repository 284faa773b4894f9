"""Distributed setup housekeeping that needs no process group."""

import os
import time

from mmrope.train.engine import clear_stale_build_locks


def test_only_locks_older_than_a_build_are_removed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    fresh = tmp_path / "py311_cpu" / "cpu_adam" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))

    assert clear_stale_build_locks(max_age_s=900) == [stale]
    assert not stale.exists() and fresh.exists()  # a build under way keeps its lock
    assert str(stale) in capsys.readouterr().out  # never silent
