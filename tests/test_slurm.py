"""The pipeline on a real (single-node) Slurm cluster through snakemake-executor-plugin-slurm.

tests/slurm/start_slurm.sh starts munged, slurmctld and slurmd for this host (2 CPUs, one GPU declared
without a device, partitions "cpu" and "gpu"); the test then runs the corpus -> subject model ->
activation cache chain at tiny size twice, side by side: with `--profile workflow/profiles/slurm`
(every job an `sbatch` job) and with `--profile workflow/profiles/local`. It checks that each job went
through the scheduler (job ids printed by the executor; `scontrol show job` records naming the rule,
the partition and the GPU request the profile chose; `sacct --completion` lines of the job-completion
log) and that both runs wrote the same outputs (byte-identical files; JSON equal up to wall times).

Skipped only when the Slurm or munge programs are missing (`.ci/slurm_setup.sh` installs them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, tiny_documents, tiny_experiment_config

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SLURM_PROGRAMS = ["slurmctld", "slurmd", "sbatch", "srun", "squeue", "sacct", "scontrol", "sinfo", "munged", "mungekey", "munge", "unmunge"]
MISSING_PROGRAMS = [program for program in SLURM_PROGRAMS if shutil.which(program) is None]
if MISSING_PROGRAMS:
    pytest.skip(f"Slurm/munge not installed (missing {', '.join(MISSING_PROGRAMS)}); run .ci/slurm_setup.sh", allow_module_level=True)

START_SLURM = REPO_ROOT / "tests" / "slurm" / "start_slurm.sh"
TARGET = "results/lm/cache/manifest.json"
# rule -> (partition the slurm profile must pick, whether the job must request a GPU)
EXPECTED_JOBS = {"export_corpus": ("cpu", False), "train_subject_model": ("cpu", False), "cache": ("gpu", True)}
SNAKEMAKE_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """Environment for Slurm clients of a freshly started single-node cluster; stops it afterwards."""
    state = tmp_path_factory.mktemp("slurm_state")
    started = subprocess.run(["bash", str(START_SLURM), str(state)], capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        subprocess.run(["bash", str(START_SLURM), "--stop", str(state)], capture_output=True, timeout=60)
        pytest.fail(f"could not start Slurm (tests/slurm/start_slurm.sh):\n{started.stdout}\n{started.stderr}")
    env = dict(os.environ, SLURM_CONF=str(state / "slurm.conf"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    yield env
    stopped = subprocess.run(["bash", str(START_SLURM), "--stop", str(state)], capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0, stopped.stderr


def tiny_config(corpus_file: Path) -> dict:
    """The tiny experiment with the corpus, subject model and cache shrunk to seconds on CPU."""
    config = tiny_experiment_config()
    config["results_dir"] = "results"
    config["corpus"].update(source="text_files", text_files=[str(corpus_file)], max_documents=None, heldout_fraction=0.1)
    config["subject_model"]["hook_name"] = "blocks.1.hook_resid_post"
    config["subject_model"]["train"].update(
        vocab_size=300, d_model=32, n_layers=2, n_heads=2, d_mlp=64, context_size=16, batch_size=8, steps=20, warmup_steps=2, device="cpu"
    )
    config["cache"].update(context_size=16, max_tokens=2048, batch_size=8, dtype="float16", rows_per_shard=512, device="cpu")
    return config


def make_workdir(folder: Path, corpus_file: Path) -> Path:
    """A working directory holding the tiny config (results_dir "results" inside it)."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(tiny_config(corpus_file), sort_keys=False))
    return folder


class SnakemakeRun:
    """The repository's Snakefile run for TARGET in `workdir` with a profile, in the background
    (output to `workdir/snakemake.out`), so the slurm and local runs overlap."""

    def __init__(self, workdir: Path, profile: str, extra: list[str], env: dict):
        command = [
            sys.executable, "-m", "snakemake",
            "--snakefile", str(REPO_ROOT / "Snakefile"),
            "--directory", str(workdir),
            "--configfile", str(workdir / "config.yaml"),
            "--profile", str(REPO_ROOT / "workflow" / "profiles" / profile),
            *extra,
            TARGET,
        ]  # fmt: skip
        self.profile, self.env, self.output_path = profile, env, workdir / "snakemake.out"
        self.started = time.monotonic()
        with self.output_path.open("w") as output:
            self.process = subprocess.Popen(command, cwd=workdir, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)

    def wait(self) -> str:
        """Wait for the run (at most SNAKEMAKE_TIMEOUT_S from its start); returns its output."""
        try:
            self.process.wait(timeout=max(1.0, SNAKEMAKE_TIMEOUT_S - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            queue = subprocess.run(["squeue", "--states=all", "--format=%i %j %P %T %r %k"], env=self.env, capture_output=True, text=True)
            pytest.fail(f"snakemake --profile {self.profile} ran over {SNAKEMAKE_TIMEOUT_S} s; squeue:\n{queue.stdout}{queue.stderr}\n{self.output_path.read_text()[-6000:]}")
        output = self.output_path.read_text()
        assert self.process.returncode == 0, f"snakemake --profile {self.profile} failed:\n{output[-8000:]}"
        return output


def scontrol_job(job_id: str, env: dict) -> dict[str, str]:
    """`scontrol show job` fields of one job (kept by slurmctld for MinJobAge after it ends)."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True, check=True)
    return dict(re.findall(r"(\S+?)=(\S*)", shown.stdout))


def comparable(path: Path):
    """What must agree between the two runs: the file's bytes, or for JSON the parsed value without
    wall times (both runs use the same config and relative results_dir, so paths agree)."""
    if path.suffix != ".json":
        return path.read_bytes()

    def without_wall_time(value):
        if isinstance(value, dict):
            return {key: without_wall_time(item) for key, item in value.items() if key != "wall_time_s"}
        if isinstance(value, list):
            return [without_wall_time(item) for item in value]
        return value

    return without_wall_time(json.loads(path.read_text()))


def output_files(results: Path) -> dict[str, Path]:
    """Every output file under a results folder except the stage logs (they hold timestamps)."""
    return {str(path.relative_to(results)): path for path in sorted(results.rglob("*")) if path.is_file() and "logs" not in path.relative_to(results).parts}


def test_pipeline_through_slurm_matches_local_run(tmp_path, slurm_env):
    corpus_file = tmp_path / "corpus.txt"  # one document per blank-line block
    corpus_file.write_text("\n\n".join(tiny_documents()) + "\n")
    slurm_workdir = make_workdir(tmp_path / "slurm", corpus_file)
    local_workdir = make_workdir(tmp_path / "local", corpus_file)
    slurm_run = SnakemakeRun(
        slurm_workdir,
        "slurm",
        # The test cluster has no accounting database: poll job states with squeue, no account.
        ["--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1", "--slurm-no-account", "--latency-wait", "10"],
        slurm_env,
    )
    local_run = SnakemakeRun(local_workdir, "local", ["--cores", "2"], slurm_env)
    slurm_output, local_output = slurm_run.wait(), local_run.wait()

    job_ids = re.findall(r"submitted with SLURM jobid (\d+)", slurm_output)
    assert len(job_ids) == len(EXPECTED_JOBS), slurm_output[-4000:]

    jobs_by_rule = {}
    for job_id in job_ids:
        fields = scontrol_job(job_id, slurm_env)
        rule = fields["Comment"].removeprefix("rule_").split("_wildcards_")[0]
        jobs_by_rule[rule] = job_id
        partition, wants_gpu = EXPECTED_JOBS[rule]
        assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", fields
        assert fields["Partition"] == partition, (rule, fields["Partition"])
        assert ("gres:gpu:1" in fields.get("TresPerJob", "")) == wants_gpu, (rule, fields.get("TresPerJob"))
        assert Path(fields["WorkDir"]) == slurm_workdir
        # per-job scheduler log kept by the profile (slurm-keep-successful-logs)
        assert (slurm_workdir / ".snakemake" / "slurm_logs" / f"rule_{rule}" / f"{job_id}.log").is_file()
        print(f"job {job_id}: rule {rule}, partition {fields['Partition']}, TresPerJob={fields.get('TresPerJob')}, CPUs/Task={fields['CPUs/Task']}")
    assert set(jobs_by_rule) == set(EXPECTED_JOBS)

    # The job-completion log, read through sacct, lists every job as completed.
    sacct = subprocess.run(
        ["sacct", "--completion", "--parsable2", "--noheader", "--format=JobID,JobName,Partition,NodeList,State,ExitCode,Start,End,Elapsed"],
        env=slurm_env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    sacct_rows = {line.split("|")[0]: line.split("|") for line in sacct.stdout.splitlines() if line}
    for rule, job_id in jobs_by_rule.items():
        assert sacct_rows[job_id][2] == EXPECTED_JOBS[rule][0] and sacct_rows[job_id][4:6] == ["COMPLETED", "0:0"], sacct_rows.get(job_id)
    print("sacct --completion:\n" + sacct.stdout)

    assert "submitted with SLURM jobid" not in local_output

    slurm_files = output_files(slurm_workdir / "results")
    local_files = output_files(local_workdir / "results")
    assert set(slurm_files) == set(local_files)
    assert "lm/subject_model/model.safetensors" in slurm_files and any(name.startswith("lm/cache/shards/") for name in slurm_files)
    for name in slurm_files:
        assert comparable(slurm_files[name]) == comparable(local_files[name]), name
