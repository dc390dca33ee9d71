"""Trainable sparse autoencoders, several seeds stepped together (the trainer is :mod:`sae_pipeline.sae.trainer`).

Every parameter carries a leading seed dimension ``S``: ``W_enc [S, d_in, d_sae]``,
``W_dec [S, d_sae, d_in]``, ``b_enc [S, d_sae]``, ``b_dec [S, d_in]``. One activation batch
``x [B, d_in]`` is shared by all seeds; the encoder is one batched matrix product and the loss is
the sum of the per-seed losses, so one backward pass gives every seed exactly the gradient it would
get alone (the seeds share no parameter). Adam is elementwise, and gradient clipping here is per
seed, so training seeds together equals training each alone up to floating-point rounding.

Architectures (pre-activations ``a = (x - b_dec) W_enc + b_enc``, shape ``[S, B, d_sae]``):

- ``topk``: z = ReLU(TopK_k(a)) per token (selection by :func:`topk_indices`). How the k
  selected codes reach the loss is ``sparse_decoder``:

  - ``kernels``: the encoder product runs without autograd and only the k selected
    pre-activations carry gradients; decoding and every gradient are the sparse kernels of
    :mod:`sae_pipeline.sae.kernels` (Triton on CUDA), so the only ``[B, d_sae] x d_in`` product
    of a step is the encoder's forward. Where Triton runs (and no weight penalty is set) the weight
    gradients come from the selected entries and the optimizer step is fused
    (:attr:`SeedBatchedSAE.sparse_update`, :func:`sae_pipeline.sae.kernels.sparse_adam_step`), reading bf16
    weight copies it keeps current. Needs ``regularizer: none`` (the Top-k regularizers put
    gradient on every batch-active pre-activation); with a regularizer the step falls back to
    ``dense`` on CUDA and ``embedding_bag`` elsewhere.
  - ``true``: autograd, decoding from the k selected rows with ``embedding_bag``;
  - ``false``: autograd with dense ``[B, d_sae] x [d_sae, d_in]`` products;
  - ``auto`` (default): ``kernels`` on CUDA when Triton is importable, else ``true`` off CUDA and
    ``false`` on it.
- ``batchtopk``: keep the k*B largest ReLU(a) over the whole batch; a scalar inference threshold
  follows an exponential moving average of the smallest kept value (SAELens's rule). With the
  ``kernels`` decoder (and ``batch_topk_cap_multiple`` > 0) the k*B are kept from each token's
  ``cap_multiple * k`` largest, so the codes are sparse and train through the same kernels and fused
  optimizer step as top-k (:mod:`sae_pipeline.sae.selection` says when that is exact); else dense autograd.
- ``relu``: z = ReLU(a), loss += l1_coefficient * mean_t sum_i z_ti * ||W_dec[i]||.
- ``matryoshka_batchtopk``: BatchTopK codes; each nested prefix of latents (``matryoshka_prefixes``
  plus the full width) reconstructs x on its own and the loss is the sum of the prefix losses. On the
  ``kernels`` decoder the codes come from candidates as for ``batchtopk`` and each group of latents
  between two prefix bounds is decoded by the sparse kernels (:meth:`SeedBatchedSAE._nested_sparse_decode`).

Loss per seed (terms in :mod:`sae_pipeline.sae.losses`; ``recon`` is the squared error summed over d_in, averaged over tokens, as in
dictionary_learning and SAELens)::

    recon + aux_k_coefficient * auxk + weight_penalty + regularizer (+ relu sparsity)

- weight penalty: ``w * (||W_enc||_F^2 + ||W_dec||_F^2)`` (l2) or ``w * (|W_enc|_1 + |W_dec|_1)``
  (l1), on the encoder, the decoder or both (``weight_penalty_on``).
- regularizers ("Beyond the Hard Budget"), over the batch-active units A (latents in the support
  of at least one token of the batch), support S_t of token t:
  ``off_support_l1 = lambda * mean_t sum_{i in A, i not in S_t} |a_ti|``;
  ``l1_l2_ratio = lambda * mean_t ||a_tA||_1 / ||a_tA||_2``.
- AuxK (top-k family): the ``aux_k`` largest ReLU pre-activations among dead latents reconstruct
  the detached residual ``x - x_hat`` (no bias); the loss is that squared error divided by the
  residual's variance (OpenAI / dictionary_learning normalisation). A latent is dead when it has not
  fired for ``dead_window_tokens`` tokens.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from sae_pipeline.sae import kernels as sparse_kernels
from sae_pipeline.sae import losses
from sae_pipeline.sae.kernels import programs as kernel_programs
from sae_pipeline.sae.initialization import initial_weights
from sae_pipeline.sae.kernels import selected_preactivations, sparse_decode
from sae_pipeline.sae.selection import dense_batch_codes, keep_candidates, kept_first, topk_indices, topk_program_runs
from sae_pipeline.settings import TOPK_FAMILY, TrainSettings

# Batch-level top-k architectures (sparse via candidates, see sparse_codes). BatchTopK puts each token's kept candidates
# first from this d_in (H200, 16k latents: 3.39 -> 3.14 ms at d_in 2304, 1.42 -> 1.47 at 512); Matryoshka always.
BATCH_TOPK, KEPT_FIRST_MIN_D_IN = ("batchtopk", "matryoshka_batchtopk"), 1024
# Round 6 of issue 17 (top-k with the kernels, where the top-k program runs): the program also writes the selected
# values (no gathers in selected_preactivations), and adds the firing counts (no zeros + compare + cast + scatter_add_
# of a torch formula but the zero fill); the dead-latent counters advance in one program (any architecture, where
# Triton runs) instead of add_ + compare + masked_fill_. False: the torch operations, as before.
TOPK_WRITES_VALUES = True
TOPK_COUNTS_FIRING = True
FIRING_PROGRAM = True
# With the bf16 encoder copy (deferred sparse update under autocast), the gradient records keep x - b_dec in bf16, the
# encoder product's operand, instead of float32 for latent_gradients to cast again (round 6; False: float32, as before).
RECORD_LOW_CENTERED = True
# The decoder bias added inside the decode (its gradient the decode backward's sum over tokens), and where the top-k
# program counts firing, one zero fill for the counts and the loss terms left out (round 6; False: separate kernels).
DECODE_ADDS_BIAS = True
SHARED_ZERO_FILL = True


class SeedBatchedSAE(nn.Module):
    """``S`` independent SAEs of one architecture whose parameters are stacked along dim 0.

    Attributes:
        seeds: the seed of each slice.
        W_enc ``[S, d_in, d_sae]``, W_dec ``[S, d_sae, d_in]``, b_enc ``[S, d_sae]``, b_dec ``[S, d_in]``.
        threshold ``[S]`` (buffer): batch-top-k inference threshold.
        tokens_since_fired ``[S, d_sae]`` int64 (buffer): tokens since each latent last fired.
        capped_tokens ``[S]`` int64 (buffer): BatchTopK on the sparse path, tokens whose candidates were all kept
            (where the per-token cap may have bound; :func:`~sae_pipeline.sae.selection.keep_candidates`).
    """

    def __init__(self, settings: TrainSettings, d_in: int, seeds: Sequence[int], b_dec: torch.Tensor | None = None,
                 init_device: str | torch.device = "cpu"):
        """``init_device``: where the initial weights are drawn and the module is built (see :func:`initial_weights`)."""
        super().__init__()
        self.settings = settings
        self.seeds = [int(seed) for seed in seeds]
        self.d_in = int(d_in)
        self.d_sae = int(settings.d_sae)
        encoders, decoders = zip(*(initial_weights(seed, self.d_in, self.d_sae, settings.tied_init, init_device) for seed in self.seeds))
        n_seeds = len(self.seeds)
        self.W_enc = nn.Parameter(torch.stack(encoders).contiguous())
        self.W_dec = nn.Parameter(torch.stack(decoders))
        self.b_enc = nn.Parameter(torch.zeros(n_seeds, self.d_sae, device=init_device))
        initial_b_dec = torch.zeros(self.d_in) if b_dec is None else b_dec.detach().float()
        self.b_dec = nn.Parameter(initial_b_dec.to(init_device).expand(n_seeds, self.d_in).clone())
        self.register_buffer("threshold", torch.zeros(n_seeds, device=init_device))
        self.register_buffer("tokens_since_fired", torch.zeros(n_seeds, self.d_sae, dtype=torch.int64, device=init_device))
        self.register_buffer("capped_tokens", torch.zeros(n_seeds, dtype=torch.int64, device=init_device))
        # Python mirror of "some latent is dead" so the AuxK pass is skipped without a device sync;
        # refreshed by refresh_dead_flag() at logging steps.
        self.auxk_active = False
        # bf16 copies of W_enc / W_dec that the sparse optimizer step keeps current (see low_precision_weights).
        self._low_weights: tuple[torch.Tensor, torch.Tensor] | None = None
        self._low_weights_key: tuple | None = None
        self._deferred: sparse_kernels.DeferredWeightGradients | None = None

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``a = (x - b_dec) W_enc + b_enc`` for every seed: ``x [B, d_in]`` -> ``[S, B, d_sae]``.

        The encoder product uses a detached copy of ``b_dec``; a zero-valued term carries b_dec's
        gradient (``-W_enc @ sum_t dL/da_t``), so autograd never forms the dense ``dL/dx`` product.
        """
        centered = x.unsqueeze(0) - self.b_dec.detach().unsqueeze(1)
        b_dec_gradient_path = torch.bmm((self.b_dec - self.b_dec.detach()).unsqueeze(1), self.W_enc)
        return torch.baddbmm(self.b_enc.unsqueeze(1) - b_dec_gradient_path, centered, self.W_enc)

    @property
    def decoder_mode(self) -> str:
        """How the top-k codes are decoded and differentiated: ``kernels``, ``embedding_bag`` or
        ``dense`` (``sparse_decoder`` resolved for this device and regularizer; see the module docstring)."""
        mode = self.settings.sparse_decoder
        on_cuda = self.W_dec.is_cuda
        if mode == "auto":
            mode = "kernels" if on_cuda and sparse_kernels.triton is not None else not on_cuda
        if mode == "kernels" and self.settings.regularizer["kind"] != "none":
            mode = not on_cuda
        if mode == "kernels":
            return "kernels"
        return "embedding_bag" if mode else "dense"

    @property
    def sparse_update(self) -> bool:
        """Whether a training step defers the weight gradients to :func:`sparse_kernels.sparse_adam_step`
        (top-k with the ``kernels`` decoder where Triton runs, no weight penalty): the gradients are then
        formed from the selected entries only, and projection, clipping, Adam and renormalisation run fused."""
        penalty = self.settings.weight_penalty
        return (self.sparse_codes and kernel_programs.triton_usable(self.W_dec)
                and (penalty["kind"] == "none" or float(penalty["coefficient"]) == 0)
                and self.W_enc.is_contiguous() and self.W_dec.is_contiguous())

    def low_precision_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """bf16 ``(W_enc, W_dec)`` for the forward products, cast anew only when the float32 weights were
        replaced or changed in place by anything but :func:`sparse_kernels.sparse_adam_step` (which writes
        the copies as it updates the weights, so a training step casts nothing)."""
        key = (self.W_enc.data_ptr(), self.W_enc._version, self.W_dec.data_ptr(), self.W_dec._version)
        if self._low_weights is None or self._low_weights_key != key:
            with torch.no_grad():
                self._low_weights = (self.W_enc.detach().to(torch.bfloat16), self.W_dec.detach().to(torch.bfloat16))
            self._low_weights_key = key
        return self._low_weights

    @torch.no_grad()
    def sparse_optimizer_step(self, optimizer: torch.optim.Optimizer, deferred: sparse_kernels.DeferredWeightGradients) -> None:
        """Projection, per-seed clipping, Adam and renormalisation of a step whose weight gradients were deferred."""
        settings = self.settings
        low_copies = self.low_precision_weights() if deferred.low_precision else None
        sparse_kernels.sparse_adam_step(optimizer, deferred, self.W_enc, self.W_dec, self.b_enc, self.b_dec, low_copies,
                                        settings.grad_clip_norm, settings.unit_norm_decoder)

    @property
    def sparse_codes(self) -> bool:
        """Whether a step's codes are per-token selected entries decoded by the sparse kernels: top-k, or BatchTopK
        from ``batch_topk_cap_multiple * k`` candidates a token (:mod:`sae_pipeline.sae.selection`), with the
        ``kernels`` decoder."""
        architecture = self.settings.architecture
        return self.decoder_mode == "kernels" and (architecture == "topk" or (architecture in BATCH_TOPK and self.settings.batch_topk_cap_multiple > 0))

    @property
    def candidates_per_token(self) -> int:
        """Entries selected per token: k (top-k), or BatchTopK's candidates ``min(cap multiple * k, d_sae)``."""
        return self.settings.k if self.settings.architecture == "topk" else min(self.settings.batch_topk_cap_multiple * self.settings.k, self.d_sae)

    @property
    def uses_sparse_decoder(self) -> bool:
        """Whether the autograd top-k reconstruction gathers the selected rows (``embedding_bag``)."""
        return self.decoder_mode == "embedding_bag"

    def decode_selected(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``sum_j values[s,b,j] * W_dec[s, indices[s,b,j]]``: ``[S, B, m]`` -> ``[S, B, d_in]`` (no bias)."""
        if self.uses_sparse_decoder:
            return sparse_kernels.embedding_bag_rows(values.to(self.W_dec.dtype), indices, self.W_dec)
        dense = values.new_zeros(*indices.shape[:2], self.d_sae).scatter(-1, indices, values)
        return torch.bmm(dense, self.W_dec)

    def forward(self, x: torch.Tensor, statistics: bool = True) -> dict[str, torch.Tensor]:
        """Losses and statistics on one batch ``x [B, d_in]``; also updates the dead-latent counters
        and (batch-top-k) the inference threshold.

        Returns a dict of per-seed ``[S]`` tensors: ``loss`` (what is minimised), ``recon``,
        ``aux_loss``, ``penalty``, ``regularizer``, ``sparsity_loss``, ``squared_error`` (summed over
        batch and d_in), ``l0`` (mean nonzero codes per token); plus ``total_variance`` (scalar) and
        ``firing_counts [S, d_sae]`` (tokens of this batch on which each latent fired). With
        ``statistics=False`` the three monitoring-only entries (``squared_error``, ``total_variance``,
        ``l0``) are neither computed nor returned; the losses and updates are the same.
        """
        settings = self.settings
        architecture = settings.architecture
        x = x.float()
        sparse_gradients = self.sparse_codes
        centered = None
        self._deferred = None
        encoder_table = decoder_table = None
        if sparse_gradients:
            low_dtype = sparse_kernels.autocast_dtype(x.device.type)
            if torch.is_grad_enabled() and low_dtype in (None, torch.bfloat16) and self.sparse_update:
                self._deferred = sparse_kernels.DeferredWeightGradients(low_precision=low_dtype is not None)
                if low_dtype is not None:
                    encoder_table, decoder_table = self.low_precision_weights()
            with torch.no_grad():
                centered = x.unsqueeze(0) - self.b_dec.unsqueeze(1)
                # The encoder bias is added where pre is read (top-k, selected values), never as a [S, B, d_sae] pass.
                if encoder_table is not None:
                    low_centered = centered.to(encoder_table.dtype)
                    pre = torch.bmm(low_centered, encoder_table)
                    if RECORD_LOW_CENTERED:  # the encoder gradient's operand, as latent_gradients would cast it
                        centered = low_centered
                else:
                    pre = torch.bmm(centered, self.W_enc)
        else:
            pre = self.pre_activations(x)
        selected_k = self.candidates_per_token if sparse_gradients else settings.k
        batch_candidates = architecture in BATCH_TOPK and sparse_gradients
        fused = sparse_gradients and topk_program_runs(pre, selected_k, any_width=batch_candidates)
        counts_in_program = fused and TOPK_COUNTS_FIRING and not batch_candidates
        firing_counts = None
        # One zero tensor for every loss term this configuration leaves out (read-only: only reported, never added).
        if counts_in_program and SHARED_ZERO_FILL:  # one fill: the firing counts [S, d_sae], then the zero [S]
            zeros = torch.zeros(self.n_seeds * (self.d_sae + 1), device=x.device)
            firing_counts, zero = zeros[:self.n_seeds * self.d_sae].view(self.n_seeds, self.d_sae), zeros[self.n_seeds * self.d_sae:]
        else:
            zero = pre.new_zeros(self.n_seeds, dtype=torch.float32)
        sparsity_loss = zero
        if architecture == "topk" or sparse_gradients:
            selected = pre.new_empty(*pre.shape[:2], selected_k, dtype=torch.float32) if fused and TOPK_WRITES_VALUES else None
            if counts_in_program and firing_counts is None:
                firing_counts = torch.zeros(self.n_seeds, self.d_sae, device=x.device)
            if fused:
                indices = sparse_kernels.topk_columns(pre, selected_k, self.b_enc.detach(), values_out=selected, firing_counts=firing_counts)
            else:
                indices = topk_indices(pre, selected_k, bias=self.b_enc.detach() if sparse_gradients else None)
            if sparse_gradients:
                candidates = self._arrange_candidates(pre, indices, selected) if batch_candidates else None
                if candidates is not None:
                    indices, selected = candidates["indices"], candidates["selected"]
                record = self._deferred.record(indices) if self._deferred is not None else None
                values = selected_preactivations(pre, centered, self.W_enc, self.b_enc, self.b_dec, indices, bias_separate=True,
                                                 encoder_table=encoder_table, record=record, selected=selected)
                codes = values.relu()
                slot_ranges = None
                if candidates is not None:
                    codes = codes * candidates["keep"]
                    slot_ranges = (candidates["starts"], candidates["ends"]) if "starts" in candidates else None
                    if record is not None:
                        record["positions"] = candidates["positions"]
                if architecture == "matryoshka_batchtopk":
                    x_hat, recon = self._nested_sparse_decode(x, codes, indices, candidates["groups"], slot_ranges, decoder_table, record)
                else:
                    slot_ranges = (slot_ranges[0][..., 0], slot_ranges[1][..., 0]) if slot_ranges is not None else None
                    if DECODE_ADDS_BIAS:
                        x_hat = sparse_decode(codes, self.W_dec, indices, table=decoder_table, record=record, bias=self.b_dec, slot_ranges=slot_ranges)
                    else:
                        x_hat = sparse_decode(codes, self.W_dec, indices, table=decoder_table, record=record, slot_ranges=slot_ranges) + self.b_dec.unsqueeze(1)
                    recon = losses.squared_error_mean(x_hat, x) if losses.FUSED_SQUARED_ERROR else (x_hat - x).square().sum(dim=-1).mean(dim=-1)
            else:
                values = pre.gather(-1, indices)
                codes = values.relu()
                x_hat = self.decode_selected(codes, indices) + self.b_dec.unsqueeze(1)
                recon = (x_hat - x).square().sum(dim=-1).mean(dim=-1)
            if firing_counts is None:
                firing_counts = torch.zeros(self.n_seeds, self.d_sae, device=x.device).scatter_add_(
                    1, indices.reshape(self.n_seeds, -1), (codes > 0).float().reshape(self.n_seeds, -1)
                )
            if statistics:
                l0 = (codes > 0).float().sum(dim=-1).mean(dim=-1)
            if settings.regularizer["kind"] != "none":
                active = torch.zeros(self.n_seeds, self.d_sae, dtype=torch.bool, device=x.device).scatter_(1, indices.reshape(self.n_seeds, -1), True)
                support_l1 = values.abs().sum(dim=-1)
        else:
            dense_codes = pre.relu() if architecture == "relu" else dense_batch_codes(pre, settings.k, self.threshold, settings.threshold_lr)
            bounds = list(settings.matryoshka_prefixes) + [self.d_sae] if architecture == "matryoshka_batchtopk" else [self.d_sae]
            x_hat = self.b_dec.unsqueeze(1).expand(self.n_seeds, x.shape[0], self.d_in)
            recon = pre.new_zeros(self.n_seeds, dtype=torch.float32)
            start = 0
            for end in bounds:
                x_hat = x_hat + torch.bmm(dense_codes[:, :, start:end], self.W_dec[:, start:end])
                recon = recon + (x_hat - x).square().sum(dim=-1).mean(dim=-1)
                start = end
            fired = dense_codes > 0
            firing_counts = fired.float().sum(dim=1)
            if statistics:
                l0 = fired.float().sum(dim=-1).mean(dim=-1)
            if settings.regularizer["kind"] != "none":
                active = firing_counts > 0
                support_l1 = (pre.abs() * fired).sum(dim=-1)
            if architecture == "relu":
                decoder_norms = self.W_dec.norm(dim=-1).unsqueeze(1)
                sparsity_loss = settings.l1_coefficient * (dense_codes * decoder_norms).sum(dim=-1).mean(dim=-1)
        aux_loss = zero
        with_aux = architecture in TOPK_FAMILY and self.auxk_active and settings.aux_k_coefficient > 0
        if with_aux:
            aux_loss = self._auxk_loss(pre, (x - x_hat).detach(), centered)
        penalty_kind, penalty_coefficient = settings.weight_penalty["kind"], float(settings.weight_penalty["coefficient"])
        with_penalty = penalty_kind != "none" and penalty_coefficient != 0
        penalty = losses.weight_penalty(self.W_enc, self.W_dec, penalty_kind, penalty_coefficient, settings.weight_penalty_on) if with_penalty else zero
        regularizer = zero
        if settings.regularizer["kind"] != "none":
            regularizer = losses.sparsity_regularizer(pre, active, support_l1, settings.regularizer["kind"], float(settings.regularizer["coefficient"]))
        # recon + aux_k_coefficient * aux_loss + penalty + regularizer + sparsity_loss, the terms left out adding
        # exactly zero (small kernels a step saves).
        loss = recon
        if with_aux:
            loss = loss + settings.aux_k_coefficient * aux_loss
        if with_penalty:
            loss = loss + penalty
        if regularizer is not zero:
            loss = loss + regularizer
        if sparsity_loss is not zero:
            loss = loss + sparsity_loss
        with torch.no_grad():
            if FIRING_PROGRAM:
                sparse_kernels.advance_tokens_since_fired(self.tokens_since_fired, firing_counts, x.shape[0])
            else:
                self.tokens_since_fired.add_(x.shape[0]).masked_fill_(firing_counts > 0, 0)
        out = {
            "loss": loss,
            "recon": recon,
            "aux_loss": aux_loss,
            "penalty": penalty,
            "regularizer": regularizer,
            "sparsity_loss": sparsity_loss,
            "firing_counts": firing_counts,
        }
        if self._deferred is not None:
            out["deferred_gradients"] = self._deferred
            self._deferred = None
        if statistics:
            with torch.no_grad():
                out["squared_error"] = (x_hat.detach().float() - x).square().sum(dim=(1, 2))
                out["total_variance"] = (x - x.mean(dim=0)).square().sum()
                out["l0"] = l0
        return out

    @torch.no_grad()
    def _arrange_candidates(self, pre: torch.Tensor, indices: torch.Tensor, selected: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """BatchTopK's selection from the candidates ``indices [S,B,C]``: their values (``selected``, as the top-k program
        wrote them, else ``pre`` plus b_enc gathered here, as selected_preactivations would), which are kept
        (:func:`keep_candidates`: threshold and capped-token count updated), then (Matryoshka, or from
        ``KEPT_FIRST_MIN_D_IN``) every token's slots reordered kept first, group by group (:func:`kept_first`; else no
        ``starts`` / ``ends``). Returns ``indices``, ``selected`` (the values), ``keep``, ``groups`` (Matryoshka: each
        slot's latent group, else None), all in the slot order used, the kept ``positions`` and ``starts``, ``ends [S,B,G]``."""
        settings = self.settings
        if selected is None:
            selected = pre.gather(-1, indices).float() + self.b_enc.detach().float().gather(1, indices.flatten(1)).view_as(indices)
        keep, positions = keep_candidates(selected, settings.k, self.threshold, settings.threshold_lr, self.capped_tokens)
        if settings.architecture == "batchtopk" and self.d_in < KEPT_FIRST_MIN_D_IN:
            return {"indices": indices, "selected": selected, "keep": keep, "groups": None, "positions": positions}
        groups, n_groups = None, 1
        if settings.architecture == "matryoshka_batchtopk":
            groups = sum((indices >= bound).to(torch.int64) for bound in settings.matryoshka_prefixes)  # 0 .. G-1
            n_groups = len(settings.matryoshka_prefixes) + 1
        order, positions, starts, ends = kept_first(keep, positions, groups, n_groups)
        return {"indices": indices.gather(-1, order), "selected": selected.gather(-1, order),
                "keep": keep.gather(-1, order), "groups": groups.gather(-1, order) if groups is not None else None,
                "positions": positions, "starts": starts, "ends": ends}

    def _nested_sparse_decode(self, x: torch.Tensor, codes: torch.Tensor, indices: torch.Tensor, groups: torch.Tensor,
                              slot_ranges: tuple[torch.Tensor, torch.Tensor], table: torch.Tensor | None,
                              record: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Matryoshka on the sparse kernels: ``(x_hat [S,B,d], recon [S])``, recon the sum over the nested prefixes
        (``matryoshka_prefixes`` and the full width) of each prefix's squared error.

        ``groups [S,B,C]``: each slot's latent group; ``slot_ranges``: ``(starts, ends) [S,B,G]``, each token's kept
        slots per group. The G groups are decoded in one call as G*B rows (row ``q*B + b``: token b's codes of group q);
        the prefix reconstructions are running sums of the groups', so autograd gives group q the sum of the gradients
        of every prefix holding it. The gradient record has G*B rows too (``positions`` moved to the group's rows;
        ``groups`` makes :func:`~sae_pipeline.sae.kernels.entries.deferred_operands` repeat the encoder operands)."""
        n_seeds, batch, cap = indices.shape
        n_groups = slot_ranges[0].shape[-1]
        grouped = torch.stack([codes * (groups == group) for group in range(n_groups)], dim=1).view(n_seeds, n_groups * batch, cap)
        grouped_indices = indices.unsqueeze(1).expand(n_seeds, n_groups, batch, cap).reshape(n_seeds, n_groups * batch, cap)
        grouped_ranges = tuple(bound.transpose(1, 2).reshape(n_seeds, n_groups * batch) for bound in slot_ranges)
        if record is not None:  # the kept positions (set by forward) move to their group's rows
            record["indices"], record["groups"] = grouped_indices, n_groups
            record["positions"] = record["positions"] + groups.view(n_seeds, -1).gather(1, record["positions"]) * (batch * cap)
        per_group = sparse_decode(grouped, self.W_dec, grouped_indices, table=table, record=record,
                                  slot_ranges=grouped_ranges).view(n_seeds, n_groups, batch, self.d_in)
        x_hat = self.b_dec.unsqueeze(1).float()
        recon = 0.0
        for group in range(n_groups):
            x_hat = x_hat + per_group[:, group]
            recon = recon + (x_hat - x).square().sum(dim=-1).mean(dim=-1)
        return x_hat, recon

    def dead_mask(self) -> torch.Tensor:
        """bool ``[S, d_sae]``: latents that have not fired for ``dead_window_tokens`` tokens."""
        return self.tokens_since_fired >= self.settings.dead_window_tokens

    def refresh_dead_flag(self) -> None:
        """Read (one device sync) whether any latent is dead, to switch the AuxK pass on or off."""
        self.auxk_active = bool(self.dead_mask().any().item())

    def _auxk_loss(self, pre: torch.Tensor, residual: torch.Tensor, centered: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised AuxK loss ``[S]``; zero for a seed without dead latents.

        ``pre [S, B, d_sae]`` carries gradients itself, or (``centered = x - b_dec`` given) was
        computed without autograd and the selected entries get theirs through the sparse kernels.
        """
        dead = self.dead_mask()
        if centered is not None:  # the kernels path leaves the encoder bias out of pre
            pre = pre + self.b_enc.detach().unsqueeze(1).to(pre.dtype)
        masked = torch.where(dead.unsqueeze(1), pre, torch.full_like(pre, float("-inf")))
        values, indices = masked.topk(min(self.settings.aux_k, self.d_sae), dim=-1, sorted=False)
        if centered is None:
            reconstruction = self.decode_selected(values.relu(), indices)
        else:
            deferred = getattr(self, "_deferred", None)
            record = deferred.record(indices) if deferred is not None else None
            encoder_table, decoder_table = self.low_precision_weights() if deferred is not None and deferred.low_precision else (None, None)
            selected = selected_preactivations(pre, centered, self.W_enc, self.b_enc, self.b_dec, indices,
                                               encoder_table=encoder_table, record=record)
            # Seeds with fewer than aux_k dead latents also select live ones (value -inf above): they add nothing.
            codes = selected.relu() * dead.gather(1, indices.reshape(self.n_seeds, -1)).view_as(indices)
            reconstruction = sparse_decode(codes, self.W_dec, indices, table=decoder_table, record=record)
        error = (residual - reconstruction.float()).square().sum(dim=-1).mean(dim=-1)
        variance = (residual - residual.mean(dim=1, keepdim=True)).square().sum(dim=-1).mean(dim=-1)
        return (error / variance).nan_to_num(0.0) * dead.any(dim=-1)

    @torch.no_grad()
    def remove_parallel_decoder_gradient(self) -> None:
        """Project out of each decoder row's gradient its component along that (unit-norm) row."""
        gradient = self.W_dec.grad
        if gradient is None:
            return
        directions = self.W_dec / torch.linalg.vector_norm(self.W_dec, dim=-1, keepdim=True).clamp_min(1e-12)
        parallel = torch.linalg.vecdot(gradient, directions, dim=-1).unsqueeze(-1)
        gradient.addcmul_(parallel, directions, value=-1.0)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit L2 norm."""
        self.W_dec.div_(torch.linalg.vector_norm(self.W_dec, dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def clip_gradients_per_seed(self, max_norm: float) -> torch.Tensor:
        """Scale each seed's gradients so their joint L2 norm is at most ``max_norm`` (as
        ``torch.nn.utils.clip_grad_norm_`` does for one model); returns the norms before clipping ``[S]``."""
        grads = [parameter.grad for parameter in self.parameters() if parameter.grad is not None]
        squared = [torch.linalg.vector_norm(grad, dim=tuple(range(1, grad.dim())), dtype=torch.float32).square() for grad in grads]
        norms = torch.stack(squared).sum(dim=0).sqrt()
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for grad in grads:
            grad.mul_(scale.view(-1, *([1] * (grad.dim() - 1))).to(grad.dtype))
        return norms

    @torch.no_grad()
    def inference_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """The SAELens-layout tensors of seed slice ``index`` (float32, CPU).

        Batch-top-k variants also get ``threshold [d_sae]`` (the learned scalar threshold repeated),
        which is what SAELens's JumpReLU inference SAE expects.
        """
        tensors = {
            "W_enc": self.W_enc[index].detach().float().cpu().contiguous(),
            "W_dec": self.W_dec[index].detach().float().cpu().contiguous(),
            "b_enc": self.b_enc[index].detach().float().cpu().contiguous(),
            "b_dec": self.b_dec[index].detach().float().cpu().contiguous(),
        }
        if self.settings.architecture in BATCH_TOPK:
            tensors["threshold"] = self.threshold[index].detach().float().cpu().expand(self.d_sae).contiguous()
        return tensors


