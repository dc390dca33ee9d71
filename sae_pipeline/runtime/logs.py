"""Logging for stage entry points: every stage writes a log file that names what it did.

While a job runs, its progress bars go to its log; every ``SAE_PIPELINE_STATUS_S`` seconds (default 30,
``0`` turns it off) one status line goes to the terminal as well: the job, its running time and the last
progress line of its log, e.g. ``[train lm/topk-k32-l2w0-noreg 120 s] train: 45%|... 270/600``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import IO, Iterator

STATUS_INTERVAL_ENV = "SAE_PIPELINE_STATUS_S"
DEFAULT_STATUS_INTERVAL_S = 30.0
# Bytes read from the end of a log for its last progress line.
STATUS_TAIL_BYTES = 4096


def status_interval_s() -> float:
    """Seconds between terminal status lines (``SAE_PIPELINE_STATUS_S``; 0 = none).

    Raises:
        ValueError: naming the variable when it is not a non-negative number.
    """
    text = os.environ.get(STATUS_INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_STATUS_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"{STATUS_INTERVAL_ENV}={text!r}: expected seconds between status lines (a number >= 0; 0 = none)")
    return value


def last_progress_line(log_path: str | os.PathLike) -> str:
    """The last non-blank line of a log, where a tqdm bar's ``\r`` updates count as lines."""
    with open(log_path, "rb") as stream:
        stream.seek(max(0, os.path.getsize(log_path) - STATUS_TAIL_BYTES))
        tail = stream.read().decode("utf-8", errors="replace")
    pieces = [piece.strip() for piece in tail.replace("\r", "\n").split("\n")]
    return next((piece for piece in reversed(pieces) if piece), "")


class TerminalStatus:
    """A daemon thread writing ``[<job> <seconds> s] <last progress line>`` to ``terminal`` every ``interval_s``."""

    def __init__(self, job: str, log_path: str | os.PathLike, terminal: IO[str], interval_s: float):
        self.job, self.log_path, self.terminal, self.interval_s = job, log_path, terminal, interval_s
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"status-{job}", daemon=True)

    def __enter__(self) -> TerminalStatus:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            line = last_progress_line(self.log_path)
            self.terminal.write(f"[{self.job} {time.monotonic() - self.started:.0f} s] {line}\n")
            self.terminal.flush()


def job_label(stage: str, log_path: str | os.PathLike) -> str:
    """``<stage> <log folder below logs/<stage>>/<log name>``, e.g. ``train lm/topk-k16/seeds0-1-2``."""
    parts = Path(log_path).with_suffix("").parts
    below = parts[parts.index(stage) + 1 :] if stage in parts[:-1] else parts[-1:]
    return " ".join([stage, "/".join(below)]) if below else stage


@contextlib.contextmanager
def stage_log(log_path: str | os.PathLike | None, stage: str) -> Iterator[logging.Logger]:
    """Route the stage's ``logging`` records and its stderr (progress bars, warnings) to ``log_path``.

    With ``log_path=None`` everything goes to the terminal. Yields the stage's logger.
    """
    logger = logging.getLogger(f"sae_pipeline.{stage}")
    if log_path is None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        yield logger
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", buffering=1) as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        previous_level = root.level
        root.setLevel(logging.INFO)
        interval = status_interval_s()
        status = TerminalStatus(job_label(stage, log_path), log_path, sys.stderr, interval) if interval > 0 else contextlib.nullcontext()
        with contextlib.redirect_stderr(stream), status:
            try:
                yield logger
            except BaseException:
                logger.exception("stage %s failed", stage)
                raise
            finally:
                root.removeHandler(handler)
                root.setLevel(previous_level)
        sys.stderr.flush()
