"""Device selection of `sdrm device`: --require-gpu, --backend and the `device_selected` start log."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from services.broker import free_port
from services.common import StartupError
from services.device import Device, describe_torch_device

REPOSITORY = Path(__file__).resolve().parent.parent
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so the CPU fallback is not taken")


def device_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "sdrm.cli", "device", "--broker", f"mqtt://127.0.0.1:{free_port()}", *args]


def clean_environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("SDRM_")}


@no_cuda
def test_require_gpu_without_cuda_exits_2():
    result = subprocess.run(
        device_command("--require-gpu"), capture_output=True, text=True, cwd=REPOSITORY, env=clean_environment(), timeout=120
    )
    assert result.returncode == 2
    assert "--require-gpu is set but no CUDA GPU is available" in result.stderr
    assert "runtime: nvidia" in result.stderr
    assert "drop --require-gpu" in result.stderr


@no_cuda
def test_require_gpu_from_environment_exits_2():
    environment = {**clean_environment(), "SDRM_REQUIRE_GPU": "true"}
    result = subprocess.run(device_command(), capture_output=True, text=True, cwd=REPOSITORY, env=environment, timeout=120)
    assert result.returncode == 2
    assert "SDRM_REQUIRE_GPU" in result.stderr


def test_require_gpu_contradicts_cpu_backend():
    with pytest.raises(StartupError, match="--require-gpu contradicts --backend cpu"):
        Device._select_backend("cpu", require_gpu=True)


@no_cuda
def test_auto_backend_falls_back_to_cpu():
    assert Device._select_backend("auto").type == "cpu"


@no_cuda
def test_cuda_backend_without_cuda_fails():
    with pytest.raises(StartupError, match="--backend cuda"):
        Device._select_backend("cuda")


def test_describe_cpu_device():
    description = describe_torch_device(torch.device("cpu"))
    assert description["torch_device"] == "cpu"
    assert description["name"]
    assert description["memory_mb"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_describe_cuda_device():
    description = describe_torch_device(Device._select_backend("auto", require_gpu=True))
    assert description["torch_device"].startswith("cuda:")
    assert description["name"] == torch.cuda.get_device_name(0)
    assert description["memory_mb"] > 0


def test_device_logs_selected_device(tmp_path):
    """A device without a reachable broker still starts, and logs its torch device first."""
    log_path = tmp_path / "device.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            device_command("--device", "dev5"), stdout=log_file, stderr=subprocess.STDOUT, cwd=REPOSITORY,
            env=clean_environment(),
        )
    try:
        deadline = time.monotonic() + 90
        while "device_started" not in log_path.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        process.terminate()
        process.wait(15)
    lines = [line for line in log_path.read_text().splitlines() if "event='device_selected'" in line]
    assert lines, f"no device_selected event in the log:\n{log_path.read_text()[-2000:]}"
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert f"torch_device='{expected}'" in lines[0]
    assert "device='dev5'" in lines[0]
    assert "memory_mb=" in lines[0]
    assert "name=" in lines[0]
