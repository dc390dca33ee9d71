"""Training throughput of the seed-batched TopK SAE, beside SAELens's TopK training step.

Measures, on the same activations (random data with a constant offset, resident on the device):

- our step (sae_pipeline.sae.trainer.SeedBatchedTrainer) for 1 seed and for ``--seeds`` seeds fused,
  for each ``--decoders`` mode: ``kernels`` (sparse Triton forward and backward; the default on
  CUDA), ``dense`` (autograd with dense decoder products), ``embedding_bag`` (autograd gathering
  the k selected decoder rows); on CUDA each step is a CUDA-graph replay as in training
  (``--eager-too`` adds the same steps launched kernel by kernel);
- SAELens's ``TopKTrainingSAE`` step as ``SAETrainer._train_step`` runs it (forward under bf16
  autocast on CUDA, dead-latent bookkeeping, backward, ``clip_grad_norm_(1.0)``, Adam), when
  ``sae_lens`` can be imported;
- optionally (``--loader``) end to end: Parquet shards written to a temporary folder and streamed
  by ``sae_pipeline.data.loader.ActivationLoader`` into the fused trainer, plus the loader alone.

Prints tokens/s (activation rows per second; a fused step trains every seed on each row),
milliseconds per step, the fused/single time ratio, the speed-up over SAELens, and on CUDA the
GPU utilisation sampled from NVML / nvidia-smi during each timed loop and the number of host
syncs one step triggers (``torch.cuda.set_sync_debug_mode``).

    python benchmarks/train_throughput.py                 # d=512, 16384 latents, k=40, batch 4096
    python benchmarks/train_throughput.py --small         # CPU-sized: d=128, 1024 latents, k=16, batch 1024
    PYTHONPATH=/tmp/saelens_site python benchmarks/train_throughput.py --small   # with SAELens from wheels
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sae_pipeline.runtime.devices import resolve_device  # noqa: E402
from sae_pipeline.sae.trainer import SeedBatchedTrainer  # noqa: E402
from sae_pipeline.sae.training_model import SeedBatchedSAE  # noqa: E402
from sae_pipeline.settings import TrainSettings  # noqa: E402

FULL = dict(d_in=512, d_sae=16384, k=40, batch=4096, steps=50, warmup=10)
SMALL = dict(d_in=128, d_sae=1024, k=16, batch=1024, steps=20, warmup=3)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class UtilisationSampler:
    """Samples GPU utilisation (percent) every 50 ms in a thread, via NVML or nvidia-smi."""

    def __init__(self, device: torch.device):
        self.device = device
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read = self._reader()

    def _reader(self) -> Callable[[], float] | None:
        if self.device.type != "cuda":
            return None
        index = self.device.index or 0
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:
            pass
        if shutil.which("nvidia-smi"):
            command = ["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
            return lambda: float(subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[0])
        return None

    def __enter__(self) -> "UtilisationSampler":
        if self._read is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.samples.append(self._read())
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> str:
        if self._read is None:
            return "n/a"
        if not self.samples:
            return "no samples"
        return f"{statistics.mean(self.samples):.0f}% (n={len(self.samples)})"


def time_steps(step: Callable[[torch.Tensor], object], pool: torch.Tensor, steps: int, warmup: int, device: torch.device,
               min_seconds: float = 0.0) -> dict:
    """Run ``warmup`` then at least ``steps`` steps (more if needed to last ``min_seconds``, so the
    utilisation sampler sees enough samples) over the batches of ``pool [n, B, d]``; seconds per step and utilisation."""
    for index in range(warmup):
        step(pool[index % len(pool)])
    synchronize(device)
    if min_seconds > 0:
        start = time.perf_counter()
        for index in range(10):
            step(pool[index % len(pool)])
        synchronize(device)
        steps = max(steps, int(min_seconds * 10 / (time.perf_counter() - start)))
    with UtilisationSampler(device) as sampler:
        start = time.perf_counter()
        for index in range(steps):
            step(pool[index % len(pool)])
        synchronize(device)
        elapsed = time.perf_counter() - start
    return {"seconds_per_step": elapsed / steps, "utilisation": sampler.summary(), "steps": steps}


def count_syncs(step: Callable[[torch.Tensor], object], x: torch.Tensor, device: torch.device) -> str:
    """Host-device synchronisations during one step, as torch's sync debug mode reports them."""
    if device.type != "cuda":
        return "n/a (CPU)"
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(x)
            synchronize(device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    reasons = sorted({str(warning.message).splitlines()[0][:80] for warning in caught})
    return f"{len(caught)}" + (f" ({'; '.join(reasons)})" if reasons else "")


DECODER_SETTINGS = {"kernels": "kernels", "dense": False, "embedding_bag": True}


def our_trainer(sizes: dict, seeds: int, sparse_decoder: bool | str, device: torch.device, cuda_graphs: bool = True) -> SeedBatchedTrainer:
    settings = TrainSettings.from_mapping(dict(
        architecture="topk", k=sizes["k"], d_sae=sizes["d_sae"], batch_size=sizes["batch"],
        total_tokens=sizes["batch"] * 1_000_000, lr=2e-4, lr_scale_with_width=True, warmup_steps=0,
        sparse_decoder=sparse_decoder, device=str(device),
    ))
    model = SeedBatchedSAE(settings, sizes["d_in"], seeds=list(range(seeds)), b_dec=torch.zeros(sizes["d_in"])).to(device)
    return SeedBatchedTrainer(model, device, cuda_graphs=cuda_graphs)


def our_step(sizes: dict, seeds: int, sparse_decoder: bool | str, device: torch.device, cuda_graphs: bool = True) -> Callable[[torch.Tensor], object]:
    """Our training step as the train loop runs it between logging steps (no statistics read);
    on CUDA a graph replay unless ``cuda_graphs`` is off."""
    trainer = our_trainer(sizes, seeds, sparse_decoder, device, cuda_graphs)
    return lambda x: trainer.step(x, statistics=False)


def saelens_step(sizes: dict, device: torch.device) -> Callable[[torch.Tensor], object] | str:
    """SAELens's TopK training step (as SAETrainer._train_step runs it), or why it is unavailable."""
    try:
        import sae_lens
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput
    except Exception as error:  # reported, not fatal: SAELens is optional here
        return f"unavailable ({type(error).__name__}: {error})"
    config = TopKTrainingSAEConfig(d_in=sizes["d_in"], d_sae=sizes["d_sae"], k=sizes["k"], dtype="float32", device=str(device),
                                   aux_loss_coefficient=1.0 / 32.0)
    sae = TopKTrainingSAE(config)
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4, betas=(0.9, 0.999))
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    since_fired = torch.zeros(sizes["d_sae"], device=device)
    dead_window = 1000
    state = {"steps": 0}

    def step(x: torch.Tensor) -> None:
        nonlocal since_fired
        sae.train()
        with autocast:
            output = sae.training_forward_pass(step_input=TrainStepInput(
                sae_in=x, coefficients={}, dead_neuron_mask=(since_fired > dead_window).bool(),
                n_training_steps=state["steps"], is_logging_step=False))
            with torch.no_grad():
                firing = output.feature_acts.bool().float()
                did_fire = firing.sum(-2).bool()
                since_fired += 1
                since_fired[did_fire] = 0
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        state["steps"] += 1

    step.version = sae_lens.__version__  # type: ignore[attr-defined]
    return step


def loader_benchmark(sizes: dict, seeds: int, device: torch.device, batches: int) -> None:
    """End to end from Parquet shards: the loader alone, then loader + fused trainer."""
    from sae_pipeline.data.loader import ActivationLoader, write_synthetic_cache
    from sae_pipeline.data.shards import ActivationStore

    rows = sizes["batch"] * min(batches, 64)
    folder = Path(tempfile.mkdtemp(prefix="train_throughput_"))
    try:
        activations = (np.random.default_rng(0).standard_normal((rows, sizes["d_in"])) + 1.0).astype(np.float16)
        start = time.perf_counter()
        store = ActivationStore(write_synthetic_cache(folder, activations, context_size=128, rows_per_shard=min(rows, 262144), dtype="float16"))
        print(f"  wrote {rows} rows of Parquet shards in {time.perf_counter() - start:.1f} s")

        def loader() -> ActivationLoader:
            return ActivationLoader(store, sizes["batch"], batches, seed=0, shuffle_buffer_rows=min(rows, 524288), device=device)

        start = time.perf_counter()
        for batch in loader():
            pass
        synchronize(device)
        elapsed = time.perf_counter() - start
        print(f"  loader alone: {batches * sizes['batch'] / elapsed / 1e6:.2f} M tokens/s ({batches} batches)")
        elapsed_by_seeds = {}
        for n_seeds in sorted({1, seeds}):
            trainer = our_trainer(sizes, n_seeds, "auto", device)
            iterator = iter(loader())
            trainer.step(next(iterator))
            synchronize(device)
            with UtilisationSampler(device) as sampler:
                start = time.perf_counter()
                count = 0
                for batch in iterator:
                    trainer.step(batch, statistics=False)
                    count += 1
                synchronize(device)
                elapsed = time.perf_counter() - start
            elapsed_by_seeds[n_seeds] = elapsed / count
            print(f"  loader + {n_seeds} seed(s){' fused' if n_seeds > 1 else ''}: {count * sizes['batch'] / elapsed / 1e6:.3f} M tokens/s, "
                  f"{1000 * elapsed / count:.2f} ms/step, GPU utilisation {sampler.summary()}")
        if seeds > 1:
            print(f"  end to end from Parquet, {seeds} fused seeds take {elapsed_by_seeds[seeds] / elapsed_by_seeds[1]:.2f}x "
                  f"the time of 1 seed (target <= 1.5x)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU-sized problem (d=128, 1024 latents, k=16, batch 1024)")
    parser.add_argument("--d-in", type=int)
    parser.add_argument("--d-sae", type=int)
    parser.add_argument("--k", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int, help="timed steps per configuration (at least)")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="on CUDA, time enough steps to last this long (utilisation samples)")
    parser.add_argument("--warmup", type=int, help="untimed steps first")
    parser.add_argument("--seeds", type=int, default=3, help="seeds fused in the batched configuration")
    parser.add_argument("--decoders", default="kernels,dense", help="comma-separated decoder modes to time: kernels, dense, embedding_bag")
    parser.add_argument("--no-saelens", action="store_true")
    parser.add_argument("--eager-too", action="store_true", help="also time our step without CUDA graphs (every kernel launched from Python)")
    parser.add_argument("--loader", action="store_true", help="also measure end to end from Parquet shards")
    parser.add_argument("--loader-batches", type=int, default=100)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    sizes = dict(SMALL if args.small else FULL)
    for key in ("d_in", "d_sae", "k", "batch", "steps", "warmup"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(resolve_device(args.device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}")
    print(f"sizes: d_in={sizes['d_in']} d_sae={sizes['d_sae']} k={sizes['k']} batch={sizes['batch']}; "
          f"{sizes['steps']} timed steps after {sizes['warmup']} warm-up; autocast bf16 on CUDA, fp32 on CPU")

    generator = torch.Generator().manual_seed(0)
    pool = (torch.randn(8, sizes["batch"], sizes["d_in"], generator=generator) + 1.0).to(device)
    results: dict[str, dict] = {}

    def report(label: str, step: Callable[[torch.Tensor], object], seeds: int) -> None:
        measured = time_steps(step, pool, sizes["steps"], sizes["warmup"], device, args.min_seconds if device.type == "cuda" else 0.0)
        measured["tokens_per_second"] = sizes["batch"] / measured["seconds_per_step"]
        measured["syncs"] = count_syncs(step, pool[0], device)
        results[label] = measured
        print(f"{label:<34} {measured['steps']:5d} steps {1000 * measured['seconds_per_step']:8.2f} ms/step  {measured['tokens_per_second'] / 1e6:7.3f} M tokens/s  "
              f"{seeds * measured['tokens_per_second'] / 1e6:7.3f} M seed-tokens/s  GPU util {measured['utilisation']}  host syncs/step {measured['syncs']}")

    decoders = [kind.strip() for kind in args.decoders.split(",") if kind.strip()]
    unknown = sorted(set(decoders) - set(DECODER_SETTINGS))
    if unknown:
        parser.error(f"--decoders: unknown mode(s) {unknown}; choose from {sorted(DECODER_SETTINGS)}")
    for kind in decoders:
        mode = DECODER_SETTINGS[kind]
        report(f"ours, 1 seed, {kind}", our_step(sizes, 1, mode, device), 1)
        report(f"ours, {args.seeds} seeds fused, {kind}", our_step(sizes, args.seeds, mode, device), args.seeds)
        if args.eager_too and device.type == "cuda":
            report(f"ours, 1 seed, {kind}, no CUDA graph", our_step(sizes, 1, mode, device, cuda_graphs=False), 1)
            report(f"ours, {args.seeds} seeds, {kind}, no CUDA graph", our_step(sizes, args.seeds, mode, device, cuda_graphs=False), args.seeds)
    saelens = None if args.no_saelens else saelens_step(sizes, device)
    if callable(saelens):
        report(f"SAELens {saelens.version} TopK, 1 seed", saelens, 1)
    elif saelens is not None:
        print(f"SAELens: {saelens}")

    print("summary:")
    for kind in decoders:
        single, fused = results[f"ours, 1 seed, {kind}"], results[f"ours, {args.seeds} seeds fused, {kind}"]
        print(f"  {kind}, step only (activations resident on the device): {args.seeds} fused seeds take "
              f"{fused['seconds_per_step'] / single['seconds_per_step']:.2f}x the time of 1 seed (target <= 1.5x)")
        if callable(saelens):
            reference = results[f"SAELens {saelens.version} TopK, 1 seed"]["tokens_per_second"]
            print(f"  {kind}: 1 seed at {single['tokens_per_second'] / reference:.2f}x SAELens tokens/s; "
                  f"{args.seeds} fused seeds at {args.seeds * fused['tokens_per_second'] / reference:.2f}x SAELens seed-tokens/s (target >= 1.5x)")
    if args.loader:
        print("end to end from Parquet:")
        loader_benchmark(sizes, args.seeds, device, args.loader_batches)


if __name__ == "__main__":
    main()
