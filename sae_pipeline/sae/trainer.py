"""Training seed-batched SAEs: Adam with warmup and decay, the unit-norm decoder constraint, per-seed
gradient clipping, and CUDA-graph replay of the statistics-free step (:class:`SeedBatchedTrainer`).

The model and its losses are :class:`sae_pipeline.sae.training_model.SeedBatchedSAE`.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch

from sae_pipeline.sae.training_model import SeedBatchedSAE

# Columns of the per-step statistics returned by SeedBatchedTrainer.step (one row per seed).
STEP_STATISTICS = (
    "loss",
    "mse",
    "fvu",
    "l0",
    "aux_loss",
    "penalty",
    "regularizer",
    "sparsity_loss",
    "dead_fraction",
    "W_enc_norm",
    "W_dec_norm",
)


def learning_rate(step: int, total_steps: int, peak_lr: float, warmup_steps: int, decay_fraction: float) -> float:
    """Linear warmup over ``warmup_steps`` (from peak/warmup to peak), constant, then linear decay to 0
    over the last ``decay_fraction`` of the steps. ``step`` counts from 0."""
    factor = 1.0
    if warmup_steps > 0:
        factor = min(1.0, (step + 1) / warmup_steps)
    decay_start = int(total_steps * (1.0 - decay_fraction))
    if decay_fraction > 0 and step >= decay_start:
        factor *= max(0.0, (total_steps - step) / max(1, total_steps - decay_start))
    return peak_lr * factor


class SeedBatchedTrainer:
    """Adam on a :class:`SeedBatchedSAE` with the schedule, decoder constraint and clipping of the settings.

    ``step(x)`` performs one optimizer step and returns the per-seed statistics as a device tensor
    ``[S, len(STEP_STATISTICS)]`` without synchronising (``step(x, statistics=False)`` skips them).

    On CUDA (``cuda_graphs`` true, the default there) a step without statistics is one CUDA-graph
    replay: forward, backward, gradient projection and clipping, fused Adam and decoder
    renormalisation are captured once (after ``GRAPH_WARMUP_STEPS`` ordinary steps of the same
    layout: the first run of a layout compiles its Triton programs, which a capture cannot) and replayed,
    so the step costs no per-kernel launch overhead. The learning rate lives in a device tensor the
    captured Adam reads. Steps with statistics, another batch shape, or the AuxK pass switched
    on or off run eagerly or replay their own graph; the arithmetic is the same either way.
    """

    GRAPH_WARMUP_STEPS = 2

    def __init__(self, model: SeedBatchedSAE, device: str | torch.device, cuda_graphs: bool | None = None):
        self.model = model
        self.settings = model.settings
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs) and on_cuda
        # A captured Adam must read its learning rate from device memory; eager runs take a float.
        self._lr: float | torch.Tensor = (
            torch.tensor(self.settings.effective_lr, dtype=torch.float32, device=self.device) if self.cuda_graphs else self.settings.effective_lr
        )
        self.optimizer = torch.optim.Adam(
            model.parameters(), lr=self._lr, betas=(0.9, 0.999), fused=on_cuda or None, capturable=self.cuda_graphs
        )
        # The capturable-Adam warning about eager steps does not apply: only warm-up and logging steps run eagerly.
        self.optimizer._warned_capturable_if_run_uncaptured = True
        mode = self.settings.autocast
        self.autocast_enabled = mode == "bf16" or (mode == "auto" and self.device.type == "cuda")
        self.step_index = 0
        self._eager_steps: dict[tuple, int] = {}
        self._uncapturable: set[tuple] = set()
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_pool: Any = None

    def current_lr(self) -> float:
        settings = self.settings
        return learning_rate(self.step_index, settings.total_steps, settings.effective_lr, settings.warmup_steps, settings.decay_fraction)

    def step(self, x: torch.Tensor, statistics: bool = True) -> torch.Tensor | None:
        """One optimizer step on ``x [B, d_in]`` for every seed; returns statistics ``[S, n_stats]``
        (columns ``STEP_STATISTICS``, measured before the update) or None when not asked for."""
        lr = self.current_lr()
        if isinstance(self._lr, torch.Tensor):
            self._lr.fill_(lr)
        else:
            self._lr = lr
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        key = self._graph_key(x)
        eager = not self.cuda_graphs or not x.is_cuda or key in self._uncapturable or self._eager_steps.get(key, 0) < self.GRAPH_WARMUP_STEPS
        if statistics or eager:
            out = self._update(x, statistics, capturing=False)
            self._eager_steps[key] = self._eager_steps.get(key, 0) + 1
        else:
            self._replay(x, key)
        self.step_index += 1
        if not statistics:
            return None
        return self._statistics(out, x.shape)

    def _update(self, x: torch.Tensor, statistics: bool, capturing: bool) -> dict[str, torch.Tensor]:
        """Forward, backward, decoder-gradient projection, per-seed clipping, Adam, renormalisation."""
        model, settings = self.model, self.settings
        # A graph must not keep autocast's cast-weight cache (it would outlive the capture).
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast_enabled, cache_enabled=not capturing):
            out = model(x, statistics=statistics)
        deferred = out.pop("deferred_gradients", None)
        out["loss"].sum().backward()
        if deferred is not None:  # weight gradients from the selected entries; projection, clipping, Adam, renormalisation fused
            model.sparse_optimizer_step(self.optimizer, deferred)
            self.optimizer.zero_grad(set_to_none=True)
            return out
        if settings.unit_norm_decoder:
            model.remove_parallel_decoder_gradient()
        if settings.grad_clip_norm is not None:
            model.clip_gradients_per_seed(float(settings.grad_clip_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if settings.unit_norm_decoder:
            model.normalize_decoder()
        return out

    def _graph_key(self, x: torch.Tensor) -> tuple:
        """What a captured step depends on besides tensor contents: the AuxK pass and the batch layout."""
        return (self.model.auxk_active, tuple(x.shape), x.dtype)

    def _replay(self, x: torch.Tensor, key: tuple) -> None:
        """Run the statistics-free step as a CUDA graph, capturing it first for a new input layout."""
        if key not in self._graphs:
            static_x = x.detach().clone()
            graph = torch.cuda.CUDAGraph()
            try:
                # thread_local: CUDA calls of the loader's prefetch thread must not invalidate this capture.
                with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
                    self._update(static_x, statistics=False, capturing=True)
            except RuntimeError as error:  # nothing captured ran: take this step, and later ones of this layout, eagerly
                warnings.warn(f"train: CUDA-graph capture failed ({str(error).splitlines()[0]}); this step layout runs eagerly", RuntimeWarning)
                self._uncapturable.add(key)
                self._update(x, statistics=False, capturing=False)
                return
            self._graph_pool = graph.pool()
            self._graphs[key] = (graph, static_x)
        graph, static_x = self._graphs[key]
        static_x.copy_(x)
        graph.replay()

    def _statistics(self, out: Mapping[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
        """The ``[S, len(STEP_STATISTICS)]`` statistics of a step's forward output (no sync)."""
        model = self.model
        with torch.no_grad():
            batch, d_in = shape
            return torch.stack(
                [
                    out["loss"].float(),
                    out["squared_error"] / (batch * d_in),
                    out["squared_error"] / out["total_variance"].clamp_min(1e-12),
                    out["l0"].float(),
                    out["aux_loss"].float(),
                    out["penalty"].float(),
                    out["regularizer"].float(),
                    out["sparsity_loss"].float(),
                    model.dead_mask().float().mean(dim=-1),
                    model.W_enc.detach().norm(dim=(1, 2)),
                    model.W_dec.detach().norm(dim=(1, 2)),
                ],
                dim=1,
            ).detach()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit: model, optimizer, step, AuxK flag."""
        optimizer = self.optimizer.state_dict()
        # The learning rate is stored as a float so a state moves between CPU and CUDA runs.
        optimizer["param_groups"] = [{**group, "lr": float(group["lr"])} for group in optimizer["param_groups"]]
        return {
            "model": self.model.state_dict(),
            "optimizer": optimizer,
            "step_index": self.step_index,
            "auxk_active": self.model.auxk_active,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        # Keep this trainer's own learning-rate holder and fused/capturable flags (they depend on the device).
        own = self.optimizer.param_groups[0]
        optimizer = dict(state["optimizer"])
        optimizer["param_groups"] = [
            {**group, "lr": float(group["lr"]), "fused": own["fused"], "capturable": own["capturable"]} for group in optimizer["param_groups"]
        ]
        self.optimizer.load_state_dict(optimizer)
        for group in self.optimizer.param_groups:  # loading copies the groups; point them at our holder again
            group["lr"] = self._lr
        self.step_index = int(state["step_index"])
        self.model.auxk_active = bool(state["auxk_active"])
        # The optimizer's state tensors were replaced, so captured graphs would read stale memory.
        self._graphs.clear()
        self._graph_pool = None
        self._eager_steps = {}
