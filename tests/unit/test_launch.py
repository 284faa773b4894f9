"""Launchers: the Hydra SLURM/local launcher configs compose, the sbatch they render and launch/slurm.sbatch
ask for requeue and an early signal with one task per GPU, and every launch script parses."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mmrope.train.config import register_configs, validate
from tests.conftest import ROOT

CONFIGS = ROOT / "configs"
LAUNCH = ROOT / "launch"
register_configs()


def compose_with_hydra(overrides: list[str], return_hydra_config: bool = True):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=return_hydra_config)


def test_slurm_launcher_submission_parameters():
    cfg = compose_with_hydra(["hydra/launcher=slurm", "rope=mrope_i"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (1, 8, 8)
    assert launcher.signal_delay_s == 120 and launcher.max_num_timeout > 0
    assert (
        launcher.additional_parameters.signal == "USR1@120"
    )  # the trainer saves on USR1, not submitit's USR2
    assert launcher.additional_parameters.requeue is True
    assert "partition" in launcher  # placeholder: hydra.launcher.partition=...
    # every task joins the torch.distributed group from its SLURM ids, resolved inside the task
    env_set = OmegaConf.to_container(cfg.hydra.job.env_set)
    assert env_set == {
        "RANK": "${oc.env:SLURM_PROCID,0}",
        "LOCAL_RANK": "${oc.env:SLURM_LOCALID,0}",
        "WORLD_SIZE": "${oc.env:SLURM_NTASKS,1}",
    }
    assert any("MASTER_ADDR" in line for line in launcher.setup)
    # the task config is untouched by the launcher choice and still validates
    assert (
        validate(compose_with_hydra(["hydra/launcher=slurm", "rope=mrope_i"], False)).rope.name == "mrope_i"
    )


def test_slurm_launcher_renders_the_expected_sbatch(tmp_path, monkeypatch):
    """Feed the launcher's parameters to submitit exactly as hydra-submitit-launcher does, render the script."""
    import submitit
    from submitit.slurm.slurm import SlurmExecutor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # pretend `srun` is installed
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = OmegaConf.to_container(
        compose_with_hydra(["hydra/launcher=slurm"]).hydra.launcher, resolve=False
    )
    params["additional_parameters"]["signal"] = f"USR1@{params['signal_delay_s']}"  # the one interpolation
    for key in ("_target_", "submitit_folder", "name"):
        params.pop(key)
    max_num_timeout = params.pop("max_num_timeout")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm", slurm_max_num_timeout=max_num_timeout)
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    text = executor._executor._make_submission_file_text("python train.py", "uid")
    assert re.search(r"^#SBATCH --signal=USR1@120$", text, re.M), text
    assert "#SBATCH --requeue" in text
    assert "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --gpus-per-node=8" in text
    assert "#SBATCH --nodes=1" in text and "#SBATCH --time=1440" in text
    assert "export MASTER_ADDR=$(scontrol show hostnames" in text
    assert executor._executor.max_num_timeout == max_num_timeout > 0


def test_local_launcher_composes():
    launcher = compose_with_hydra(["hydra/launcher=local"]).hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.LocalLauncher")
    assert launcher.tasks_per_node == 1


def test_sweep_settings_keep_plain_runs_and_name_sweep_runs():
    hydra_cfg = compose_with_hydra([]).hydra
    params = hydra_cfg.sweeper.params  # applied by the sweeper to every multirun job, never to a plain run
    assert OmegaConf.to_container(params, resolve=False)["trainer.run_name"].endswith(
        "${hydra:job.override_dirname}"
    )
    assert set(params) >= {"trainer.output_dir", "trainer.run_name", "trainer.wandb.group", "hydra.sweep.dir"}
    sweep = OmegaConf.to_container(OmegaConf.load(CONFIGS / "train.yaml").hydra.sweep)
    assert sweep["subdir"] == "${hydra.job.override_dirname}"
    excluded = set(hydra_cfg.job.config.override_dirname.exclude_keys)
    assert {"trainer.run_name", "trainer.output_dir", "trainer.wandb.group"} <= excluded
    assert validate(compose_with_hydra(["rope=vanilla"], False)).trainer.run_name == "tiny-default"


def test_sbatch_template():
    text = (LAUNCH / "slurm.sbatch").read_text()
    directives = dict(
        re.match(r"#SBATCH --([\w-]+)(?:=(\S+))?", line).groups()
        for line in text.splitlines()
        if line.startswith("#SBATCH ")
    )
    assert "requeue" in directives
    assert directives["signal"] == "USR1@120"  # every task (no "B:"), two minutes ahead of the limit
    assert directives["ntasks-per-node"] == directives["gpus-per-node"] == "8"  # one task per GPU
    assert "RANK=$SLURM_PROCID" in text and "LOCAL_RANK=$SLURM_LOCALID" in text
    assert "WORLD_SIZE=$SLURM_NTASKS" in text and "MASTER_ADDR" in text
    assert 'trainer.run_name="$SLURM_JOB_NAME"' in text  # run name from the job name ...
    assert "date" not in text and "%Y" not in text  # ... never a timestamp
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert re.search(r"srun\b", text)


@pytest.mark.parametrize("script", sorted(p.name for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch")))
def test_launch_scripts_parse(script):
    path = LAUNCH / script
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert path.read_text().startswith("#!/usr/bin/env bash")
    assert path.stat().st_mode & 0o111, f"{script} is not executable"


def test_multinode_script_names_what_is_missing(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    proc = subprocess.run(["bash", str(LAUNCH / "multinode.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "MASTER_ADDR" in proc.stderr


def test_hostfile_example_parses_with_deepspeed():
    from deepspeed.launcher.runner import _parse_hostfile

    lines = Path(LAUNCH / "hostfile.example").read_text().splitlines()
    assert _parse_hostfile(lines) == {"node-0": 8, "node-1": 8}


def test_make_help_lists_every_target_as_written():
    """`make help` greps the Makefile's `## ...` comments: they are printed as written, so `$$` shows as `$$`."""
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    targets = re.findall(r"^([a-zA-Z_-]+):.*?## ", (ROOT / "Makefile").read_text(), flags=re.M)
    assert [line.split()[1] for line in out.splitlines()] == targets
    assert "$$" not in out and "-> $OUT" in out


def test_dataloader_workers_are_capped_to_the_cores_the_slots_split_over():
    """More DataLoader workers than cores only compete (torch warns, twice per run): the count is capped to the
    largest one <= cores that the virtual slots split evenly over, with a note; torch then does not warn."""
    import warnings

    import torch

    from mmrope.train.run import available_cores, fit_workers

    notes = []
    assert fit_workers(4, 8, 1, notes.append, cores=2) == 2 and "data.num_workers=4 > 2 CPU cores" in notes[0]
    assert (
        fit_workers(8, 12, 2, notes.append, cores=5) == 3
    )  # 12 slots over 2 ranks x 3 workers (4 does not fit)
    assert fit_workers(6, None, 1, notes.append, cores=4) == 4  # one slot per consumer: any count fits
    assert fit_workers(2, 8, 1, notes.append, cores=16) == 2 and len(notes) == 3  # within the cores: as asked
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "This DataLoader will create N worker processes" warning
        torch.utils.data.DataLoader(
            range(4), num_workers=fit_workers(available_cores() + 3, None, 1, notes.append)
        )
