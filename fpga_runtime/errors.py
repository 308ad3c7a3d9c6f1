"""Typed errors of the OpenCL runtime; each message names the file, device or layer at fault."""

from __future__ import annotations

from toptagger.errors import ConfigError, TaggerError

POCL_HINT = (
    "PoCL reports no device when it cannot write its kernel cache: set POCL_CACHE_DIR and "
    "XDG_CACHE_HOME to a writable directory (the Makefile uses $HOME/.cache/top-tagger/pocl)"
)


class OpenCLRuntimeError(TaggerError):
    """Base class of every error raised by :mod:`fpga_runtime`."""


class NoDeviceError(OpenCLRuntimeError):
    """No OpenCL platform/device is usable, or the pinned one does not exist."""


class PackageError(OpenCLRuntimeError, ValueError):
    """An exported package is missing, malformed, or its plan and weights disagree."""


class UnsupportedLayerError(OpenCLRuntimeError, ValueError):
    """The model (at export) or the plan (at load) holds a layer this engine cannot run."""


class PrecisionError(OpenCLRuntimeError, ConfigError):
    """A precision mode is unknown, or the chosen device cannot run it."""


class BinaryMismatchError(OpenCLRuntimeError):
    """A prebuilt kernel binary is missing, corrupt, or was built for another device or source."""


class KernelBuildError(OpenCLRuntimeError):
    """The OpenCL compiler rejected the kernels; the message carries the build log."""


class KernelProbeError(OpenCLRuntimeError):
    """A kernel crashed or misbehaved when probed in a subprocess at start-up."""


class InputError(OpenCLRuntimeError, ValueError):
    """A batch handed to the engine has the wrong shape, dtype or values."""
