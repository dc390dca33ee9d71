"""Logging for stage entry points: every stage writes a log file that names what it did."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Iterator


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
        with contextlib.redirect_stderr(stream):
            try:
                yield logger
            except BaseException:
                logger.exception("stage %s failed", stage)
                raise
            finally:
                root.removeHandler(handler)
                root.setLevel(previous_level)
        sys.stderr.flush()
