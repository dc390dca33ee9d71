"""Registers and spills of the weight-gradient programs, compiled for sm_90 (H100/H200) without a GPU.

Compiles :mod:`sae_pipeline.sae.kernels.programs`' gradient programs with this machine's Triton (TTIR -> PTX ->
cubin with the ptxas Triton bundles) for a Hopper target, and prints what ``cuobjdump --dump-resource-usage``
reports: registers per thread and stack bytes (spills). This is the local Triton version's code, not
necessarily the device's (round 3: Triton 3.9 here, 3.6 on the H200), and says nothing about time::

    env -u TRITON_INTERPRET python3 benchmarks/issue17_registers.py
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, do not interpret

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sae_pipeline.sae.kernels import programs  # noqa: E402

POINTERS = {**{name: "*i32" for name in ("item_block", "item_chunk", "block_items", "block_slot", "segments", "keys", "rows", "shared_blocks")},
            **{name: "*fp32" for name in ("decoder_weights", "encoder_weights", "W_dec", "row_statistics", "partial_dec", "partial_enc")},
            **{name: "*bf16" for name in ("decoder_dense", "encoder_dense", "grad_dec", "grad_enc")}}
BASE = dict(LATENTS=32, COLUMNS=128, CHUNK=512, LOW_PRECISION=True, WITH_W_DEC=True, EMULATE_BF16=False)
# (label, program, constexprs): the d_in >= 512 shapes under bf16 autocast, 8 warps (updates.latent_gradients' choice for 128 columns).
VARIANTS = [
    ("looping, 4 column blocks, 32 entries (round 2 default)", "latent_gradients", dict(BASE, ENTRIES=32, COLUMN_BLOCKS=4)),
    ("looping, 1 column block, 64 entries", "latent_gradients", dict(BASE, ENTRIES=64, COLUMN_BLOCKS=1)),
    ("looping, 4 column blocks, 64 entries", "latent_gradients", dict(BASE, ENTRIES=64, COLUMN_BLOCKS=4)),
    ("one-pass, 64 entries (round 1's shape)", "latent_gradients_one_pass", dict(BASE, ENTRIES=64)),
    ("combine", "combine_gradients", dict(LATENTS=32, COLUMNS=128, WITH_W_DEC=True)),
]


def resource_usage(name: str, constants: dict, warps: int = 8) -> str:
    helpers, compiled = programs._programs(False)
    programs.__dict__.update(helpers)
    function = compiled[name]
    names = list(inspect.signature(programs._source(function)).parameters)
    signature = {arg: ("constexpr" if arg in constants else POINTERS.get(arg, "i32")) for arg in names}
    kernel = triton.compile(ASTSource(function, signature, constexprs={(names.index(key),): value for key, value in constants.items()}),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        tool = Path(triton.backends.nvidia.__file__).parent / "bin" / "cuobjdump"
        usage = subprocess.run([str(tool), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    line = next(line for line in usage.splitlines() if "REG:" in line).split()
    return " ".join(part for part in line if part.startswith(("REG:", "STACK:", "LOCAL:")))


def main() -> None:
    print(f"triton {triton.__version__}, target sm_90, 8 warps")
    for label, name, constants in VARIANTS:
        print(f"  {label:58s} {resource_usage(name, constants)}", flush=True)


if __name__ == "__main__":
    main()
