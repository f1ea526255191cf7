"""What machine this is: the device description recorded with every result, and which
optional baseline libraries import here."""

from __future__ import annotations

import contextlib
import datetime
import importlib
import importlib.metadata
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

# Libraries some suites compare against; they are recorded as missing, never required.
OPTIONAL_BASELINES = ("liger_kernel", "apex", "flash_attn", "xformers")


class Skip(Exception):
    """Raised by a provider's build step when it cannot run here; the reason is recorded."""


@dataclass
class DeviceInfo:
    type: str  # "cpu" or "cuda"
    name: str  # CPU model or GPU name
    slug: str  # file-name-safe: "cpu-amd-epyc-2t", "nvidia-h100-80gb-hbm3"
    threads: int  # torch's intra-op threads (CPU timing is pinned to these)
    cache_bytes: int  # last-level cache (CPU L3, GPU L2): inputs are rotated to defeat it
    torch: str
    triton: str | None
    python: str
    cuda: str | None
    date: str  # ISO 8601, local time with offset
    optional_baselines: dict[str, str]  # module -> version, or why it is unavailable
    cpu_count: int | None
    # 1, 5, 15-minute load averages when the run began: CPU timings taken while other
    # processes keep cores busy are unreliable (a thread team waits for its slowest member).
    load_average: tuple[float, float, float] | None


def _slugify(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)|\bcpu\b|\bprocessor\b|@.*$", " ", text.lower())
    text = re.sub(r"\b\d+-core\b", " ", text)
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown cpu"


def _cpu_cache_bytes() -> int:
    """Largest cache of CPU 0 from sysfs (the L3 on x86); 32 MiB when unknown."""
    sizes = []
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = size_file.read_text().strip()
            scale = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 * 1024**2)


def _version(module: str) -> str | None:
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return None


def optional_baselines() -> dict[str, str]:
    """Which optional baseline libraries import here: module -> version or the reason not."""
    found = {}
    for module in OPTIONAL_BASELINES:
        try:
            mod = importlib.import_module(module)
            found[module] = str(getattr(mod, "__version__", None) or _version(module) or "?")
        except ImportError as error:
            found[module] = (
                "not installed"
                if isinstance(error, ModuleNotFoundError) and (error.name == module)
                else f"import failed: {one_line(error)}"
            )
        except Exception as error:  # a broken build raises anything at import
            found[module] = f"import failed: {one_line(error)}"
    return found


def require(module: str, available: dict[str, str] | None = None) -> ModuleType:
    """Import an optional baseline or raise Skip with the reason (recorded, never fatal)."""
    status = (available or optional_baselines()).get(module)
    if status is not None and (status == "not installed" or status.startswith("import failed")):
        raise Skip(f"{module} {status}")
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise Skip(f"{module} not installed ({one_line(error)})") from error


def describe_device(device: torch.device) -> DeviceInfo:
    threads = torch.get_num_threads()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        slug = _slugify(name)
        cache = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    else:
        name = _cpu_name()
        slug = f"cpu-{_slugify(name)}-{threads}t"
        cache = _cpu_cache_bytes()
    return DeviceInfo(
        type=device.type,
        name=name,
        slug=slug,
        threads=threads,
        cache_bytes=cache,
        torch=torch.__version__,
        triton=_version("triton"),
        python=platform.python_version(),
        cuda=torch.version.cuda,
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        optional_baselines=optional_baselines(),
        cpu_count=os.cpu_count(),
        load_average=load_average(),
    )


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:  # not available on this platform
        return None


def one_line(error: BaseException) -> str:
    """An error as one short line for the results: its type and first line."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]
