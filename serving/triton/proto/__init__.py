"""Protocol buffers for Triton compatibility (see triton_extensions.proto)."""

from __future__ import annotations

import importlib.util
import sys
from importlib.machinery import PathFinder
from types import ModuleType

MODULE_NAME = "model_config_pb2"  # the name protoc-generated modules import it by


def load_model_config_pb2() -> ModuleType:
    """tritonclient's ``model_config_pb2``, loaded by path and registered as ``model_config_pb2``."""
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    package = PathFinder.find_spec("tritonclient")
    if package is None or not package.submodule_search_locations:
        raise ImportError("tritonclient is not installed; it provides Triton's model_config.proto")
    path = f"{next(iter(package.submodule_search_locations))}/grpc/model_config_pb2.py"
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module
