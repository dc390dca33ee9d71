"""GPU slots on CPU: real processes compete for simulated devices (``SAE_PIPELINE_GPUS`` or a user's
``CUDA_VISIBLE_DEVICES``), with real flock locks; no GPU needed."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sae_pipeline.runtime import gpu_slots
from sae_pipeline.runtime.gpu_slots import GpuSlotError, gpu_slot, gpu_slot_for, parse_device_list, parse_nvidia_smi_list, slot_lock_path

REPO_ROOT = Path(__file__).resolve().parent.parent
OWN_ENV = ("CUDA_VISIBLE_DEVICES", "SAE_PIPELINE_GPUS", "SAE_PIPELINE_GPU_WAIT_S", "SAE_PIPELINE_GPU_LOCK_DIR")
GPU_SCRIPTS = ("cache.py", "train.py", "steer.py", "evaluate.py", "autointerp.py", "match.py")

# A job: takes a slot, reports what it got in <signals>/<label>.json, holds it until <signals>/release-<label>
# exists, then prints CUDA_VISIBLE_DEVICES as restored after the block.
JOB = textwrap.dedent(
    """
    import json, logging, os, sys, time
    from pathlib import Path
    from sae_pipeline.runtime.gpu_slots import gpu_slot

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    lock_dir, label, wait_s, signals = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    with gpu_slot(lock_dir, label, wait_s=None if wait_s == "default" else float(wait_s), poll_s=0.05) as device:
        report = {"device": device, "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid()}
        (signals / f"{label}.tmp").write_text(json.dumps(report))
        (signals / f"{label}.tmp").rename(signals / f"{label}.json")
        deadline = time.monotonic() + 60
        while not (signals / f"release-{label}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    print(json.dumps({"visible_after": os.environ.get("CUDA_VISIBLE_DEVICES")}))
    """
)


def clean_environment(**settings: str) -> dict[str, str]:
    """This process's environment without SLURM and GPU settings, plus ``settings``."""
    environment = {key: value for key, value in os.environ.items() if key not in OWN_ENV and not key.startswith("SLURM_")}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    environment.update(settings)
    return environment


class Job:
    """One job process holding (or waiting for) a GPU slot."""

    def __init__(self, tmp_path: Path, label: str, environment: dict[str, str], wait_s: float | str = 0):
        self.label = label
        self.signals = tmp_path / "signals"
        self.signals.mkdir(exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-c", JOB, str(tmp_path / "locks"), label, str(wait_s), str(self.signals)],
            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.stdout = self.stderr = ""

    def held(self, timeout_s: float = 30) -> dict:
        """What the job got once it holds its slot."""
        report = self.signals / f"{self.label}.json"
        deadline = time.monotonic() + timeout_s
        while not report.exists():
            assert self.process.poll() is None, f"job {self.label} exited: {self.process.communicate()}"
            assert time.monotonic() < deadline, f"job {self.label} got no slot within {timeout_s} s"
            time.sleep(0.02)
        return json.loads(report.read_text())

    def holds(self) -> bool:
        return (self.signals / f"{self.label}.json").exists()

    def release(self) -> None:
        (self.signals / f"release-{self.label}").touch()

    def finish(self, timeout_s: float = 30) -> int:
        self.stdout, self.stderr = self.process.communicate(timeout=timeout_s)
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


@pytest.fixture
def jobs(tmp_path):
    """Start jobs with ``jobs(label, environment, wait_s)``; any still running at the end are killed."""
    started: list[Job] = []

    def start(label: str, environment: dict[str, str], wait_s: float | str = 0) -> Job:
        started.append(Job(tmp_path, label, environment, wait_s))
        return started[-1]

    yield start
    for job in started:
        job.kill()


@pytest.fixture
def no_gpu_settings(monkeypatch):
    """This process's environment without SLURM and GPU settings (restored after the test)."""
    for key in list(os.environ):
        if key in OWN_ENV or key.startswith("SLURM_"):
            monkeypatch.delenv(key)


def test_four_concurrent_jobs_get_four_distinct_devices(tmp_path, jobs):
    environment = clean_environment(SAE_PIPELINE_GPUS="0,1,2,3")
    started = [jobs(f"job{index}", environment) for index in range(4)]
    reports = [job.held() for job in started]  # all four hold their slot at the same time
    assert sorted(report["device"] for report in reports) == ["0", "1", "2", "3"]
    assert all(report["visible"] == report["device"] for report in reports)
    for job in started:
        job.release()
    for job in started:
        assert job.finish() == 0, job.stderr
        assert json.loads(job.stdout)["visible_after"] is None  # the job's environment is restored


def test_a_killed_job_frees_its_slot(tmp_path, jobs):
    environment = clean_environment(SAE_PIPELINE_GPUS="0,1")
    killed, other = jobs("killed", environment), jobs("other", environment)
    killed_device = killed.held()["device"]
    assert other.held()["device"] != killed_device
    killed.process.send_signal(signal.SIGKILL)
    killed.process.wait(timeout=30)
    lock = slot_lock_path(tmp_path / "locks", killed_device)
    assert f"pid {killed.process.pid}" in lock.read_text()  # the killed job's lock file is still there ...
    successor = jobs("successor", environment, wait_s=0)
    assert successor.held()["device"] == killed_device  # ... and does not block: no waiting allowed here
    successor.release()
    other.release()
    assert successor.finish() == 0, successor.stderr


def test_the_users_visible_devices_are_the_only_ones_used(tmp_path, jobs):
    environment = clean_environment(CUDA_VISIBLE_DEVICES="2,5")
    first, second = jobs("first", environment), jobs("second", environment)
    assert sorted([first.held()["device"], second.held()["device"]]) == ["2", "5"]
    assert sorted(path.name for path in slot_lock_path(tmp_path / "locks", "2").parent.iterdir()) == ["gpu2.lock", "gpu5.lock"]
    third = jobs("third", environment, wait_s=0)
    assert third.finish() != 0 and "GpuSlotError" in third.stderr  # no device outside the user's two
    first.release()
    assert first.finish() == 0, first.stderr
    assert json.loads(first.stdout)["visible_after"] == "2,5"  # the user's setting is restored after the block


def test_a_job_beyond_the_device_count_waits_for_a_freed_slot(tmp_path, jobs):
    environment = clean_environment(SAE_PIPELINE_GPUS="0,1")
    first, second = jobs("first", environment), jobs("second", environment)
    first_device, second_device = first.held()["device"], second.held()["device"]
    third = jobs("third", environment, wait_s=60)
    time.sleep(1.0)
    assert third.process.poll() is None and not third.holds()  # waiting, not sharing a busy device
    first.release()
    assert third.held()["device"] == first_device
    third.release()
    second.release()
    assert third.finish() == 0, third.stderr
    waiting_message = next(line for line in third.stderr.splitlines() if "waits for a GPU" in line)
    assert "--resources gpu= exceeds the 2 device(s)" in waiting_message
    assert f"GPU {first_device}: pid {first.process.pid}" in waiting_message and "job first" in waiting_message
    assert f"GPU {second_device}: pid {second.process.pid}" in waiting_message and "job second" in waiting_message


def test_a_job_beyond_the_device_count_fails_clearly_after_the_wait(tmp_path, jobs):
    environment = clean_environment(SAE_PIPELINE_GPUS="0", SAE_PIPELINE_GPU_WAIT_S="0.5")
    holder = jobs("holder", environment)
    holder.held()
    started = time.monotonic()
    late = jobs("late", environment, wait_s="default")  # the wait comes from SAE_PIPELINE_GPU_WAIT_S
    assert late.finish() != 0
    assert time.monotonic() - started >= 0.5
    error = late.stderr.strip().splitlines()[-1]
    assert error.startswith("sae_pipeline.runtime.gpu_slots.GpuSlotError: no GPU free for job late after waiting 0.5 s")
    assert f"GPU 0: pid {holder.process.pid}" in error and "job holder" in error
    assert "run with --resources gpu=1" in error


def test_slurm_assigned_gpus_are_left_alone(tmp_path, no_gpu_settings, monkeypatch):
    monkeypatch.setenv("SAE_PIPELINE_GPUS", "0,1")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with gpu_slot(tmp_path / "locks", "job") as device:
        assert device is None
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("SLURM_STEP_GPUS", "3")
    with gpu_slot(tmp_path / "locks", "job") as device:
        assert device is None
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert not (tmp_path / "locks").exists()


@pytest.mark.parametrize("setting", [{"SAE_PIPELINE_GPUS": ""}, {"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": "-1"}])
def test_no_devices_changes_nothing(tmp_path, no_gpu_settings, monkeypatch, setting):
    for key, value in setting.items():
        monkeypatch.setenv(key, value)
    with gpu_slot(tmp_path / "locks", "job") as device:
        assert device is None
        assert os.environ.get("CUDA_VISIBLE_DEVICES") == setting.get("CUDA_VISIBLE_DEVICES")
    assert not (tmp_path / "locks").exists()


def fake_nvidia_smi(folder: Path, output: str, exit_code: int = 0) -> str:
    """A PATH on which ``nvidia-smi`` prints ``output`` and exits with ``exit_code``."""
    folder.mkdir()
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\nexit {exit_code}\n")
    script.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"


def test_devices_from_nvidia_smi(tmp_path, no_gpu_settings, monkeypatch):
    listing = "\n".join(f"GPU {index}: NVIDIA H200 (UUID: GPU-{index}aaa)" for index in range(3))
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path / "bin", listing))
    assert gpu_slots.discover_devices().ids == ("0", "1", "2")
    with gpu_slot(tmp_path / "locks", "job") as device:
        assert device == "0" and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_a_failing_nvidia_smi_means_no_devices(tmp_path, no_gpu_settings, monkeypatch):
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path / "bin", "NVIDIA-SMI has failed: no driver", exit_code=9))
    with gpu_slot(tmp_path / "locks", "job") as device:
        assert device is None and "CUDA_VISIBLE_DEVICES" not in os.environ


def test_parse_device_lists():
    assert parse_device_list(" 0, 1,,3 ") == ["0", "1", "3"]
    assert parse_device_list("GPU-8f2c,MIG-11aa") == ["GPU-8f2c", "MIG-11aa"]
    assert parse_device_list("0,-1,2") == ["0"]
    assert parse_device_list("") == []
    listing = textwrap.dedent(
        """\
        GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5d5ba0d6)
          MIG 1g.5gb      Device  0: (UUID: MIG-c6d4f1ef)
          MIG 1g.5gb      Device  1: (UUID: MIG-cba663e8)
        GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-0e7d1f2a)
        """
    )
    assert parse_nvidia_smi_list(listing) == ["MIG-c6d4f1ef", "MIG-cba663e8", "1"]


def test_cuda_already_initialised_is_refused(tmp_path, no_gpu_settings, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("SAE_PIPELINE_GPUS", "0")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(GpuSlotError, match="already initialised CUDA"):
        with gpu_slot(tmp_path / "locks", "job"):
            pass
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_gpu_slot_for_takes_a_slot_only_for_gpu_rules(tmp_path, no_gpu_settings, monkeypatch):
    class SnakemakeJob:
        """The parts of Snakemake's ``snakemake`` script object that gpu_slot_for reads."""

        def __init__(self, gpu: int):
            self.resources = {"gpu": gpu, "_cores": 1}
            self.config = {"results_dir": str(tmp_path / "results")}
            self.rule = "train"
            self.wildcards = {"variant": "topk", "group": "seeds0-1"}

    monkeypatch.setenv("SAE_PIPELINE_GPUS", "7")
    with gpu_slot_for(SnakemakeJob(gpu=0)) as device:
        assert device is None and "CUDA_VISIBLE_DEVICES" not in os.environ
    with gpu_slot_for(SnakemakeJob(gpu=1)) as device:
        lock = slot_lock_path(tmp_path / "results" / ".gpu_slots", "7")
        assert device == "7" and os.environ["CUDA_VISIBLE_DEVICES"] == "7"
        assert "job train variant=topk group=seeds0-1" in lock.read_text()
    assert list((tmp_path / "results" / ".gpu_slots").glob("*/gpu7.lock")) == [lock]


def test_snakemake_gpu_jobs_run_on_distinct_devices(tmp_path):
    """Through Snakemake itself: four gpu=1 script jobs at once get four devices; a CPU rule none."""
    (tmp_path / "job.py").write_text(
        textwrap.dedent(
            """
            import json, os, time
            from pathlib import Path
            from sae_pipeline.runtime.gpu_slots import gpu_slot_for

            with gpu_slot_for(snakemake) as device:
                Path("held", Path(snakemake.output[0]).stem).touch()
                deadline = time.monotonic() + 60
                while len(list(Path("held").iterdir())) < 5 and time.monotonic() < deadline:
                    time.sleep(0.05)  # every job holds its slot while the others start
                Path(snakemake.output[0]).write_text(json.dumps({"device": device, "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}))
            """
        )
    )
    (tmp_path / "Snakefile").write_text(
        textwrap.dedent(
            """
            rule all:
                input: expand("out/gpu{index}.json", index=range(4)), "out/cpu.json"

            rule gpu_job:
                output: "out/gpu{index}.json"
                wildcard_constraints: index=r"\\d+"
                resources: gpu=1
                script: "job.py"

            rule cpu_job:
                output: "out/cpu.json"
                script: "job.py"
            """
        )
    )
    (tmp_path / "held").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "5", "--resources", "gpu=4", "--config", "results_dir=results", "--quiet"],
        cwd=tmp_path, env=clean_environment(SAE_PIPELINE_GPUS="0,1,2,3"), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    gpu_reports = [json.loads((tmp_path / "out" / f"gpu{index}.json").read_text()) for index in range(4)]
    assert sorted(report["device"] for report in gpu_reports) == ["0", "1", "2", "3"]
    assert all(report["visible"] == report["device"] for report in gpu_reports)
    assert json.loads((tmp_path / "out" / "cpu.json").read_text()) == {"device": None, "visible": None}
    assert len(list(slot_lock_path(tmp_path / "results" / ".gpu_slots", "0").parent.glob("gpu*.lock"))) == 4


def test_gpu_scripts_take_their_slot_before_any_cuda_call():
    """Each GPU stage script enters ``gpu_slot_for`` in its first ``with``, and nothing it runs before
    (its imports) calls into CUDA, which would fix the visible devices before the slot is taken."""
    prelude = []
    for name in GPU_SCRIPTS:
        tree = ast.parse((REPO_ROOT / "workflow" / "scripts" / name).read_text())
        first_with = next(index for index, node in enumerate(tree.body) if isinstance(node, ast.With))
        assert "gpu_slot_for(snakemake)" in ast.unparse(tree.body[first_with].items[-1]), f"{name}: first with lacks gpu_slot_for"
        prelude.extend(ast.unparse(node) for node in tree.body[:first_with])
    probe = textwrap.dedent(
        """
        import torch
        calls = []
        def spy(name, function):
            def called(*args, **kwargs):
                calls.append(name)
                return function(*args, **kwargs)
            return called
        for name in ("is_available", "device_count", "init", "_lazy_init", "current_device", "set_device",
                     "get_device_properties", "get_device_name", "get_device_capability", "is_bf16_supported",
                     "mem_get_info", "synchronize"):
            setattr(torch.cuda, name, spy(name, getattr(torch.cuda, name)))
        """
    ) + "\n".join(prelude) + "\nprint(calls)\n"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, env=clean_environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
