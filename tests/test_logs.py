"""Progress a person can see: a job's tqdm bars go to its log, and a periodic one-line status goes to the terminal."""

from __future__ import annotations

import sys
import time

import pytest
from tqdm import tqdm

from sae_pipeline.runtime.logs import (
    STATUS_INTERVAL_ENV,
    job_label,
    last_progress_line,
    stage_log,
    status_interval_s,
)


def test_a_long_job_prints_its_progress_on_the_terminal_and_keeps_it_in_its_log(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(STATUS_INTERVAL_ENV, "0.2")
    log = tmp_path / "logs" / "train" / "lm" / "topk-k16" / "seeds0-1-2.log"
    with stage_log(log, "train"):
        for _ in tqdm(range(5), desc="train", file=sys.stderr, mininterval=0):
            time.sleep(0.15)
        time.sleep(0.3)
    terminal = capsys.readouterr().err.splitlines()
    status = [line for line in terminal if line.startswith("[train lm/topk-k16/seeds0-1-2 ")]
    assert len(status) >= 2 and all(" s] train: " in line for line in status)
    assert "5/5" in status[-1]  # the newest bar update, written after the loop ended
    assert "5/5" in log.read_text() and not any(line.startswith("train:") for line in terminal)


def test_status_is_off_at_zero_and_a_bad_interval_names_the_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(STATUS_INTERVAL_ENV, "0")
    with stage_log(tmp_path / "a.log", "cache"):
        print("cache: 10%", file=sys.stderr)
        time.sleep(0.3)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(STATUS_INTERVAL_ENV, "soon")
    with pytest.raises(ValueError, match="SAE_PIPELINE_STATUS_S='soon'"):
        status_interval_s()


def test_last_progress_line_takes_the_newest_tqdm_update(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("2026 INFO start\ntrain:  10%|#  | 1/10\rtrain:  20%|## | 2/10\r")
    assert last_progress_line(log) == "train:  20%|## | 2/10"
    assert job_label("steer", "results/logs/steer/topk-k16/seed0.log") == "steer topk-k16/seed0"
