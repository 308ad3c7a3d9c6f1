"""OpenCL inference engine for the tagger: FPGA bitstreams, GPUs, and CPUs through PoCL.

Front API (imported lazily, so that ``python -m fpga_runtime.devices`` does not pay for torch)::

    from fpga_runtime import Engine, export_model, readiness
"""

from __future__ import annotations

from typing import Any

__all__ = ["Engine", "export_model", "readiness", "select_device"]

_EXPORTS = {
    "Engine": "fpga_runtime.engine",
    "export_model": "fpga_runtime.export",
    "readiness": "fpga_runtime.devices",
    "select_device": "fpga_runtime.devices",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fpga_runtime' has no attribute {name!r}")
