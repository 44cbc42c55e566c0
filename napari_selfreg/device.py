"""Device and precision choice for inference and training, plus a diagnostic report.

``resolve_device("auto")`` picks CUDA, then Apple MPS, then the CPU;
``resolve_precision("auto", device)`` picks the autocast dtype that is fast there
(bfloat16 on CPUs with bf16 units and on bf16-capable GPUs, float16 on older
CUDA GPUs, float32 otherwise). ``device_report()`` says what this machine has and,
when there is no GPU, why (the usual cause: a CPU-only torch wheel).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
import threading
from collections.abc import Mapping
from typing import Any

import torch

DEVICES = ("auto", "cuda", "mps", "cpu")
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
PRECISION_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}


def cuda_unavailable_reason() -> str | None:
    """Why CUDA cannot be used here, in one phrase, or None when it can."""
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"this torch build ({torch.__version__}) has no CUDA support (a CPU-only wheel)"
    if not torch.cuda.is_available():
        if torch.cuda.device_count() == 0:
            return "torch has CUDA support but sees no GPU (no driver, or CUDA_VISIBLE_DEVICES hides it)"
        return "torch has CUDA support but cannot initialise the GPU (driver too old?)"
    return None


def mps_available() -> bool:
    """True when Apple's Metal backend can run tensors."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """Devices this process can use, e.g. ``["cuda:0", "cpu"]``."""
    found = []
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if mps_available():
        found.append("mps")
    return [*found, "cpu"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device for a user choice.

    Args:
        device: ``"auto"`` (CUDA > MPS > CPU), ``"cuda"``, ``"cuda:N"``, ``"mps"``
            or ``"cpu"`` (a ``torch.device`` is accepted too).

    Raises:
        ValueError: the device is unknown or not available here; the message says
            which devices are available and why the requested one is not.
    """
    name = str(device).strip().lower()
    if name == "gpu" or name.startswith("gpu:"):  # TotalSegmentator's spelling
        name = "cuda" + name[3:]
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not mps_available():
            raise ValueError(
                f"device 'mps' is not available (Apple Metal needs macOS on Apple silicon "
                f"and an MPS-enabled torch); available: {', '.join(available_devices())}"
            )
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise ValueError(
                f"device {name!r} is not available: {reason}; available: "
                f"{', '.join(available_devices())}"
            )
        index = name.partition(":")[2]
        if index and not index.isdigit():
            raise ValueError(f"bad device {name!r}; write cuda:N with N a GPU number")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} does not exist: this machine has "
                f"{torch.cuda.device_count()} GPU(s); available: {', '.join(available_devices())}"
            )
        return torch.device("cuda", int(index) if index else torch.cuda.current_device())
    raise ValueError(f"unknown device {str(device)!r}; choose auto, cuda, cuda:N, mps or cpu")


def cpu_capabilities() -> Mapping[str, Any]:
    """CPU instruction-set flags as torch detects them (``{}`` where torch cannot tell)."""
    getter = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.10
    if getter is not None:
        return getter()
    caps: dict[str, Any] = {}
    cpu_c = getattr(torch._C, "_cpu", None)
    for flag in ("avx512_bf16", "amx_tile"):  # older private helpers
        fn = getattr(cpu_c, f"_is_{flag}_supported", None)
        if fn is not None:
            caps[flag] = bool(fn())
    return caps


def cpu_bf16_fast(caps: Mapping[str, Any] | None = None) -> bool:
    """True when the CPU has bfloat16 units (AMX, AVX512-BF16 or ARM bf16) that oneDNN uses.

    Without them torch emulates bf16 and autocast is slower than float32.

    Args:
        caps: CPU flags (default :func:`cpu_capabilities`).
    """
    caps = cpu_capabilities() if caps is None else caps
    has_units = any(caps.get(k, False) for k in ("amx_bf16", "amx_tile", "avx512_bf16", "bf16"))
    mkldnn_ok = True
    with contextlib.suppress(AttributeError, RuntimeError):
        mkldnn_ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(has_units and mkldnn_ok)


def cuda_bf16_native(device: torch.device) -> bool:
    """True for GPUs with bfloat16 units (NVIDIA compute capability >= 8, AMD ROCm).

    ``torch.cuda.is_bf16_supported()`` also says yes where bf16 is only emulated
    (slow), so ``auto`` asks this instead.
    """
    if getattr(torch.version, "hip", None):
        return True
    return torch.cuda.get_device_properties(device).major >= 8


def resolve_precision(
    precision: str | None = "auto", device: str | torch.device = "cpu"
) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain float32.

    Args:
        precision: ``"auto"``, ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        device: the device the network runs on.

    Raises:
        ValueError: unknown precision, or one that this device cannot run.
    """
    device = torch.device(device)
    name = "auto" if precision is None else str(precision).strip().lower()
    name = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32"}.get(
        name, name
    )
    if name not in (*PRECISIONS, "auto"):
        raise ValueError(f"unknown precision {precision!r}; choose auto, bf16, fp16 or fp32")
    if device.type == "cuda":
        if name == "auto":
            return torch.bfloat16 if cuda_bf16_native(device) else torch.float16
        if name == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"GPU {torch.cuda.get_device_name(device)} has no bfloat16; use fp16")
        return PRECISIONS[name]
    if device.type == "cpu":
        if name == "auto":
            return torch.bfloat16 if cpu_bf16_fast() else None
        return PRECISIONS[name]
    if device.type == "mps":
        return None if name == "auto" else PRECISIONS[name]
    return None if name in ("auto", "fp32") else PRECISIONS[name]


def precision_name(dtype: torch.dtype | None) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"`` for an autocast dtype (None: fp32)."""
    return PRECISION_NAMES.get(dtype, str(dtype))


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# glibc's mallopt parameters (malloc.h) and values
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD_MAX = 32 * 1024**2  # glibc's ceiling on 64-bit systems
_KEEP_HEAP = 2**31 - 1  # trim threshold while a job runs (mallopt takes an int)
_KEEP_THREAD_HEAPS = 64 * 1024**2  # top pad: a thread's free 64 MiB heaps stay mapped
_AFTER_JOBS = 2 * _MMAP_THRESHOLD_MAX  # where glibc's own adaptive trim threshold ends
_DEFAULT_TOP_PAD = 128 * 1024
_heap_lock = threading.Lock()
_heap_jobs = 0


_TUNED = ("mmap_threshold", "trim_threshold", "top_pad")  # what the user may have set


def _glibc():
    """The C library when it is glibc and the user has not tuned what we set, else None."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(f"MALLOC_{name.upper()}_" in os.environ or f"glibc.malloc.{name}" in tunables
           for name in _TUNED):  # fmt: skip
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@contextlib.contextmanager
def reuse_freed_memory():
    """Keep freed CPU tensor memory for reuse while a predictor or training job runs.

    glibc gives freed blocks above its mmap threshold back to the kernel and trims
    the heap once more than twice that lies free on top, so every training step
    and every predictor tile faulted its activations in again, page by page (here
    12 % of a 3D training step, 24 % of whole-volume inference). Inside, blocks up
    to 32 MiB come from the heap and the heap is not trimmed; when the last job ends
    the free memory goes back to the kernel (``malloc_trim``), the trim threshold is
    left where glibc's adaptive one ends (64 MiB) and the mmap threshold at 32 MiB
    (glibc's adaptive one cannot be switched back on). Other C libraries, or one of
    the three set by the user (``MALLOC_<NAME>_`` or ``GLIBC_TUNABLES``): no change.
    """
    global _heap_jobs
    libc = _glibc()
    if libc is None:
        yield
        return
    with _heap_lock:
        if _heap_jobs == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_HEAP)
            libc.mallopt(_M_TOP_PAD, _KEEP_THREAD_HEAPS)
        _heap_jobs += 1
    try:
        yield
    finally:
        with _heap_lock:
            _heap_jobs -= 1
            if _heap_jobs == 0:
                libc.mallopt(_M_TRIM_THRESHOLD, _AFTER_JOBS)
                libc.mallopt(_M_TOP_PAD, _DEFAULT_TOP_PAD)
                libc.malloc_trim(0)


def device_report() -> str:
    """A multi-line diagnostic: torch build, GPUs (or why none), MPS, CPU, bf16, threads."""
    lines = [
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}, "
        f"cuDNN: {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'none'})",
        f"python {platform.python_version()} on {platform.system()} {platform.machine()}",
    ]
    reason = cuda_unavailable_reason()
    if reason is None:
        lines.append(f"CUDA: available, {torch.cuda.device_count()} GPU(s)")
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            bf16 = "yes" if props.major >= 8 else "emulated only"
            lines.append(
                f"  cuda:{i} {props.name}, compute {props.major}.{props.minor}, "
                f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free), bf16 {bf16}"
            )
    else:
        lines.append(f"CUDA: not available - {reason}")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_built():
        lines.append(f"MPS: {'available' if mps.is_available() else 'built, not available'}")
    else:
        lines.append("MPS: not built into this torch")
    caps = cpu_capabilities()
    name = caps.get("cpu_name") or platform.processor() or platform.machine()
    flags = [k for k in ("avx2", "avx512_f", "avx512_bf16", "amx_bf16") if caps.get(k)]
    lines.append(
        f"CPU: {name}, {os.cpu_count()} logical cores, torch kernels "
        f"{torch.backends.cpu.get_cpu_capability()}, flags {' '.join(flags) or 'unknown'}"
    )
    lines.append(
        f"CPU bf16: {'fast (autocast bf16 is used)' if cpu_bf16_fast() else 'slow or absent (fp32 is used)'}"
    )
    lines.append(
        f"threads: {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op"
    )
    auto = resolve_device("auto")
    lines.append(
        f"auto choice: device {auto}, precision {precision_name(resolve_precision('auto', auto))}"
    )
    return "\n".join(lines)


__all__ = [
    "autocast",
    "available_devices",
    "cpu_bf16_fast",
    "cpu_capabilities",
    "cuda_bf16_native",
    "cuda_unavailable_reason",
    "device_report",
    "precision_name",
    "resolve_device",
    "resolve_precision",
    "reuse_freed_memory",
]
