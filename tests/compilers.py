"""Skip, saying why, a test that compiles for real where inductor cannot build for this CPU (no C++ compiler):
tests/test_speed.py, tests/test_row_step.py."""
from __future__ import annotations

import pytest


def needs_cpp_compiler() -> None:
    import torch._inductor.cpp_builder

    try:
        torch._inductor.cpp_builder.get_cpp_compiler()
    except Exception as exc:  # noqa: BLE001 -- no C++ compiler: inductor cannot build for the CPU here
        pytest.skip(f"torch.compile on CPU needs a C++ compiler for inductor: {exc}")
