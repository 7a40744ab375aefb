"""`comfybake exporter --nvml`: NVML only when asked for, and never a failed scrape without a GPU.

This machine has no GPU and no libnvidia-ml.so: the real nvidia-ml-py (the pinned wheel, from
PyPI, imported straight from the .whl on PYTHONPATH) fails in nvmlInit, which is the path of every
host without a GPU or driver. The GPU path itself runs only where a GPU exists.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from harness.exporter import Samples, samples, value, write_host

from comfybake.exporter import NVML_VERSION

CACHE = Path(os.environ.get("COMFYBAKE_TEST_CACHE", Path.home() / ".cache" / "comfybake-tests")) / "nvml"
# Runs the command line in this process, then says whether pynvml was ever imported.
PROBE = """
import sys
from comfybake.cli import main
code = main(sys.argv[1:])
print("pynvml imported:", "pynvml" in sys.modules, file=sys.stderr)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def nvml_wheel() -> Path:
    """The pinned nvidia-ml-py wheel (pure Python), downloaded once by pip into the test cache."""
    wheel = CACHE / f"nvidia_ml_py-{NVML_VERSION}-py3-none-any.whl"
    if not wheel.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as folder:  # then renamed: parallel runs see a whole file
            download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
            done = subprocess.run(
                [*download, "--dest", folder, f"nvidia-ml-py=={NVML_VERSION}"], capture_output=True, text=True
            )
            assert done.returncode == 0, done.stderr
            os.replace(Path(folder) / wheel.name, wheel)
    return wheel


def scrape(config: Path, *argv: str, path: list[Path]) -> tuple[subprocess.CompletedProcess[str], Samples]:
    """`comfybake exporter scrape` in its own Python, with `path` ahead on PYTHONPATH."""
    python_path = os.pathsep.join([*map(str, path), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", PROBE, "exporter", "scrape", "--config-root", str(config), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": python_path},
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done, samples(done.stdout)


def gpu_metrics(found: Samples) -> list[str]:
    return sorted({name for name, _labels in found if name.startswith("comfybake_gpu_")})


def test_off_never_imports_pynvml(nvml_wheel: Path, tmp_path: Path) -> None:
    config = write_host(tmp_path / "etc", [])
    for argv in ((), ("--nvml", "off")):
        done, found = scrape(config, *argv, path=[nvml_wheel])
        assert "pynvml imported: False" in done.stderr
        assert value(found, "comfybake_exporter_errors_total", instance="", what="nvml") is None
        assert not gpu_metrics(found)


def test_auto_without_a_gpu_is_a_clean_scrape_and_an_error_per_scrape(nvml_wheel: Path, tmp_path: Path) -> None:
    """The real pynvml is imported (only now), nvmlInit fails (no libnvidia-ml.so here): the scrape
    succeeds with every other metric, no GPU metric, and one `nvml` error per scrape."""
    config = write_host(tmp_path / "etc", [])
    first_done, first = scrape(config, "--nvml", "auto", path=[nvml_wheel])
    assert "pynvml imported: True" in first_done.stderr
    assert value(first, "comfybake_exporter_errors_total", instance="", what="nvml") == 1
    assert value(first, "comfybake_exporter_scrape_duration_seconds") is not None
    assert not gpu_metrics(first)
    _done, second = scrape(config, "--nvml", "auto", path=[nvml_wheel])
    assert value(second, "comfybake_exporter_errors_total", instance="", what="nvml") == 2


def test_auto_without_nvidia_ml_py_is_a_clean_scrape(tmp_path: Path) -> None:
    """No library at all (a host where the CLI does not carry it): the same error, never a crash."""
    config = write_host(tmp_path / "etc", [])
    done, found = scrape(config, "--nvml", "auto", path=[])
    assert "pynvml imported: False" in done.stderr
    assert value(found, "comfybake_exporter_errors_total", instance="", what="nvml") == 1
    assert not gpu_metrics(found)


def test_a_wrong_mode_is_named(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "comfybake", "exporter", "scrape", "--config-root", str(tmp_path), "--nvml", "on"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--nvml: invalid choice: 'on' (choose from 'off', 'auto')" in done.stderr


def test_every_pynvml_name_the_exporter_uses_exists_in_the_pinned_wheel(nvml_wheel: Path) -> None:
    """The GPU path runs only on GPUs; at least every call and constant it names must exist."""
    source = (Path(__file__).resolve().parents[2] / "src" / "comfybake" / "exporter.py").read_text()
    names = sorted(set(re.findall(r"\bpynvml\.(\w+)", source)))
    assert "nvmlInit" in names and "nvmlDeviceGetMemoryInfo" in names
    missing = "import sys, pynvml; print([n for n in sys.argv[1:] if not hasattr(pynvml, n)])"
    done = subprocess.run(
        [sys.executable, "-c", missing, *names],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(nvml_wheel)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# nvidia-ml-py's calls as the exporter makes them, for two GPUs: GPU 0 refuses its ECC counter (no
# permission), GPU 1 does not support a power reading. The GPU path itself needs a GPU; this runs
# its handling of NVML's answers.
STAND_IN = """
from types import SimpleNamespace

NVML_TEMPERATURE_GPU = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_AGGREGATE_ECC = 1


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


class NVMLError_NoPermission(NVMLError):
    pass


def nvmlInit():
    pass


def nvmlDeviceGetCount():
    return 2


def nvmlDeviceGetHandleByIndex(index):
    return index


def nvmlDeviceGetName(handle):
    return f"Stand-in GPU {handle}".encode()


def nvmlDeviceGetUUID(handle):
    return f"GPU-{handle}"


def nvmlDeviceGetUtilizationRates(handle):
    return SimpleNamespace(gpu=50)


def nvmlDeviceGetMemoryInfo(handle):
    return SimpleNamespace(used=1024, total=4096)


def nvmlDeviceGetTemperature(handle, sensor):
    return 40


def nvmlDeviceGetPowerUsage(handle):
    if handle == 1:
        raise NVMLError_NotSupported()
    return 150000


def nvmlDeviceGetTotalEccErrors(handle, kind, counter):
    if handle == 0:
        raise NVMLError_NoPermission()
    return 0
"""


def gpu(found: Samples, metric: str, labels: dict[str, str]) -> float | None:
    """A GPU sample (its `name` label cannot be a keyword of value())."""
    return found.get((metric, tuple(sorted(labels.items()))))


def test_a_value_nvml_fails_to_read_leaves_out_that_value_only(tmp_path: Path) -> None:
    """One refused read drops that value, not the device, and counts `nvml` once per scrape; a
    value the device does not support is left out without an error."""
    (tmp_path / "nvml").mkdir()
    (tmp_path / "nvml" / "pynvml.py").write_text(STAND_IN)
    _done, found = scrape(write_host(tmp_path / "etc", []), "--nvml", "auto", path=[tmp_path / "nvml"])
    gpus = [{"gpu": str(index), "uuid": f"GPU-{index}", "name": f"Stand-in GPU {index}"} for index in (0, 1)]
    for labels in gpus:
        assert gpu(found, "comfybake_gpu_utilization_ratio", labels) == 0.5
        assert gpu(found, "comfybake_gpu_memory_used_bytes", labels) == 1024
        assert gpu(found, "comfybake_gpu_memory_total_bytes", labels) == 4096
        assert gpu(found, "comfybake_gpu_temperature_celsius", labels) == 40
    assert gpu(found, "comfybake_gpu_power_watts", gpus[0]) == 150
    assert gpu(found, "comfybake_gpu_power_watts", gpus[1]) is None
    assert gpu(found, "comfybake_gpu_ecc_uncorrected_errors_total", gpus[0]) is None
    assert gpu(found, "comfybake_gpu_ecc_uncorrected_errors_total", gpus[1]) == 0
    assert value(found, "comfybake_exporter_errors_total", instance="", what="nvml") == 1
