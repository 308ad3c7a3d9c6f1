"""Real Triton (``tritonserver`` from the ``nvidia-pytriton`` wheel) as a local process on a repository.

The conformance suite's oracle and a peer of ``benchmarks.serving``. The binary is started directly on a
plain model repository, as a production Triton is (PyTriton's own API would hide the repository
index and lock the statistics behind a token). Three traps, each handled here (reference §2):

- the Python-backend stub links the system ``libpython3.11.so.1.0``; if this venv's Python is
  another 3.11 build, the stub dies in ``multiprocessing``: the library folder of the Python this
  venv was made from goes first on ``LD_LIBRARY_PATH`` (with the wheel's bundled CUDA runtime,
  which the stub links even on a CPU-only machine);
- the stub ignores ``PYTHONPATH`` and finds packages through the first ``python3`` on ``PATH``:
  this venv's ``bin`` goes first;
- the backend folder must hold the Python backend *and* the stub: assembled in a temporary folder;
- the wheel has no repository agents, and Triton refuses a model whose ``config.pbtxt`` names one:
  the checksum agent (:mod:`serving.triton.checksum`) is built from ``checksum_agent.c`` with the
  system C compiler into a temporary ``--repoagent-directory``.

With ``metrics_port`` Triton serves its Prometheus metrics there (``--allow-metrics``, CPU metrics,
no GPU metrics): the oracle for :mod:`serving.triton.metrics`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from serving.process import LocalPredictor, free_port, launch
from toptagger.errors import ConfigError

STUB_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
CHECKSUM_AGENT_SOURCE = Path(__file__).with_name("checksum_agent.c")


def triton_root() -> Path:
    """The wheel's ``pytriton/tritonserver`` folder, or a ConfigError saying how to install it."""
    # Found, not imported: pytriton's own Python API needs packages this project does not install.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "real Triton is not installed: pip install --no-deps -r requirements-nodeps.txt (make venv does)"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise ConfigError(f"{root}: no bin/tritonserver in the nvidia-pytriton wheel")
    return root


def _backend_directory(root: Path) -> Path:
    stub = root / "python_backend_stubs" / STUB_PYTHON / "triton_python_backend_stub"
    if not stub.is_file():
        raise ConfigError(f"the nvidia-pytriton wheel has no Python-backend stub for Python {STUB_PYTHON}")
    backends = Path(tempfile.mkdtemp(prefix="top-tagger-triton-backends-"))
    shutil.copytree(root / "backends" / "python", backends / "python")
    shutil.copy2(stub, backends / "python" / stub.name)
    return backends


def repoagent_directory() -> Path:
    """A temporary ``--repoagent-directory`` with ``checksum/libtritonrepoagent_checksum.so``, built here."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise ConfigError("no C compiler (cc or gcc) to build Triton's checksum agent; install gcc")
    agents = Path(tempfile.mkdtemp(prefix="top-tagger-triton-repoagents-"))
    library = agents / "checksum" / "libtritonrepoagent_checksum.so"
    library.parent.mkdir()
    command = [compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(CHECKSUM_AGENT_SOURCE), "-ldl"]
    built = subprocess.run(command, capture_output=True, text=True, check=False)
    if built.returncode != 0:
        raise ConfigError(f"building Triton's checksum agent failed ({' '.join(command)}):\n{built.stderr[-2000:]}")
    return agents


def _environment(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    libraries = [sysconfig.get_config_var("LIBDIR"), str(root.parents[1] / "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [*libraries, env.get("LD_LIBRARY_PATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def start_triton(
    repository: str | Path,
    *,
    http_port: int | None = None,
    grpc_port: int | None = None,
    metrics_port: int | None = None,
    timeout_s: float = 180.0,
) -> LocalPredictor:
    """Start ``tritonserver`` on ``repository`` and return once it is ready (all models loaded);
    its Prometheus metrics on ``metrics_port`` when one is given."""
    root = triton_root()
    repository = Path(repository)
    if not repository.is_dir():
        raise ConfigError(f"{repository}: no such model repository")
    http_port, grpc_port = http_port or free_port(), grpc_port or free_port()
    command = [
        str(root / "bin" / "tritonserver"),
        f"--model-repository={repository.resolve()}",
        f"--backend-directory={_backend_directory(root)}",
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
        f"--repoagent-directory={repoagent_directory()}",
        "--log-verbose=0",
    ]
    if metrics_port:
        command += ["--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=true"]
        command.append(f"--metrics-port={metrics_port}")
    else:
        command.append("--allow-metrics=false")
    return launch(command, _environment(root), http_port, grpc_port, "tritonserver", timeout_s)
