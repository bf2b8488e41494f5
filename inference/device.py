"""Pick where and in what precision a model runs: CUDA bf16 (fp16 on pre-Ampere cards), else CPU fp32.

Shared by training and serving so both make the same choice. `pick(device="auto", dtype="auto")`
returns a `Placement`; explicit values are honoured and checked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Placement:
    device: str          # "cuda" or "cpu"
    dtype: torch.dtype

    def describe(self) -> str:
        name = torch.cuda.get_device_name(0) if self.device == "cuda" else "CPU"
        return f"{name} ({str(self.dtype).replace('torch.', '')})"


def cuda_ok() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def pick(device: str = "auto", dtype: str = "auto") -> Placement:
    from trainer.errors import UserError

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
