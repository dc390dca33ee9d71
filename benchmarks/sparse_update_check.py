"""Full-size correctness check of the sparse update on the device (CUDA): the compiled Triton programs
against dense PyTorch products, and training against the dense autograd path.

1. :func:`sae_pipeline.sparse_kernels.latent_gradients` on top-k-like entries (bf16 operands and float32)
   against dense scattered ``bmm`` products with the same operand rounding;
2. :func:`sae_pipeline.sparse_kernels.sparse_adam_step` (given gradients) against projection, per-seed
   clipping, ``torch.optim.Adam`` and renormalisation, three steps;
3. ``--steps`` training steps of the sparse update (CUDA graphs) and of the dense path from the same
   weights on the same batches (bf16 autocast): losses side by side and the weights' relative distance.

    python benchmarks/sparse_update_check.py --d-in 512 --d-sae 16384 --k 40
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sae_pipeline.sae import kernels as sparse_kernels  # noqa: E402
from sae_pipeline.sae.kernels import programs as kernel_programs  # noqa: E402
from sae_pipeline.sae.trainer import SeedBatchedTrainer  # noqa: E402
from sae_pipeline.sae.training_model import SeedBatchedSAE  # noqa: E402
from sae_pipeline.settings import TrainSettings  # noqa: E402


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def gradient_programs(n_seeds: int, batch: int, k: int, d_sae: int, d_in: int, device: torch.device) -> None:
    generator = torch.Generator(device=device).manual_seed(0)
    indices = torch.rand(n_seeds, batch, d_sae, generator=generator, device=device).topk(k, dim=-1).indices
    indices[:, :, 0] = torch.where((indices[:, :, 1:] == 7).any(-1), indices[:, :, 0], 7)  # one latent chosen by almost every token
    a, c = (torch.randn(n_seeds, batch, k, generator=generator, device=device) for _ in range(2))
    dec_dense, enc_dense = (torch.randn(n_seeds, batch, d_in, generator=generator, device=device) for _ in range(2))
    W_dec = torch.randn(n_seeds, d_sae, d_in, generator=generator, device=device)
    entries = sparse_kernels.sort_entries_by_latent([indices], d_sae)
    for low in (True, False):
        grad_dec, grad_enc, statistics = sparse_kernels.latent_gradients(
            entries, a.reshape(-1)[entries["order"]], c.reshape(-1)[entries["order"]], dec_dense, enc_dense, W_dec, low)
        dtype = torch.bfloat16 if low else torch.float64
        codes = torch.zeros(n_seeds, batch, d_sae, device=device, dtype=dtype).scatter_(-1, indices, a.to(dtype))
        grads = torch.zeros(n_seeds, batch, d_sae, device=device, dtype=dtype).scatter_(-1, indices, c.to(dtype))
        if low:  # bf16-rounded operands, float32 products and sums (as the tensor cores do)
            want_dec = torch.bmm(codes.float().transpose(1, 2), dec_dense.to(dtype).float())
            want_enc = torch.bmm(enc_dense.to(dtype).float().transpose(1, 2), grads.float())
        else:
            want_dec = torch.bmm(codes.transpose(1, 2), dec_dense.double()).float()
            want_enc = torch.bmm(enc_dense.double().transpose(1, 2), grads).float()
        # bf16 gradients (autocast) are those sums rounded to bf16, as the dense path's bf16 products round them
        want_dec, want_enc = want_dec.to(grad_dec.dtype).float(), want_enc.to(grad_enc.dtype).float()
        want_statistics = torch.stack([want_dec.square().sum(-1), (want_dec * W_dec).sum(-1), W_dec.square().sum(-1), want_enc.square().sum(1)], -1)
        print(f"latent_gradients {'bf16   ' if low else 'float32'} ({str(grad_dec.dtype)[6:]} out) d_sae {d_sae} d_in {d_in} k {k}: rel. error W_dec {relative(grad_dec, want_dec):.2e}, "
              f"W_enc {relative(grad_enc, want_enc):.2e}, statistics {relative(statistics, want_statistics):.2e}; "
              f"finite {bool(torch.isfinite(grad_dec).all() and torch.isfinite(grad_enc).all())}")


def adam_program(device: torch.device) -> None:
    generator = torch.Generator(device=device).manual_seed(1)
    n_seeds, batch, d_sae, d_in, k = (2, 512, 4096, 320, 16) if device.type == "cuda" else (2, 32, 128, 24, 4)
    for unit_norm, clip in ((True, 1.0), (True, 0.01), (False, None)):
        settings = TrainSettings.from_mapping(dict(architecture="topk", k=k, d_sae=d_sae, unit_norm_decoder=unit_norm, grad_clip_norm=clip))
        models = [SeedBatchedSAE(settings, d_in, seeds=[0, 1], init_device=device) for _ in range(2)]
        optimizers = [torch.optim.Adam(models[0].parameters(), lr=1e-2, fused=device.type == "cuda"), torch.optim.Adam(models[1].parameters(), lr=1e-2)]
        worst = {}
        for _ in range(3):
            indices = torch.rand(n_seeds, batch, d_sae, generator=generator, device=device).topk(k, dim=-1).indices
            codes, grad_values = (torch.randn(n_seeds, batch, k, generator=generator, device=device) for _ in range(2))
            grad_out, centered = (torch.randn(n_seeds, batch, d_in, generator=generator, device=device) for _ in range(2))
            grad_b_enc = torch.randn(n_seeds, d_sae, generator=generator, device=device)
            grad_b_dec = torch.randn(n_seeds, d_in, generator=generator, device=device)
            reference, fused = models
            reference.W_dec.grad = torch.bmm(torch.zeros(n_seeds, batch, d_sae, device=device).scatter_(-1, indices, codes).transpose(1, 2), grad_out)
            reference.W_enc.grad = torch.bmm(centered.transpose(1, 2), torch.zeros(n_seeds, batch, d_sae, device=device).scatter_(-1, indices, grad_values))
            reference.b_enc.grad, reference.b_dec.grad = grad_b_enc.clone(), grad_b_dec.clone()
            if unit_norm:
                reference.remove_parallel_decoder_gradient()
            if clip is not None:
                reference.clip_gradients_per_seed(clip)
            optimizers[0].step()
            if unit_norm:
                reference.normalize_decoder()
            deferred = sparse_kernels.DeferredWeightGradients(low_precision=False)
            deferred.record(indices).update(decoder_weights=codes, decoder_dense=grad_out, encoder_weights=grad_values, encoder_dense=centered)
            fused.b_enc.grad, fused.b_dec.grad = grad_b_enc.clone(), grad_b_dec.clone()
            low = fused.low_precision_weights()
            sparse_kernels.sparse_adam_step(optimizers[1], deferred, fused.W_enc, fused.W_dec, fused.b_enc, fused.b_dec, low, clip, unit_norm)
            for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
                worst[name] = max(worst.get(name, 0.0), ((getattr(fused, name) - getattr(reference, name)).abs().max()).item())
            worst["bf16 copies"] = max(relative(low[0], fused.W_enc), relative(low[1], fused.W_dec))
        print(f"sparse_adam_step unit_norm={unit_norm} clip={clip}: max |fused - torch| after 3 steps " +
              ", ".join(f"{name} {value:.1e}" for name, value in worst.items()))


def training(d_in: int, d_sae: int, k: int, batch: int, steps: int, device: torch.device) -> None:
    generator = torch.Generator(device=device).manual_seed(2)
    batches = [torch.randn(batch, d_in, generator=generator, device=device) + 1.0 for _ in range(8)]
    trajectories, weights = {}, {}
    for mode in ("kernels", False):
        settings = TrainSettings.from_mapping(dict(architecture="topk", k=k, d_sae=d_sae, batch_size=batch, total_tokens=batch * steps,
                                                   lr=2e-4, warmup_steps=0, decay_fraction=0.0, sparse_decoder=mode, dead_window_tokens=batch * 4))
        model = SeedBatchedSAE(settings, d_in, seeds=[0], b_dec=torch.zeros(d_in), init_device=device)
        trainer = SeedBatchedTrainer(model, device)
        losses = []
        for step in range(steps):
            if step % 10 == 5:
                model.refresh_dead_flag()  # AuxK switches on once latents are dead
            statistics = trainer.step(batches[step % len(batches)], statistics=step % 10 == 0)
            if statistics is not None:
                losses.append(statistics[0, 0].item())
        trajectories[mode] = (losses, model.sparse_update, model.auxk_active)
        weights[mode] = [parameter.detach().clone() for parameter in model.parameters()]
        del model, trainer
    print(f"training d_in {d_in} d_sae {d_sae} k {k}, {steps} steps: sparse update {trajectories['kernels'][1]} (AuxK on at the end: "
          f"{trajectories['kernels'][2]}) vs dense autograd; loss every 10 steps")
    print("  sparse: " + " ".join(f"{value:.4f}" for value in trajectories["kernels"][0]))
    print("  dense:  " + " ".join(f"{value:.4f}" for value in trajectories[False][0]))
    print("  relative weight distance after training: " + ", ".join(
        f"{name} {relative(sparse, dense):.2e}" for name, sparse, dense in zip(("W_enc", "W_dec", "b_enc", "b_dec"), weights["kernels"], weights[False])))


def selection_and_decode(batch: int, k: int, d_sae: int, d_in: int, device: torch.device) -> None:
    """The top-k program (bf16 pre-activations, float32 bias added on the fly) against torch.topk of the float32
    sums, the decode program against embedding_bag and the selected dots against einsum in float32, at full size."""
    generator = torch.Generator(device=device).manual_seed(1)
    pre = torch.randn(1, batch, d_sae, generator=generator, device=device).bfloat16()
    bias = torch.randn(1, d_sae, generator=generator, device=device) * 0.1
    columns = sparse_kernels.topk_columns(pre, k, bias)
    biased = pre.float() + bias.unsqueeze(1)
    same = torch.equal(biased.gather(-1, columns).sort(dim=-1).values, biased.topk(k, dim=-1).values.sort(dim=-1).values)
    distinct = bool((columns.sort(dim=-1).values.diff(dim=-1) > 0).all())
    table = torch.randn(1, d_sae, d_in, generator=generator, device=device).bfloat16()
    values = torch.randn(1, batch, k, generator=generator, device=device)
    decoded = sparse_kernels.decode_rows(values, columns, table)
    want = sparse_kernels.embedding_bag_rows(values, columns, table.float())
    dense = torch.randn(1, batch, d_in, generator=generator, device=device)
    dots = sparse_kernels.selected_dots(dense, columns, table)
    want_dots = torch.einsum("sbkd,sbd->sbk", table.float()[0][columns[0]].unsqueeze(0), dense)
    print(f"top-k ({d_sae} latents, k {k}, TOPK_ROWS {kernel_programs.TOPK_ROWS}): selected values equal torch.topk's: {same}, "
          f"distinct: {distinct}; decode (DECODE_WIDE_COLUMNS {kernel_programs.DECODE_WIDE_COLUMNS}) vs embedding_bag: rel. error "
          f"{relative(decoded, want):.1e}; selected dots (SELECTED_DOT_WIDE_COLUMNS {kernel_programs.SELECTED_DOT_WIDE_COLUMNS}) vs einsum: "
          f"rel. error {relative(dots, want_dots):.1e}")
    if not (same and distinct):
        raise SystemExit("top-k selection differs from torch.topk")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--k", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu with TRITON_INTERPRET=1 (the programs in Triton's interpreter; small sizes)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="set a constant of sae_pipeline.sae.kernels.updates or .programs first (e.g. GRAD_ONE_PASS_ENTRIES_PER_BLOCK=0: round 1's program)")
    args = parser.parse_args()
    if args.set:
        import ast

        from sae_pipeline.sae.kernels import updates

        def holder(name: str):
            return updates if hasattr(updates, name) else kernel_programs if hasattr(kernel_programs, name) else None

        for assignment in args.set:
            name, _, value = assignment.partition("=")
            if holder(name) is None:
                parser.error(f"--set: sae_pipeline.sae.kernels.updates / programs have no constant {name}")
            setattr(holder(name), name, ast.literal_eval(value))
        print("set: " + ", ".join(f"{name}={getattr(holder(name), name)!r}" for name in (part.partition("=")[0] for part in args.set)))
    device = torch.device(args.device)
    if device.type == "cpu":
        kernel_programs.INTERPRET_ON_CPU = True
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU (Triton interpreter)'}; torch {torch.__version__}")
    selection_and_decode(args.batch, args.k, args.d_sae, args.d_in, device)
    gradient_programs(1, args.batch, args.k, args.d_sae, args.d_in, device)
    adam_program(device)
    training(args.d_in, args.d_sae, args.k, args.batch, args.steps, device)


if __name__ == "__main__":
    main()
