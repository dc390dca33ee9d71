"""Outputs follow the user's umask: safetensors' save_file creates 0600 files, which collaborators on a
shared cluster could not read."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from sae_pipeline.data.atomic import write_json
from sae_pipeline.data.checkpoint import SPARSITY_NAME, WEIGHTS_NAME, save_sae


@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_sae_folder_and_files_follow_the_umask(tmp_path, umask, file_mode, folder_mode):
    d_in, d_sae = 4, 6
    tensors = {"W_enc": torch.zeros(d_in, d_sae), "W_dec": torch.zeros(d_sae, d_in), "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d_in)}
    previous = os.umask(umask)
    try:
        folder = save_sae(tmp_path / "sae", tensors, {"architecture": "topk", "k": 2}, firing_frequency=torch.full((d_sae,), 0.5))
        write_json(tmp_path / "metrics.json", {"fvu": 0.1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == folder_mode
    for name in (WEIGHTS_NAME, SPARSITY_NAME, "cfg.json"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == file_mode, name
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == file_mode
