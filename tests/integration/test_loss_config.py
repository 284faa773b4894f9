"""`loss.chunk_size` from the command line reaches the trainer's loss (train.py's path: compose -> validate ->
build_session), one process on CPU under ZeRO-2: a training step walks the supervised rows in chunks of that size.
"""

from __future__ import annotations

import pytest

from tests.conftest import ROOT, tiny_overrides
from tests.unit.model.test_objective_loss import LMHeadMatmulRows

pytestmark = pytest.mark.slow


def compose_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from mmrope.train.config import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return validate(compose("train", overrides=overrides))


def test_loss_chunk_size_reaches_the_training_step(tmp_path, cache_dir):
    from data.pixels import to_device
    from mmrope.model.objective import num_supervised
    from mmrope.train.run import build_session

    overrides = ("trainer.run_name=chunks", "trainer.resume=never", "loss.chunk_size=5")
    s = build_session(compose_cfg(tiny_overrides(cache_dir, tmp_path, *overrides)))
    try:
        objective = s.engine.module
        assert (objective.loss_backend, objective.loss_chunk_size) == ("chunked", 5)
        row = next(s.trainer.rows)  # the trainer's own stream, and its forward call (mmrope.train.loop)
        n = num_supervised(row)
        assert n > 10
        with LMHeadMatmulRows(objective.vlm.lm_head.weight) as seen:
            s.engine(to_device(row, s.dist.device), num_global_tokens=float(n))
        assert seen.rows == [5] * (n // 5) + ([n % 5] if n % 5 else [])
    finally:
        s.metrics.close()
