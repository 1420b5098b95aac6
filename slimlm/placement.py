"""Where things run: the device, the floating-point dtype and the world size, chosen once, and the defaults
that depend on them, with their reasons in this one place.

Defaults (what :func:`choose` picks when nothing is asked):

- **CUDA with bf16** when torch sees a GPU: tensor cores run bf16 at several times the fp32 rate, and every
  model family slimlm supports was trained in bf16.
- **CPU with fp32** otherwise: on CPUs without bf16 dot-product instructions bf16 matmuls run about 2x slower
  than fp32, because they are emulated; fp32 is the fastest float there. The INT8 runtime (``torch._int_mm``) is
  the fast path on such CPUs (about 3.6x fp32 on an AVX-512 core), so CPU speed comes from quantization.
- **Training autocasts to bf16 where bf16 matrix products are fast** (:func:`fast_bf16`): CUDA GPUs that
  support bf16, and CPUs with AVX512_BF16 or AMX, where a bf16 GEMM ran 2.6x an fp32 one (339 vs 132 GFLOP/s,
  an AMD EPYC with AVX512_BF16, 2 cores) and a distillation step 1.5x (``benchmarks/train_step.py``). The
  weights stay fp32 (masters); the frozen teacher is held in bf16 there. Evaluation, scoring and serving stay
  in the placement's dtype.
- **Solver threads** (OSSCAR / greedy pruning updates, :func:`solver_threads`): 1 on CPU. The solver's updates
  are many small, memory-bound tensor ops; with two OpenMP threads on a 2-core CPU they ran 4-5x slower than
  with one (the threads spin against each other and any other process). Raise it (``solver_threads`` in the
  prune config) on a many-core machine where the solver's matrices are large.

This module only decides and checks; stages receive the result explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimlm import SlimlmError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# the compute dtypes each device type runs for training and inference
DEVICE_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.bfloat16, torch.float16)}


@dataclass(frozen=True)
class Placement:
    """Where a stage runs: ``device`` (``cpu``, ``cuda``, ``cuda:1``), compute ``dtype``, ``world_size`` ranks."""

    device: torch.device
    dtype: torch.dtype
    world_size: int = 1

    def to_dict(self) -> dict[str, object]:
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "world_size": self.world_size}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU (see the module docstring for why)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def fast_bf16(device: str | torch.device) -> bool:
    """True where bf16 matrix products run faster than fp32 ones (see the module docstring): a CUDA GPU that
    supports bf16, or a CPU with AVX512_BF16 or AMX tiles (as torch's own CPU feature probes report them)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type != "cpu":
        return False
    return cpu_has("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def cpu_has(*probes: str) -> bool:
    """Whether any of torch's own CPU feature probes (``torch.cpu._is_..._supported``) reports its feature;
    a probe this torch lacks counts as absent."""
    return any(bool(fn()) for fn in (getattr(torch.cpu, name, None) for name in probes) if fn is not None)


def solver_threads(device: str | torch.device) -> int:
    """Intra-op threads for the pruning solvers' CPU work (0: leave torch's count alone); see the docstring."""
    return 1 if torch.device(device).type == "cpu" else 0


def check_device(device: str | torch.device) -> None:
    """A device this machine has (``cpu``, ``cuda``, ``cuda:1``, ...), or a one-line SlimlmError."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SlimlmError(f"device {str(device)!r}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type not in DEVICE_DTYPES:
        raise SlimlmError(f"device {str(device)!r}: slimlm runs on {' or '.join(DEVICE_DTYPES)}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SlimlmError(f"device {str(device)!r}: this machine has no CUDA GPU available to torch")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SlimlmError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s)")


def choose(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
           world_size: int = 1) -> Placement:
    """The placement for ``--device`` / ``--dtype`` (None: the defaults above), checked before any work:
    a device this machine lacks, a dtype the device does not compute in, or more CUDA ranks than GPUs is a
    one-line SlimlmError."""
    device = default_device() if device is None else device
    check_device(device)
    device = torch.device(device)
    if dtype is None:
        dt = default_dtype(device)
    elif isinstance(dtype, torch.dtype):
        dt = dtype
    elif dtype in DTYPES:
        dt = DTYPES[dtype]
    else:
        raise SlimlmError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if dt not in DEVICE_DTYPES[device.type]:
        raise SlimlmError(f"dtype {str(dt).removeprefix('torch.')} does not run on {device.type} "
                          f"(use {' or '.join(str(d).removeprefix('torch.') for d in DEVICE_DTYPES[device.type])})")
    if dt == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SlimlmError(f"dtype bfloat16: the GPU on {device} does not support it (use float16 or float32)")
    if world_size < 1:
        raise SlimlmError(f"world size {world_size}: must be at least 1")
    if device.type == "cuda" and world_size > torch.cuda.device_count():
        raise SlimlmError(f"world size {world_size}: more ranks than the {torch.cuda.device_count()} GPU(s) here")
    return Placement(device, dt, world_size)
