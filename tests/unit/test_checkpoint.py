"""The commit protocol without a model: a stand-in engine writes one shard file per save."""

from __future__ import annotations

import json

import pytest

from mmrope.train.checkpoint import LATEST, MANIFEST, CheckpointManager


class FakeEngine:
    def __init__(self, fail: bool = False):
        self.fail = fail

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = False) -> None:
        if self.fail:
            raise OSError("disk full")
        from pathlib import Path

        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / "shard.pt").write_text("x")


def names(paths) -> list[str]:
    return [p.name for p in paths]


def save(ckpt: CheckpointManager, step: int, engine=None):
    return ckpt.save(engine or FakeEngine(), step, fingerprint={"rope.name": "mrope"}, rank_state={})


def test_retention_keeps_the_last_n_and_the_pointer(tmp_path):
    ckpt = CheckpointManager(tmp_path, rank=0, world_size=1, keep_last=2)
    for step in range(1, 5):
        save(ckpt, step)
    assert names(ckpt.committed()) == ["step_3", "step_4"]
    assert (tmp_path / LATEST).read_text() == "step_4" and ckpt.latest().name == "step_4"
    manifest = json.loads((tmp_path / "step_4" / MANIFEST).read_text())
    assert manifest["step"] == 4 and "shard.pt" in manifest["files"] and "rank_0.pt" in manifest["files"]

    # A pointer naming an older step (e.g. rolled back by hand) is never deleted by retention.
    ckpt.keep_last = 1
    (tmp_path / LATEST).write_text("step_3")
    ckpt._retain()
    assert names(ckpt.committed()) == ["step_3", "step_4"]


def test_uncommitted_folders_are_never_loaded(tmp_path):
    ckpt = CheckpointManager(tmp_path, rank=0, world_size=1)
    save(ckpt, 1)
    # A staged folder, even with a manifest (crash before the rename), is not a checkpoint.
    staged = tmp_path / "step_2.tmp"
    staged.mkdir()
    (staged / MANIFEST).write_text(json.dumps({"step": 2}))
    # A renamed folder without a manifest (cannot happen via save(), but e.g. a partial copy) neither.
    (tmp_path / "step_3").mkdir()
    assert ckpt.latest().name == "step_1"
    # A committed folder newer than the pointer (crash between rename and pointer update) is resumed from.
    (tmp_path / "step_4").mkdir()
    (tmp_path / "step_4" / MANIFEST).write_text(json.dumps({"step": 4}))
    assert ckpt.pointer().name == "step_1" and ckpt.latest().name == "step_4"
    # Saving again cleans the staging leftover of the same step.
    save(ckpt, 2)
    assert not staged.exists() and ckpt.latest().name == "step_4" and ckpt.pointer().name == "step_2"


def test_staging_failure_commits_nothing(tmp_path):
    ckpt = CheckpointManager(tmp_path, rank=0, world_size=1)
    save(ckpt, 1)
    with pytest.raises(RuntimeError, match="nothing was committed"):
        save(ckpt, 2, FakeEngine(fail=True))
    assert names(ckpt.committed()) == ["step_1"] and ckpt.latest().name == "step_1"


def test_incompatible_config_names_the_key(tmp_path):
    ckpt = CheckpointManager(tmp_path, rank=0, world_size=1)
    path = save(ckpt, 1)
    assert ckpt.check_compatible(path, {"rope.name": "mrope"})["step"] == 1
    with pytest.raises(ValueError, match=r"config key `rope.name`"):
        ckpt.check_compatible(path, {"rope.name": "vanilla"})
    # Another world size is compatible (resumed through a universal checkpoint): the manifest says which.
    manifest = CheckpointManager(tmp_path, rank=0, world_size=2).check_compatible(
        path, {"rope.name": "mrope"}
    )
    assert manifest["world_size"] == 1
