"""Device selection, pinning, the devices CLI and the PoCL cache handling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fpga_runtime import devices
from fpga_runtime.engine import Engine
from fpga_runtime.errors import NoDeviceError
from toptagger.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_automatic_choice_follows_type_order() -> None:
    found = devices.all_devices()
    info, _ = devices.select_device()
    rank = {k: i for i, k in enumerate(devices.TYPE_ORDER)}
    assert rank[info.kind] == min(rank.get(f.kind, 9) for f, _ in found)


def test_pinned_by_device_name(pkg50: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(devices.ENV_DEVICE, raising=False)
    info, _ = devices.select_device()
    word = info.name.split()[0].lower()
    assert devices.select_device(word)[0] == info
    assert devices.select_device(f"{info.platform[:8]}:{word}")[0] == info
    engine = Engine.from_package(pkg50, device=word, probe=False)
    assert engine.info == info


def test_pinned_by_environment(monkeypatch: pytest.MonkeyPatch, pkg50: Path) -> None:
    monkeypatch.setenv(devices.ENV_DEVICE, "no-such-accelerator-xyz")
    with pytest.raises(NoDeviceError, match=r"no-such-accelerator-xyz.*TOPTAGGER_OPENCL_DEVICE.*available: "):
        Engine.from_package(pkg50, probe=False)
    ready, why = devices.readiness()
    assert not ready and "no-such-accelerator-xyz" in why
    monkeypatch.setenv(devices.ENV_DEVICE, devices.select_device("")[0].platform)
    assert devices.readiness()[0]


def test_required_device_type(monkeypatch: pytest.MonkeyPatch, pkg50: Path) -> None:
    monkeypatch.delenv(devices.ENV_DEVICE, raising=False)
    monkeypatch.delenv(devices.ENV_DEVICE_TYPE, raising=False)
    found = {info.kind for info, _ in devices.all_devices()}
    for kind in found:
        assert devices.select_device(device_type=kind.lower())[0].kind == kind
    missing = next(kind for kind in devices.TYPE_ORDER if kind not in found)  # PoCL here: no FPGA
    alias = "fpga" if missing == "ACCELERATOR" else missing
    expected = rf"no OpenCL {missing} device .*{devices.ENV_DEVICE_TYPE}.*available: .*\("
    with pytest.raises(NoDeviceError, match=expected):
        devices.select_device(device_type=alias)
    monkeypatch.setenv(devices.ENV_DEVICE_TYPE, alias)  # as the FPGA overlay sets it
    with pytest.raises(NoDeviceError, match=missing):
        Engine.from_package(pkg50, probe=False)
    ready, why = devices.readiness()
    assert not ready and missing in why
    monkeypatch.setenv(devices.ENV_DEVICE_TYPE, "tpu")
    with pytest.raises(ConfigError, match=r"unknown OpenCL device type 'TPU'.*ACCELERATOR, GPU, CPU, FPGA"):
        devices.select_device()
    assert not devices.readiness()[0]


def test_devices_cli_lists_and_picks() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fpga_runtime.devices"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    info, _ = devices.select_device()
    assert f"would pick: {info.label()}" in out
    assert any(line.startswith("*") and info.name in line for line in out.splitlines())


def test_devices_cli_unknown_pin_is_a_clean_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fpga_runtime.devices", "--device", "fpga-that-is-not-here"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no OpenCL device matches 'fpga-that-is-not-here'")


def test_unwritable_cache_falls_back_to_a_writable_one(tmp_path: Path) -> None:
    """PoCL reports no device when its cache is unwritable; the runtime must redirect it first."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file, so nothing can be created below it, not even by root")
    env = dict(
        os.environ,
        HOME=str(blocker),
        POCL_CACHE_DIR=str(blocker / "pocl"),
        XDG_CACHE_HOME=str(blocker / "cache"),
        TMPDIR=str(tmp_path),
    )
    env.pop(devices.ENV_DEVICE, None)
    code = "from fpga_runtime import devices; print(devices.ensure_pocl_cache()); print(devices.readiness())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, check=True
    ).stdout.splitlines()
    assert out[0].startswith(str(tmp_path))
    assert out[1].startswith("(True")
