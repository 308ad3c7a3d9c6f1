"""The library stands on its own: importing all of toptagger/ loads no Kubeflow, server or component code.

The rule (``FORBIDDEN["toptagger"]``) is ``tests/test_imports.py``'s, which also reads the imports
inside functions off the source; this test sees what an import loads, through third-party code too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.test_imports import FORBIDDEN

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import importlib, json, pkgutil, sys
import toptagger
for info in pkgutil.walk_packages(toptagger.__path__, "toptagger."):
    importlib.import_module(info.name)
print(json.dumps(sorted(sys.modules)))
"""


def test_importing_every_library_module_loads_no_kfp_server_or_pipeline_code() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert "toptagger.training.trainer" in modules and "toptagger.deploy.kserve" in modules  # the walk ran
    above = sorted(m for m in modules if m.split(".")[0] in FORBIDDEN["toptagger"])
    assert not above, f"toptagger/ imports {above}"
