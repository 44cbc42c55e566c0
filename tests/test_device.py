"""Device and precision choice, and the diagnostic report (all paths testable on a CPU)."""

import os
import resource
import threading

import pytest
import torch

from napari_selfreg import device as dev


@pytest.fixture
def cpu_only(monkeypatch):
    """Pretend to run a CPU-only torch wheel, whatever this machine has."""
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(dev, "mps_available", lambda: False)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend to have one CUDA GPU (only the queries resolve_* make)."""
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")


def test_auto_prefers_cuda_then_mps_then_cpu(cpu_only, monkeypatch):
    assert dev.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(dev, "mps_available", lambda: True)
    assert dev.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert dev.resolve_device("auto") == torch.device("cuda", 0)


def test_cuda_on_cpu_only_build_says_why(cpu_only):
    with pytest.raises(ValueError, match="CPU-only") as err:
        dev.resolve_device("cuda")
    assert "available: cpu" in str(err.value)
    with pytest.raises(ValueError, match="not available"):
        dev.resolve_device("cuda:1")
    with pytest.raises(ValueError, match="mps"):
        dev.resolve_device("mps")
    assert "CPU-only" in dev.cuda_unavailable_reason()


def test_cuda_build_without_gpu_says_so(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert "sees no GPU" in dev.cuda_unavailable_reason()


def test_explicit_devices(fake_gpu):
    assert dev.resolve_device("cpu") == torch.device("cpu")
    assert dev.resolve_device("cuda") == torch.device("cuda", 0)
    assert dev.resolve_device("cuda:0") == torch.device("cuda", 0)
    assert dev.resolve_device("gpu") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="1 GPU"):
        dev.resolve_device("cuda:3")
    with pytest.raises(ValueError, match="cuda:N"):
        dev.resolve_device("cuda:x")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        dev.resolve_device("tpu")


def test_precision_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    assert dev.resolve_precision("fp32", cpu) is None
    assert dev.resolve_precision("bf16", cpu) is torch.bfloat16
    assert dev.resolve_precision("float16", cpu) is torch.float16
    monkeypatch.setattr(dev, "cpu_bf16_fast", lambda: True)
    assert dev.resolve_precision("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(dev, "cpu_bf16_fast", lambda: False)
    assert dev.resolve_precision("auto", "cpu") is None
    with pytest.raises(ValueError, match="unknown precision"):
        dev.resolve_precision("fp8", cpu)


def test_precision_on_cuda(fake_gpu, monkeypatch):
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(dev, "cuda_bf16_native", lambda device: True)
    assert dev.resolve_precision("auto", gpu) is torch.bfloat16
    monkeypatch.setattr(dev, "cuda_bf16_native", lambda device: False)  # e.g. a T4
    assert dev.resolve_precision("auto", gpu) is torch.float16
    assert dev.resolve_precision("fp32", gpu) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # emulated is allowed
    assert dev.resolve_precision("bf16", gpu) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    with pytest.raises(ValueError, match="no bfloat16"):
        dev.resolve_precision("bf16", gpu)


def test_cuda_bf16_native_reads_compute_capability(fake_gpu, monkeypatch):
    class Props:
        major = 7

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    assert not dev.cuda_bf16_native(torch.device("cuda", 0))
    Props.major = 9
    assert dev.cuda_bf16_native(torch.device("cuda", 0))


def test_bf16_detection_needs_bf16_units():
    assert not dev.cpu_bf16_fast({})
    assert not dev.cpu_bf16_fast({"avx2": True, "avx512_f": True})
    for units in ("amx_bf16", "avx512_bf16", "bf16"):  # any of them, when oneDNN takes bf16
        assert dev.cpu_bf16_fast({units: True}) == dev.cpu_bf16_fast({"amx_tile": True})
    caps = dev.cpu_capabilities()  # this machine: the answer follows its flags
    has_units = any(caps.get(k) for k in ("amx_bf16", "amx_tile", "avx512_bf16", "bf16"))
    assert dev.cpu_bf16_fast() == (has_units and dev.cpu_bf16_fast({"amx_tile": True}))


def test_autocast_context():
    cpu = torch.device("cpu")
    with dev.autocast(cpu, None):
        assert not torch.is_autocast_enabled("cpu")
    with dev.autocast(cpu, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") is torch.bfloat16
    assert dev.precision_name(None) == "fp32"
    assert dev.precision_name(torch.bfloat16) == "bf16"


def test_device_report_lists_everything(cpu_only):
    report = dev.device_report()
    assert f"torch {torch.__version__}" in report
    assert "CUDA: not available" in report and "CPU-only" in report
    assert "MPS:" in report
    assert "CPU bf16:" in report
    assert f"{torch.get_num_threads()} intra-op" in report
    assert "auto choice: device cpu" in report


MIB = 1024**2


def _fault_rounds(rounds: int = 6) -> list[int]:
    """Page faults of allocating, touching and freeing 12 x 8 MiB, per round (fewer
    and larger where transparent huge pages are always on: compare, don't count)."""
    faults = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        tensors = [torch.ones(8 * MIB, dtype=torch.uint8) for _ in range(12)]
        del tensors
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def _glibc_start_values(libc) -> None:
    """glibc's values before it adapts: every block over 128 KiB is mmapped and unmapped."""
    libc.mallopt(dev._M_MMAP_THRESHOLD, 128 * 1024)
    libc.mallopt(dev._M_TRIM_THRESHOLD, 128 * 1024)


def _needs_glibc():
    libc = dev._glibc()
    if libc is None:  # the mechanism is glibc's; elsewhere reuse_freed_memory is a no-op
        pytest.skip("needs Linux with glibc")
    return libc


@pytest.fixture
def glibc_after_test():
    """Leave malloc as a finished job leaves it, also when a test stops half-way."""
    yield
    with dev.reuse_freed_memory():  # its exit sets what a finished job leaves
        pass


@pytest.mark.parametrize(
    "name, value",
    [("MALLOC_TRIM_THRESHOLD_", "1000000"), ("MALLOC_TOP_PAD_", "0"),
     ("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=65536")],
)  # fmt: skip
def test_reuse_freed_memory_leaves_malloc_settings_of_the_user_alone(monkeypatch, name, value):
    _needs_glibc()
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # a setting we do not touch: still on
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert dev._glibc() is not None
    monkeypatch.setenv(name, value)
    assert dev._glibc() is None


def test_reuse_freed_memory_keeps_pages_and_gives_them_back_after_the_last_job(
    glibc_after_test,
):
    libc = _needs_glibc()
    _glibc_start_values(libc)
    control = sum(_fault_rounds()[3:])  # freed blocks fault in again, round after round
    with dev.reuse_freed_memory():
        with dev.reuse_freed_memory():  # a second job at the same time
            faults = sum(_fault_rounds()[3:])  # once the heap has grown
        held = _rss_mib()  # the inner job's end must not trim
    released = _rss_mib()
    assert control > 0 and faults < 0.1 * control, (control, faults)
    assert held - released > 48


def test_reuse_freed_memory_in_a_worker_thread(glibc_after_test):
    """The widgets run jobs in threads, whose memory comes from glibc's per-thread heaps."""
    libc = _needs_glibc()
    result = {}

    def job():
        _glibc_start_values(libc)
        result["control"] = _fault_rounds()
        with dev.reuse_freed_memory():
            result["faults"] = _fault_rounds()

    thread = threading.Thread(target=job)
    thread.start()
    thread.join()
    control, faults = sum(result["control"][3:]), sum(result["faults"][3:])
    assert control > 0 and faults < 0.1 * control, (control, faults)
