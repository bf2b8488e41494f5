"""Pick where and in what precision a model runs: CUDA bf16 (fp16 on pre-Ampere cards), else CPU fp32.

Shared by training and serving so both make the same choice. `pick(device="auto", dtype="auto")`
returns a `Placement`; explicit values are honoured and checked. `fit_gpu` is the serving fallback
for a GPU too small for the 16-bit weights: 4-bit when bitsandbytes is installed, else the CPU.
"""
from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Placement:
    device: str          # "cuda" or "cpu"
    dtype: torch.dtype

    def describe(self) -> str:
        name = torch.cuda.get_device_name(0) if self.device == "cuda" else "CPU"
        return f"{name} ({str(self.dtype).replace('torch.', '')})"


GiB = 1024 ** 3
HEADROOM = 1.25          # KV cache, activations and the CUDA context on top of the weights


def cuda_ok() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def cpu_has_fast_bf16() -> bool:
    """The CPU multiplies bf16 natively (AVX512-BF16 or AMX): there bf16 matmuls ran 2.7x fp32's speed
    (409 vs 151 GFLOP/s on 2 EPYC cores). Without it bf16 is emulated and slower than fp32. LoRA training of
    the real base in bf16 ran 1.55x fp32 with AMX (385-417 against 250-258 tokens/s, 2 Xeon cores) and 1.4x with
    AVX512-BF16 alone (285-304 against 205-213, 2 EPYC cores, session 11); batch-1 decoding is slower in bf16."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_decode_threads(device) -> int:
    """Called in a thread that decodes on the CPU while this process also turns its tokens into text and
    serves them (the engine's worker, the batcher's loop): that thread's OpenMP team gets one core fewer than
    torch's default, left to the consumer. On 2 cores the consumer's wake-ups otherwise preempt a kernel thread
    every token: the apps' path (`bench/batch_decode.py --impl serve`, one stream, 2 AMD EPYC cores, 2026-12-07)
    ran int4 weights at 42.2 tokens/s with one thread against 33.9 with two, int8 33.0 vs 29.3, fp32 18.8 vs
    19.1 (bandwidth-bound). Returns the threads this thread now uses (unchanged off the CPU)."""
    default = torch.get_num_threads()
    if getattr(device, "type", device) != "cpu" or default <= 1:
        return default
    torch.set_num_threads(default - 1)
    # torch.set_num_threads also sets the default that threads started later begin with: a thread of its own
    # puts that back, leaving this thread's team as set
    reset = threading.Thread(target=torch.set_num_threads, args=(default,))
    reset.start()
    reset.join()
    return default - 1


def pick(device: str = "auto", dtype: str = "auto") -> Placement:
    from inference.errors import UserError

    if device not in ("auto", "cuda", "cpu"):
        raise UserError(f"device {device!r}: use auto, cuda or cpu")
    if device == "cuda" and not cuda_ok():
        raise UserError("device cuda requested but no CUDA GPU is visible -- use --device cpu or auto")
    dev = "cuda" if device == "cuda" or (device == "auto" and cuda_ok()) else "cpu"
    if dtype == "auto":
        if dev == "cpu":
            return Placement(dev, torch.float32)
        return Placement(dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r}: use auto, bf16, fp16 or fp32")
    return Placement(dev, DTYPES[dtype])


def fit_gpu(n_params: int, placement: Placement, free_bytes: int | None = None,
            have_bnb: bool | None = None) -> tuple[Placement, int | None, str]:
    """(placement, bits, why) for a model of `n_params` on a CUDA `placement`: as is when it fits in
    free GPU memory, else 4-bit nf4 (about 0.6 bytes a parameter) when bitsandbytes is installed and
    that fits, else CPU fp32. `why` is "" when nothing changed."""
    if placement.device != "cuda":
        return placement, None, ""
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info()[0]
    if have_bnb is None:
        have_bnb = importlib.util.find_spec("bitsandbytes") is not None
    need = n_params * torch.tensor([], dtype=placement.dtype).element_size() * HEADROOM
    if need <= free_bytes:
        return placement, None, ""
    short = f"{need / GiB:.1f} GiB needed in {str(placement.dtype).replace('torch.', '')}, {free_bytes / GiB:.1f} GiB free"
    if have_bnb and n_params * 0.6 * HEADROOM <= free_bytes:
        return placement, 4, f"GPU too small ({short}): loading 4-bit"
    return Placement("cpu", torch.float32), None, (
        f"GPU too small ({short}){'' if have_bnb else ' and bitsandbytes is not installed'}: running on CPU")
