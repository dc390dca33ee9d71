"""Training throughput of the seed-batched TopK SAE, beside sparsify's and SAELens's TopK training steps.

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

Table mode (``--table``, or several values in ``--d-in`` / ``--d-sae`` / ``--k``): for every size, our
1-seed step (CUDA-graph replay as in training), sparsify's and SAELens's steps (each library in a
subprocess of its own, with ``--sparsify-path`` / ``--saelens-path`` prepended to its PYTHONPATH: SAELens
6.54 needs transformer-lens 3.x, which then lives in its own folder), the floor (the bf16 encoder forward
GEMM plus torch's fused Adam over all parameters, each timed alone), every ratio, and our step's peak
GPU memory; ``--profile`` adds a per-kernel time table of our step per size, ``--memory-d-sae`` a width
(e.g. 1,048,576) at the largest d_in whose step is timed for memory, with the widest dictionary that
fits estimated from two widths and tried; ``--variant LABEL:NAME=VALUE,...`` (repeatable) also times our step with
those constants of ``sae_pipeline.sae.kernels.updates`` set, back to back with the defaults at every size (the
defaults timed again after the variants, so drift shows), profiled where the defaults are::

    python benchmarks/train_throughput.py --d-in 512,2304 --d-sae 16384,65536,131072,262144 --k 40,64 \
        --sparsify-path /tmp/sparsify --saelens-path /tmp/saelens --memory-d-sae 1048576 --json results.json
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
    model = SeedBatchedSAE(settings, sizes["d_in"], seeds=list(range(seeds)), b_dec=torch.zeros(sizes["d_in"]), init_device=device)
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


# --------------------------------------------------------------------------------------------------
# Table mode: our step against sparsify, SAELens and the floor over many sizes.

# Modules SAELens / sparsify import at import time but never use in a training step; stand-ins are
# installed only where the real module is missing (the GPU machine has no wandb, plotly or datasets).
OPTIONAL_IMPORTS = {"wandb", "plotly", "plotly_express", "babe", "nltk", "datasets", "schedulefree", "transformers_stream_generator"}


def install_import_stand_ins(names: set[str]) -> list[str]:
    """Let ``import name`` (and its submodules) succeed with empty stand-in modules for each missing top-level name."""
    import importlib.abc
    import importlib.machinery
    import importlib.util
    import types

    missing = {name for name in names if importlib.util.find_spec(name) is None}

    class StandIn(types.ModuleType):
        def __getattr__(self, attribute: str):
            if attribute.startswith("__"):
                raise AttributeError(attribute)
            value = type(attribute, (), {"__init__": lambda self, *args, **kwargs: None})
            setattr(self, attribute, value)
            return value

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname.split(".")[0] in missing:
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            module = StandIn(spec.name)
            module.__path__ = []
            return module

        def exec_module(self, module) -> None:
            pass

    if missing:
        sys.meta_path.insert(0, Finder())
    return sorted(missing)


def measure(step: Callable[[torch.Tensor], object], pool: torch.Tensor, device: torch.device, warmup: int, min_steps: int,
            min_seconds: float) -> float:
    """Seconds per step: ``warmup`` untimed steps, then rounds of 5 until ``min_steps`` and ``min_seconds`` are reached."""
    for index in range(warmup):
        step(pool[index % len(pool)])
    synchronize(device)
    count, start = 0, time.perf_counter()
    while True:
        for _ in range(5):
            step(pool[count % len(pool)])
            count += 1
        synchronize(device)
        elapsed = time.perf_counter() - start
        if count >= min_steps and elapsed >= min_seconds:
            return elapsed / count


def input_pool(sizes: dict, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(0)
    return torch.randn(8, sizes["batch"], sizes["d_in"], generator=generator, device=device) + 1.0


def sparsify_step(sizes: dict, device: torch.device) -> Callable[[torch.Tensor], object]:
    """sparsify's TopK SparseCoder step as its trainer runs it (decoder renormalised, forward under its own
    bf16 autocast, FVU backward, parallel decoder gradient removed, Adam; no AuxK), with torch's fused Adam."""
    install_import_stand_ins(OPTIONAL_IMPORTS)
    import sparsify
    from sparsify.config import SparseCoderConfig
    from sparsify.sparse_coder import SparseCoder

    sae = SparseCoder(sizes["d_in"], SparseCoderConfig(num_latents=sizes["d_sae"], k=sizes["k"]), device=device, dtype=torch.float32)
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4, betas=(0.9, 0.999), fused=device.type == "cuda")

    def step(x: torch.Tensor) -> None:
        sae.set_decoder_norm_to_unit_norm()
        sae(x).fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.version = sparsify.__version__  # type: ignore[attr-defined]
    return step


def worker(kind: str, configs: list[dict], args: argparse.Namespace) -> None:
    """Time one library's step at every size (in this process), printing one ``RESULT {json}`` line per size."""
    import json

    device = torch.device(resolve_device(args.device))
    if kind == "saelens":
        install_import_stand_ins(OPTIONAL_IMPORTS)
    for sizes in configs:
        result = dict(sizes)
        try:
            torch.cuda.empty_cache() if device.type == "cuda" else None
            pool = input_pool(sizes, device)
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            step = sparsify_step(sizes, device) if kind == "sparsify" else saelens_step(sizes, device)
            if isinstance(step, str):
                raise RuntimeError(step)
            result["seconds_per_step"] = measure(step, pool, device, args.table_warmup, args.table_steps, args.min_seconds)
            result["version"] = getattr(step, "version", "?")
            if device.type == "cuda":
                result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
            del step, pool
        except Exception as error:  # reported in the table, not fatal
            result["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        print("RESULT " + json.dumps(result), flush=True)


def run_worker(kind: str, path: str | None, configs: list[dict], args: argparse.Namespace) -> dict[tuple, dict]:
    """Run :func:`worker` for ``kind`` in a subprocess (``path`` first on its PYTHONPATH); results by (d_in, d_sae, k)."""
    import json
    import os

    environment = dict(os.environ)
    repository = str(Path(__file__).resolve().parent.parent)
    environment["PYTHONPATH"] = os.pathsep.join(part for part in (path, repository, environment.get("PYTHONPATH")) if part)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--worker-configs", json.dumps(configs),
               "--min-seconds", str(args.min_seconds), "--table-steps", str(args.table_steps), "--table-warmup", str(args.table_warmup),
               "--device", args.device]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, env=environment)
    results = {}
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            results[(result["d_in"], result["d_sae"], result["k"])] = result
    if completed.returncode != 0 or not results:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
        print(f"  {kind} worker exited {completed.returncode}: {' | '.join(tail)}")
    print(f"  {kind}: {len(results)} sizes in {time.perf_counter() - started:.0f} s")
    return results


def floor_seconds(sizes: dict, device: torch.device, args: argparse.Namespace) -> tuple[float, float]:
    """(bf16 encoder forward GEMM ``[B, d_in] x [d_in, d_sae]``, torch's fused Adam over W_enc, W_dec, b_enc, b_dec), each timed alone."""
    generator = torch.Generator(device=device).manual_seed(1)
    d_in, d_sae = sizes["d_in"], sizes["d_sae"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(sizes["batch"], d_in, generator=generator, device=device).to(dtype)
    weight = torch.randn(d_in, d_sae, generator=generator, device=device).to(dtype)
    gemm = measure(lambda _: torch.mm(x, weight), x.unsqueeze(0), device, args.table_warmup, args.table_steps, args.min_seconds / 2)
    x = weight = None  # freed before the optimizer's tensors are made
    parameters = [torch.randn(shape, generator=generator, device=device) for shape in ((d_in, d_sae), (d_sae, d_in), (d_sae,), (d_in,))]
    for parameter in parameters:
        parameter.grad = torch.randn(parameter.shape, generator=generator, device=device)
    optimizer = torch.optim.Adam(parameters, lr=1e-4, fused=device.type == "cuda")
    adam = measure(lambda _: optimizer.step(), torch.zeros(1, 1), device, args.table_warmup, args.table_steps, args.min_seconds / 2)
    return gemm, adam


def profile_table(step: Callable[[torch.Tensor], object], pool: torch.Tensor, device: torch.device, steps: int = 10, rows: int = 14) -> str:
    """Per-kernel device time of ``steps`` steps (ms per step, share), longest first, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for index in range(3):
        step(pool[index % len(pool)])
    synchronize(device)
    with profile(activities=activities) as profiler:
        for index in range(steps):
            step(pool[index % len(pool)])
        synchronize(device)
    totals: dict[str, list] = {}
    for event in profiler.events():
        if device.type == "cuda" and getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        if device.type != "cuda" and event.cpu_parent is not None:
            continue
        duration = event.time_range.elapsed_us()
        entry = totals.setdefault(event.name, [0.0, 0])
        entry[0] += duration
        entry[1] += 1
    total = sum(value[0] for value in totals.values()) or 1.0
    lines = [f"    {'kernel':<72} {'ms/step':>8} {'share':>6} {'calls/step':>10}"]
    for name, (duration, calls) in sorted(totals.items(), key=lambda item: -item[1][0])[:rows]:
        lines.append(f"    {name[:72]:<72} {duration / 1000 / steps:8.3f} {100 * duration / total:5.1f}% {calls / steps:10.1f}")
    lines.append(f"    {'all kernels':<72} {total / 1000 / steps:8.3f} {100.0:5.1f}% {sum(v[1] for v in totals.values()) / steps:10.1f}")
    return "\n".join(lines)


def our_measurement(sizes: dict, device: torch.device, args: argparse.Namespace, architecture: str = "topk",
                    profile: bool = False, min_steps: int | None = None, overrides: dict | None = None) -> dict:
    """Our 1-seed step (graph replay on CUDA) at ``sizes``: seconds per step, peak memory beyond the inputs, optional profile;
    ``overrides``: further TrainSettings (``--architectures NAME:KEY=VALUE``)."""
    result: dict = {}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    pool = input_pool(sizes, device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    settings = TrainSettings.from_mapping(dict(
        architecture=architecture, k=sizes["k"], d_sae=sizes["d_sae"], batch_size=sizes["batch"], total_tokens=sizes["batch"] * 1_000_000,
        lr=2e-4, warmup_steps=0, sparse_decoder="auto", device=str(device), **(overrides or {})))
    model = SeedBatchedSAE(settings, sizes["d_in"], seeds=[0], b_dec=torch.zeros(sizes["d_in"]), init_device=device)
    trainer = SeedBatchedTrainer(model, device)
    if device.type == "cuda":  # the peak of training (weights, optimizer state, step buffers), not of drawing the initial weights
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    result["path"] = "sparse update" if model.sparse_update else model.decoder_mode if model.sparse_codes else "dense autograd"

    def step(x: torch.Tensor) -> None:
        trainer.step(x, statistics=False)

    result["seconds_per_step"] = measure(step, pool, device, args.table_warmup, args.table_steps if min_steps is None else min_steps, args.min_seconds)
    result["cuda_graph"] = device.type == "cuda" and not trainer._uncapturable
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
    if settings.architecture == "batchtopk" and model.sparse_codes:  # tokens whose candidates were all kept, over every step timed
        result["capped_token_share"] = float(model.capped_tokens.sum()) / max(1, trainer.step_index * sizes["batch"])
    if profile:
        eager = SeedBatchedTrainer(model, device, cuda_graphs=False)
        result["profile"] = profile_table(lambda x: eager.step(x, statistics=False), pool, device, rows=getattr(args, "profile_rows", 14))
    trainer = model = pool = None  # freed before the next measurement
    return result


def gradient_check(sizes: dict, device: torch.device) -> str:
    """At full size on the device: the sparse update's first step against the dense autograd path's (both from
    the same weights, bf16 autocast): relative differences of the updated weights' changes."""
    changes = {}
    x = input_pool(sizes, device)[0]
    for mode in ("kernels", False):
        settings = TrainSettings.from_mapping(dict(architecture="topk", k=sizes["k"], d_sae=sizes["d_sae"], batch_size=sizes["batch"],
                                                   total_tokens=sizes["batch"] * 100, lr=1e-3, warmup_steps=0, sparse_decoder=mode))
        model = SeedBatchedSAE(settings, sizes["d_in"], seeds=[0], b_dec=torch.zeros(sizes["d_in"]), init_device=device)
        start = [parameter.detach().clone() for parameter in model.parameters()]
        trainer = SeedBatchedTrainer(model, device, cuda_graphs=False)
        trainer.step(x, statistics=False)
        changes[mode] = ([(parameter.detach() - first) for parameter, first in zip(model.parameters(), start)], model.sparse_update)
        del model, trainer, start
    parts = []
    for name, sparse, dense in zip(("W_enc", "W_dec", "b_enc", "b_dec"), changes["kernels"][0], changes[False][0]):
        parts.append(f"{name} {((sparse - dense).norm() / dense.norm().clamp_min(1e-30)).item():.2e}")
    return f"sparse update used: {changes['kernels'][1]}; |change_sparse - change_dense| / |change_dense| after one Adam step: " + ", ".join(parts)


def constant_module(name: str):
    """The first module holding constant ``name`` of :mod:`~sae_pipeline.sae.kernels.updates`,
    :mod:`~sae_pipeline.sae.kernels.entries` (the entry sort), :mod:`~sae_pipeline.sae.kernels.programs` (the top-k constants), :mod:`~sae_pipeline.sae.training_model`,
    :mod:`~sae_pipeline.sae.losses` and :mod:`~sae_pipeline.sae.kernels.ops` (the last three: upper-case names only);
    None if none has it."""
    from sae_pipeline.sae import losses, training_model
    from sae_pipeline.sae.kernels import entries, ops, programs, updates

    candidates = (updates, entries, programs) + ((training_model, losses, ops) if name.isupper() else ())
    return next((module for module in candidates if hasattr(module, name)), None)


def parse_variants(texts: list[str]) -> dict[str, dict]:
    """``LABEL:NAME=VALUE,NAME=VALUE`` (values as Python literals) -> {label: {name: value}}; names must be
    constants of :mod:`sae_pipeline.sae.kernels.updates` or :mod:`sae_pipeline.sae.kernels.programs`."""
    import ast

    variants = {}
    for text in texts:
        label, _, assignments = text.partition(":")
        if not label or not assignments:
            raise ValueError(f"--variant {text!r}: expected LABEL:NAME=VALUE[,NAME=VALUE]")
        constants = {}
        for assignment in assignments.split(","):
            name, _, value = assignment.partition("=")
            if constant_module(name.strip()) is None:
                raise ValueError(f"--variant {text!r}: sae_pipeline.sae.kernels.updates / programs have no constant {name.strip()}")
            constants[name.strip()] = ast.literal_eval(value.strip())
        variants[label] = constants
    return variants


@contextlib.contextmanager
def constants_set(constants: dict):
    """Set constants of :mod:`sae_pipeline.sae.kernels.updates` / ``programs`` for the block, restored after."""
    saved = {name: getattr(constant_module(name), name) for name in constants}
    try:
        for name, value in constants.items():
            setattr(constant_module(name), name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(constant_module(name), name, value)


def gradient_program_ms(profile: str | None, prefix: str = "_latent_gradients") -> float | None:
    """The ms/step of the kernels whose names start with ``prefix`` (default: the gradient programs, looping or
    one-pass) from a :func:`profile_table`, if listed."""
    if not profile:
        return None
    total = [float(line.split()[1]) for line in profile.splitlines() if line.strip().startswith(prefix)]
    return sum(total) if total else None


# Kernels whose ms/step the variant comparison prints per variant (profile-name prefix -> label).
VARIANT_KERNELS = {"_latent_gradients": "gradient program", "_topk_program": "top-k", "_adam_rows_program": "Adam rows",
                   "_adam_flat_program": "Adam flat", "_decode": "decode",
                   "_selected_dot": "selected dots"}


def table_main(args: argparse.Namespace, device: torch.device) -> None:
    import itertools
    import json

    def values(text: str | int | None, default: int) -> list[int]:
        return [default] if text is None else [int(part) for part in str(text).split(",") if part.strip()]

    d_ins, d_saes, ks = values(args.d_in, 512), values(args.d_sae, 16384), values(args.k, 40)
    batch = int(args.batch or 4096)
    configs = [dict(d_in=d_in, d_sae=d_sae, k=k, batch=batch) for d_in, d_sae, k in itertools.product(d_ins, d_saes, ks)]
    print(f"table: {len(configs)} sizes, batch {batch}, 1 seed, bf16 autocast on CUDA; >= {args.min_seconds} s and >= {args.table_steps} "
          f"steps per timing after {args.table_warmup} warm-up steps")
    rows: dict[tuple, dict] = {}
    variants = parse_variants(args.variant)
    if variants:
        print("variants: " + "; ".join(f"{label}: {constants}" for label, constants in variants.items()))
    if args.check:
        print("  " + gradient_check(configs[0], device), flush=True)
    for sizes in configs:
        key = (sizes["d_in"], sizes["d_sae"], sizes["k"])
        started = time.perf_counter()
        profile_widths = {int(width) for width in args.profile_d_sae.split(",")} if args.profile_d_sae else None
        ours = our_measurement(sizes, device, args, profile=args.profile and (profile_widths is None or sizes["d_sae"] in profile_widths))
        gemm, adam = floor_seconds(sizes, device, args)
        rows[key] = {"ours": ours, "floor_gemm": gemm, "floor_adam": adam}
        print(f"  d_in {key[0]:5d} d_sae {key[1]:8d} k {key[2]:3d}: ours {1000 * ours['seconds_per_step']:8.3f} ms ({ours['path']}), "
              f"floor {1000 * (gemm + adam):7.3f} ms (GEMM {1000 * gemm:.3f} + Adam {1000 * adam:.3f}), "
              f"peak {ours.get('peak_bytes', 0) / 2**30:6.2f} GiB  [{time.perf_counter() - started:.0f} s]", flush=True)
        if "profile" in ours:
            print(ours["profile"], flush=True)
        if variants:
            profiled = "profile" in ours
            rows[key]["variants"] = {}
            for label, constants in variants.items():
                with constants_set(constants):
                    rows[key]["variants"][label] = our_measurement(sizes, device, args, profile=profiled)
            rows[key]["ours_again"] = our_measurement(sizes, device, args)
            parts = [f"defaults {1000 * ours['seconds_per_step']:.3f} / again {1000 * rows[key]['ours_again']['seconds_per_step']:.3f}"]
            parts += [f"{label} {1000 * measured['seconds_per_step']:.3f}" for label, measured in rows[key]["variants"].items()]
            print(f"    variants (ms/step): {'; '.join(parts)}", flush=True)
            if profiled:
                for prefix, kernel in VARIANT_KERNELS.items():
                    programs_ms = [("defaults", gradient_program_ms(ours.get("profile"), prefix))]
                    programs_ms += [(label, gradient_program_ms(measured.get("profile"), prefix)) for label, measured in rows[key]["variants"].items()]
                    print(f"    {kernel} in the profile (ms/step): "
                          + "; ".join(f"{label} {value:.3f}" if value is not None else f"{label} n/a" for label, value in programs_ms), flush=True)
                for label, measured in rows[key]["variants"].items():
                    print(f"    profile, {label}:\n{measured['profile']}", flush=True)
    for label in [name.strip() for name in (args.architectures or "").split(",") if name.strip()]:
        architecture, _, assignments = label.partition(":")
        overrides = {key: int(value) for key, value in (part.split("=") for part in assignments.split(";") if part)}
        for sizes in configs:
            if sizes["d_in"] != d_ins[0] or sizes["k"] != ks[0] or sizes["d_sae"] > args.architectures_max_d_sae:
                continue
            profile_widths = {int(width) for width in args.profile_d_sae.split(",")} if args.profile_d_sae else None
            measured = our_measurement(sizes, device, args, architecture=architecture, min_steps=5, overrides=overrides,
                                       profile=args.profile and (profile_widths is None or sizes["d_sae"] in profile_widths))
            rows[(sizes["d_in"], sizes["d_sae"], sizes["k"])][label] = measured
            print(f"  {label} d_in {sizes['d_in']} d_sae {sizes['d_sae']} k {sizes['k']}: {1000 * measured['seconds_per_step']:.3f} ms/step "
                  f"({measured['path']}), peak {measured.get('peak_bytes', 0) / 2**30:.2f} GiB"
                  + (f", capped tokens {measured['capped_token_share']:.2e} of those stepped" if "capped_token_share" in measured else ""), flush=True)
            if "profile" in measured:
                print(measured["profile"], flush=True)
    others = {}
    for kind, path in (("sparsify", args.sparsify_path), ("saelens", args.saelens_path)):
        if getattr(args, f"no_{kind}"):
            continue
        others[kind] = run_worker(kind, path, configs, args)
    memory = memory_check(args, device, d_ins[-1], ks[0], batch, rows) if args.memory_d_sae else None

    print("\nstep time per size (ms; 1 seed; ratios: x = times slower than ours, ours/floor = times the floor):")
    header = "| d_in | d_sae | k | ours | sparsify | SAELens | floor (GEMM + Adam) | ours / floor | sparsify / ours | SAELens / ours | ours peak GiB |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for key, row in rows.items():
        ours = row["ours"]["seconds_per_step"]
        floor = row["floor_gemm"] + row["floor_adam"]
        cells = []
        for kind in ("sparsify", "saelens"):
            result = others.get(kind, {}).get(key)
            if result is None or "seconds_per_step" not in result:
                cells.append(("n/a" if result is None else "error", None))
            else:
                cells.append((f"{1000 * result['seconds_per_step']:.2f}", result["seconds_per_step"]))
        print(f"| {key[0]} | {key[1]:,} | {key[2]} | {1000 * ours:.2f} | {cells[0][0]} | {cells[1][0]} | {1000 * floor:.2f} "
              f"({1000 * row['floor_gemm']:.2f} + {1000 * row['floor_adam']:.2f}) | {ours / floor:.2f}x | "
              f"{(cells[0][1] / ours) if cells[0][1] else float('nan'):.2f}x | {(cells[1][1] / ours) if cells[1][1] else float('nan'):.2f}x | "
              f"{row['ours'].get('peak_bytes', 0) / 2**30:.2f} |")
    if variants:
        print("\nvariants, side by side (ms/step; ratio to the defaults, the mean of their two timings):")
        header = "| d_in | d_sae | k | defaults | again | " + " | ".join(variants) + " |"
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        for key, row in rows.items():
            if "variants" not in row:
                continue
            first, again = row["ours"]["seconds_per_step"], row["ours_again"]["seconds_per_step"]
            base = (first + again) / 2
            cells = [f"{1000 * measured['seconds_per_step']:.3f} ({measured['seconds_per_step'] / base:.3f})" for measured in row["variants"].values()]
            print(f"| {key[0]} | {key[1]:,} | {key[2]} | {1000 * first:.3f} | {1000 * again:.3f} | " + " | ".join(cells) + " |")
    for kind, results in others.items():
        errors = sorted({result["error"] for result in results.values() if "error" in result})
        versions = sorted({result.get("version", "?") for result in results.values() if "version" in result})
        print(f"{kind}: version {', '.join(versions) or '?'}" + (f"; errors: {errors}" if errors else ""))
    if memory:
        print(memory["summary"])
    if args.json:
        serialisable = {f"{key[0]}x{key[1]}xk{key[2]}": {**row, "sparsify": others.get("sparsify", {}).get(key),
                                                          "saelens": others.get("saelens", {}).get(key)} for key, row in rows.items()}
        Path(args.json).write_text(json.dumps({"rows": serialisable, "memory": memory}, indent=1, default=str))


def memory_check(args: argparse.Namespace, device: torch.device, d_in: int, k: int, batch: int, rows: dict) -> dict:
    """Our step at ``--memory-d-sae`` latents (timed briefly) for peak memory; the widest dictionary that fits
    extrapolated linearly from the peaks at the widest table size and this one, then tried (a few steps)."""
    if device.type != "cuda":
        return {"summary": "memory check needs CUDA"}
    total = torch.cuda.mem_get_info(device)[1]
    measured = {}
    for key, row in rows.items():
        if key[0] == d_in and key[2] == k and "peak_bytes" in row["ours"]:
            measured[key[1]] = row["ours"]["peak_bytes"]
    big = dict(d_in=d_in, d_sae=int(args.memory_d_sae), k=k, batch=batch)
    result = our_measurement(big, device, args, min_steps=5)
    measured[big["d_sae"]] = result["peak_bytes"]
    widths = sorted(measured)
    low, high = widths[-2], widths[-1]
    per_latent = (measured[high] - measured[low]) / (high - low)
    fixed = measured[high] - per_latent * high
    pool_bytes = 8 * batch * d_in * 4
    estimate = int((total - fixed - pool_bytes - 2 * 2**30) / per_latent) // 65536 * 65536
    summary = [f"memory: d_in {d_in}, k {k}: {big['d_sae']:,} latents train at {1000 * result['seconds_per_step']:.1f} ms/step with peak "
               f"{result['peak_bytes'] / 2**30:.1f} GiB of {total / 2**30:.1f} GiB; {per_latent / 1024:.1f} KiB per latent "
               f"(from {low:,} and {high:,}); linear estimate of the widest that fits (2 GiB spare): {estimate:,}"]
    tried = []
    width = estimate
    while args.memory_try_largest and width > big["d_sae"] and len(tried) < 3:
        try:
            attempt = our_measurement(dict(big, d_sae=width), device, args, min_steps=3)
            tried.append({"d_sae": width, "ok": True, "seconds_per_step": attempt["seconds_per_step"], "peak_bytes": attempt["peak_bytes"]})
            summary.append(f"  tried {width:,} latents: trains, {1000 * attempt['seconds_per_step']:.1f} ms/step, peak {attempt['peak_bytes'] / 2**30:.1f} GiB"
                           f"{'' if attempt['cuda_graph'] else ' (CUDA-graph capture ran out of memory: eager steps)'}")
            break
        except torch.cuda.OutOfMemoryError as error:
            tried.append({"d_sae": width, "ok": False, "error": str(error).splitlines()[0][:200]})
            summary.append(f"  tried {width:,} latents: out of memory")
        import gc

        gc.collect()  # the failed attempt's tensors (held by the traceback until here)
        torch.cuda.empty_cache()
        width = int(width * 0.9) // 65536 * 65536
    return {"d_in": d_in, "k": k, "d_sae": big["d_sae"], "result": result, "per_latent_bytes": per_latent, "estimate": estimate, "tried": tried,
            "summary": "\n".join(summary)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU-sized problem (d=128, 1024 latents, k=16, batch 1024)")
    parser.add_argument("--d-in", help="input width (comma-separated list in table mode)")
    parser.add_argument("--d-sae", help="latents (comma-separated list in table mode)")
    parser.add_argument("--k", help="active latents per token (comma-separated list in table mode)")
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
    parser.add_argument("--table", action="store_true", help="table mode (implied by lists in --d-in / --d-sae / --k)")
    parser.add_argument("--sparsify-path", help="table mode: folder put first on the sparsify worker's PYTHONPATH")
    parser.add_argument("--saelens-path", help="table mode: folder put first on the SAELens worker's PYTHONPATH (sae-lens + transformer-lens 3.x)")
    parser.add_argument("--no-sparsify", action="store_true")
    parser.add_argument("--profile", action="store_true", help="table mode: per-kernel time table of our step at every size")
    parser.add_argument("--profile-d-sae", help="table mode: profile only at these widths (comma-separated)")
    parser.add_argument("--profile-rows", type=int, default=14, help="table mode: kernels listed per profile (longest first)")
    parser.add_argument("--check", action="store_true", help="table mode: first compare one sparse-update step with the dense path at the first size")
    parser.add_argument("--architectures", help="table mode: also time these architectures at the first d_in and k; NAME:KEY=VALUE[;KEY=VALUE] "
                        "sets integer TrainSettings too (batchtopk:batch_topk_cap_multiple=0 = BatchTopK's dense selection)")
    parser.add_argument("--architectures-max-d-sae", type=int, default=65536)
    parser.add_argument("--memory-d-sae", type=int, help="table mode: time our step at this many latents (largest d_in) for peak memory")
    parser.add_argument("--memory-try-largest", action="store_true", help="then try the widest dictionary estimated to fit")
    parser.add_argument("--table-steps", type=int, default=10, help="table mode: timed steps per measurement (at least)")
    parser.add_argument("--table-warmup", type=int, default=3)
    parser.add_argument("--json", help="table mode: write every figure to this file")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="set a constant of sae_pipeline.sae.kernels.updates or .programs first (tuning runs; e.g. GRAD_PROGRAM_COLUMN_BLOCKS=4)")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL:NAME=VALUE[,NAME=VALUE]",
                        help="table mode: also time our step with these constants of sae_pipeline.sae.kernels.updates / .programs, beside the defaults")
    parser.add_argument("--worker", choices=["sparsify", "saelens"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-configs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.set:
        import ast

        for assignment in args.set:
            name, _, value = assignment.partition("=")
            if constant_module(name) is None:
                parser.error(f"--set: sae_pipeline.sae.kernels.updates / programs have no constant {name}")
            setattr(constant_module(name), name, ast.literal_eval(value))
        print("set: " + ", ".join(f"{name}={getattr(constant_module(name), name)!r}" for name in (part.partition("=")[0] for part in args.set)))
    if args.worker:
        import json

        worker(args.worker, json.loads(args.worker_configs), args)
        return
    if args.table or any("," in str(getattr(args, key) or "") for key in ("d_in", "d_sae", "k")):
        device = torch.device(resolve_device(args.device))
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        print(f"device: {name}; torch {torch.__version__}")
        table_main(args, device)
        return

    sizes = dict(SMALL if args.small else FULL)
    for key in ("d_in", "d_sae", "k", "batch", "steps", "warmup"):
        if getattr(args, key) is not None:
            sizes[key] = int(getattr(args, key))
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
