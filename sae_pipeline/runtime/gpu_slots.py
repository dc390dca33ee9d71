"""One GPU per local job: each GPU job of a local run holds a slot (one device) for its lifetime.

``snakemake --resources gpu=N`` only counts: it lets N GPU jobs run at once but tells none of them
which device is its own, so without this every job would open the default device and share GPU 0.
A job entering :func:`gpu_slot` takes the first free device, sets ``CUDA_VISIBLE_DEVICES`` to it alone
(before anything in the process touches CUDA) and keeps it until the job ends.

A slot is an ``fcntl.flock`` on one file per device, ``<lock_dir>/<host>/gpu<device>.lock``. The
operating system drops an flock when the process holding it exits, however it exits (SIGKILL and power
cuts included), so a lock can never outlive its job and a rerun never finds a stale one. The files stay
on disk (deleting a lock file while someone may open it is a race); their text, the holder's pid, host
and job, is for diagnostics only. The host folder keeps jobs of several machines sharing one results
folder over a network filesystem apart.

The devices handed out, first match wins:

1. none under SLURM when the scheduler assigned GPUs (``SLURM_JOB_GPUS``/``SLURM_STEP_GPUS``, or
   ``SLURM_JOB_ID`` with ``CUDA_VISIBLE_DEVICES``): its assignment is left alone;
2. ``SAE_PIPELINE_GPUS`` (comma-separated, for tests and odd sites; empty means none);
3. the user's ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs, kept as written; empty means none);
4. the GPUs ``nvidia-smi -L`` lists, as indices 0..N-1 (CUDA numbers them fastest first unless
   ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, nvidia-smi's order; either way N indices are N distinct GPUs);
   a GPU split into MIG instances contributes its instances' ``MIG-...`` UUIDs instead;
5. only when ``nvidia-smi`` is not installed and torch is a CUDA/ROCm build: ``torch.cuda.device_count()``,
   asked in a child process so that this one does not initialise CUDA;
6. else none (a CPU machine): nothing is changed.

With more GPU jobs at once than devices (``--resources gpu=`` larger than the device count) a job finds
every slot taken: it logs which devices are busy and who holds them, waits for one to be freed and,
after ``wait_s`` (default :data:`DEFAULT_WAIT_S`, or ``SAE_PIPELINE_GPU_WAIT_S``), stops with
:class:`GpuSlotError`. Jobs never share a device silently.

This module imports nothing from ``sae_pipeline`` and imports torch only in the fallback of point 5.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ContextManager, Iterator, Mapping, Sequence

logger = logging.getLogger(__name__)

DEVICES_ENV = "SAE_PIPELINE_GPUS"
"""Overrides device discovery: the comma-separated devices to hand out (empty: none)."""
WAIT_ENV = "SAE_PIPELINE_GPU_WAIT_S"
"""Seconds a job waits for a free slot before failing, when ``gpu_slot`` is given no ``wait_s``."""
LOCK_DIR_ENV = "SAE_PIPELINE_GPU_LOCK_DIR"
"""Folder of the slot locks for :func:`gpu_slot_for`, instead of ``<results_dir>/.gpu_slots``."""
DEFAULT_WAIT_S = 600.0
"""Ten minutes: long enough to ride out a job of an earlier run that is still exiting, short enough
that ``--resources gpu=`` larger than the device count shows up as an error early in a run, not hours in."""

VISIBLE_DEVICES_ENV = "CUDA_VISIBLE_DEVICES"
SLURM_GPU_ENVS = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS")


class GpuSlotError(RuntimeError):
    """No GPU slot could be taken: all are busy past the wait, CUDA already started, or locks fail."""


@dataclass(frozen=True)
class Devices:
    """The devices jobs on this host share out, and where that list came from (for messages)."""

    ids: tuple[str, ...]
    source: str


def parse_device_list(value: str) -> list[str]:
    """Entries of a ``CUDA_VISIBLE_DEVICES``-style list, as strings; CUDA ignores everything from the
    first negative entry on (``-1`` hides all devices), and so does this."""
    devices = []
    for entry in (part.strip() for part in value.split(",")):
        if not entry:
            continue
        if entry.startswith("-"):
            break
        devices.append(entry)
    return devices


def parse_nvidia_smi_list(text: str) -> list[str]:
    """Devices in the output of ``nvidia-smi -L``: each GPU's index, or the UUIDs of its MIG instances
    when it is split into some (CUDA then runs on an instance, not on the whole GPU)."""
    devices: list[str] = []
    gpu_has_mig = False
    for line in text.splitlines():
        gpu = re.match(r"\s*GPU (\d+):", line)
        mig = re.search(r"\(UUID: (MIG-[^)\s]+)\)", line)
        if gpu:
            devices.append(gpu.group(1))
            gpu_has_mig = False
        elif mig and devices:
            if not gpu_has_mig:
                devices.pop()
                gpu_has_mig = True
            devices.append(mig.group(1))
    return devices


def scheduler_assigns_gpus(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether SLURM gave this job its GPUs (then its ``CUDA_VISIBLE_DEVICES`` is left as it is)."""
    if any(environ.get(name) for name in SLURM_GPU_ENVS):
        return True
    return bool(environ.get("SLURM_JOB_ID")) and VISIBLE_DEVICES_ENV in environ


def discover_devices(environ: Mapping[str, str] = os.environ) -> Devices:
    """The devices of this host to share out, found without initialising CUDA in this process
    (the order of the module docstring, after the SLURM check)."""
    if DEVICES_ENV in environ:
        return Devices(tuple(parse_device_list(environ[DEVICES_ENV])), DEVICES_ENV)
    if VISIBLE_DEVICES_ENV in environ:
        return Devices(tuple(parse_device_list(environ[VISIBLE_DEVICES_ENV])), VISIBLE_DEVICES_ENV)
    nvidia_smi = shutil.which("nvidia-smi", path=environ.get("PATH"))
    if nvidia_smi is not None:
        return Devices(tuple(_nvidia_smi_devices(nvidia_smi)), "nvidia-smi -L")
    return Devices(tuple(str(index) for index in range(_torch_device_count())), "torch.cuda.device_count()")


def _nvidia_smi_devices(nvidia_smi: str) -> list[str]:
    """The devices ``nvidia-smi -L`` lists; none (with a warning) when it fails, as it does without a driver."""
    try:
        result = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        logger.warning("could not run nvidia-smi -L (%s): no GPU slots", error)
        return []
    if result.returncode != 0:
        logger.warning("nvidia-smi -L failed (exit %d: %s): no GPU slots", result.returncode, result.stdout.strip() or result.stderr.strip())
        return []
    return parse_nvidia_smi_list(result.stdout)


def _torch_device_count() -> int:
    """``torch.cuda.device_count()`` in a child process (it may initialise CUDA, which must not happen
    here before ``CUDA_VISIBLE_DEVICES`` is set); 0 without torch or for a CPU-only build."""
    try:
        import torch
    except ImportError:
        return 0
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return 0
    try:
        result = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"], capture_output=True, text=True, timeout=300
        )
        return int(result.stdout.split()[-1]) if result.returncode == 0 else _no_count(result.stderr.strip()[-2000:])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as error:
        return _no_count(str(error))


def _no_count(reason: str) -> int:
    logger.warning("torch.cuda.device_count() failed in a child process (%s): no GPU slots", reason)
    return 0


def slot_lock_path(lock_dir: str | os.PathLike, device: str) -> Path:
    """The lock file of ``device`` on this host: ``<lock_dir>/<host>/gpu<device>.lock``."""
    return Path(lock_dir) / (_file_safe(socket.gethostname()) or "localhost") / f"gpu{_file_safe(device)}.lock"


def _file_safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def _try_lock(path: Path) -> int | None:
    """An open descriptor of ``path`` holding its exclusive flock, or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o664)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise GpuSlotError(
            f"cannot lock {path} ({error.strerror}): the filesystem of the GPU slot locks does not support flock; "
            f"point {LOCK_DIR_ENV} at a folder on a local disk"
        ) from error
    return fd


def _holder(path: Path) -> str:
    """What the holder of a slot wrote into its lock file (diagnostics only)."""
    try:
        return path.read_text().strip() or "holder unknown"
    except OSError:
        return "holder unknown"


def _busy_summary(lock_dir: str | os.PathLike, devices: Sequence[str]) -> str:
    return "; ".join(f"GPU {device}: {_holder(slot_lock_path(lock_dir, device))}" for device in devices)


def _take_slot(lock_dir: str | os.PathLike, devices: Devices, job_label: str, wait_s: float, poll_s: float) -> tuple[str, int]:
    """Lock the first free device, waiting up to ``wait_s`` seconds; (device, lock descriptor)."""
    slot_lock_path(lock_dir, devices.ids[0]).parent.mkdir(parents=True, exist_ok=True)
    count = len(devices.ids)
    deadline = time.monotonic() + wait_s
    waiting = False
    while True:
        for device in devices.ids:
            path = slot_lock_path(lock_dir, device)
            fd = _try_lock(path)
            if fd is not None:
                since = datetime.now(timezone.utc).isoformat(timespec="seconds")
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, job {job_label}, since {since}\n".encode(), 0)
                if waiting:
                    logger.info("GPU %s freed after waiting; job %s takes it", device, job_label)
                return device, fd
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise GpuSlotError(
                f"no GPU free for job {job_label} after waiting {wait_s:g} s: all {count} device(s) of this host "
                f"(from {devices.source}) are held by other jobs ({_busy_summary(lock_dir, devices.ids)}). "
                f"More GPU jobs run at once than there are devices: run with --resources gpu={count} "
                f"(at most the device count), or set {WAIT_ENV} to wait longer."
            )
        if not waiting:
            logger.warning(
                "job %s waits for a GPU: all %d device(s) of this host (from %s) are busy (%s). "
                "--resources gpu= exceeds the %d device(s) here (or another run uses this results folder); "
                "waiting up to %g s for one to be freed",
                job_label, count, devices.source, _busy_summary(lock_dir, devices.ids), count, wait_s,
            )
            waiting = True
        time.sleep(min(poll_s, remaining))


def _refuse_if_cuda_started() -> None:
    """Setting ``CUDA_VISIBLE_DEVICES`` after torch initialised CUDA changes nothing: stop instead."""
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    if cuda is not None and cuda.is_initialized():
        raise GpuSlotError(
            "torch has already initialised CUDA in this process, so CUDA_VISIBLE_DEVICES can no longer choose "
            "its GPU: enter gpu_slot before the first CUDA call"
        )


def _wait_seconds(wait_s: float | None) -> float:
    if wait_s is not None:
        return wait_s
    value = os.environ.get(WAIT_ENV)
    if not value:
        return DEFAULT_WAIT_S
    try:
        return float(value)
    except ValueError:
        raise GpuSlotError(f"{WAIT_ENV}={value!r} is not a number of seconds") from None


@contextlib.contextmanager
def gpu_slot(lock_dir: str | os.PathLike, job_label: str, wait_s: float | None = None, poll_s: float = 1.0) -> Iterator[str | None]:
    """Hold one GPU of this host for the block: yields its id (``CUDA_VISIBLE_DEVICES`` is set to it
    alone inside the block and restored after), or None when there is nothing to hand out (SLURM
    assigned the GPUs, or the host has none; the environment is then untouched).

    ``lock_dir`` holds the lock files; ``job_label`` names the job in the lock file and in messages.
    When every device is held, waits (checking every ``poll_s`` seconds) up to ``wait_s`` seconds
    (default ``SAE_PIPELINE_GPU_WAIT_S`` or :data:`DEFAULT_WAIT_S`), then raises :class:`GpuSlotError`.
    Raises it at once if torch already initialised CUDA in this process.
    """
    if scheduler_assigns_gpus():
        logger.info("SLURM assigned this job's GPUs (CUDA_VISIBLE_DEVICES=%s): no local GPU slot", os.environ.get(VISIBLE_DEVICES_ENV))
        yield None
        return
    devices = discover_devices()
    if not devices.ids:
        logger.info("no GPU on this host (from %s): no GPU slot", devices.source)
        yield None
        return
    _refuse_if_cuda_started()
    device, fd = _take_slot(lock_dir, devices, job_label, _wait_seconds(wait_s), poll_s)
    previous = os.environ.get(VISIBLE_DEVICES_ENV)
    os.environ[VISIBLE_DEVICES_ENV] = device
    logger.info("job %s holds GPU %s of %s (from %s)", job_label, device, ",".join(devices.ids), devices.source)
    try:
        yield device
    finally:
        if previous is None:
            os.environ.pop(VISIBLE_DEVICES_ENV, None)
        else:
            os.environ[VISIBLE_DEVICES_ENV] = previous
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)  # explicitly: a forked child may still share the descriptor
        os.close(fd)


def gpu_slot_for(job: Any) -> ContextManager[str | None]:
    """The GPU slot of a Snakemake script job (the ``snakemake`` object): one device when its rule
    declares ``resources: gpu`` >= 1 (the GPU rules declare 1; a larger count still gets one device),
    with the locks under ``<results_dir>/.gpu_slots`` (or ``SAE_PIPELINE_GPU_LOCK_DIR``); else nothing."""
    if int(job.resources.get("gpu", 0) or 0) < 1:
        return contextlib.nullcontext(None)
    lock_dir = os.environ.get(LOCK_DIR_ENV) or os.path.join(job.config["results_dir"], ".gpu_slots")
    label = " ".join([job.rule, *(f"{name}={value}" for name, value in job.wildcards.items())])
    return gpu_slot(lock_dir, label)
