"""``hepaseg benchmark``: what the networks and the pipeline cost on this machine.

:func:`run_benchmark` measures, in one process, on CUDA when available (else CPU):

* per network (built with ``base_width``, one input channel, one class):
  trainable parameters; FLOPs of one ``size x size`` slice (batch 1,
  :class:`torch.utils.flop_counter.FlopCounterMode`, reported in GFLOPs; see
  "FLOPs" below); time per slice at batch ``batch`` of an inference pass and of a
  training step (forward, BCE-with-logits loss, backward; no optimizer), each in
  fp32 (NCHW) and in bf16 autocast with channels_last weights and inputs; the peak
  memory of one fp32 forward pass at that batch (see "Memory" below);
* optionally (``ratio_widths``) MFCNet and U-Net alone at further widths, every
  pass timed, for their ratios;
* the spatial context extractor of MFCNet
  (:class:`~hepaseg.models.context.SpatialContext`) with its three implementations
  (``"chunked"``, the fused ``scaled_dot_product_attention`` ``"sdpa"`` and the
  explicit ``N x N`` matrix ``"naive"``) at ``56 x 56 x 256``, batch 4, forward +
  backward: time and peak memory;
* ``hepaseg prepare`` throughput: a phantom CT written as NIfTI to a temp dir,
  prepared at ``size`` with every slice kept (reading, windowing, resizing and the
  compressed shard write included);
* ``hepaseg prepare --workers 2`` against one worker on a four-case LiTS-layout phantom set
  (each case the size of the prepare phantom): slices/s of both (the helper's start-up
  included), the speed-up, peak memory per worker and whether the outputs are identical;
* end-to-end ``hepaseg predict`` seconds (:func:`~hepaseg.inference.pipeline.predict_case`,
  checkpoint load + read + inference + writing every output) of an UNTRAINED
  width-32 MFCNet checkpoint in the real checkpoint format (its 1 x 1 head set to a
  constant "no tumour" logit: see :func:`_bench_predict`), on 3D-IRCADb 1.1
  (``129 x 512 x 512``) when ``../shared/data/3Dircadb1.1`` is found (next to the
  repository, next to the working directory, or under ``$HEPASEG_SHARED_DATA``),
  else on a phantom of that size;
* ``predict``'s write step for a badly trained model (lesion table and confidence columns, volume
  metrics, mask, CSV/JSON, overlay, as ``predict_case`` times them): ``predict_case`` with the
  network's answer replaced by an i.i.d. speckled mask of 8 M voxels on a ``129 x 512 x 512``
  phantom (:func:`_bench_write`; quick: the ``16 x 512 x 512`` phantom at the same density).

Ratios are reported beside the absolute numbers and are exact quotients of them:
MFCNet / U-Net (parameters, GFLOPs, time per slice of every pass, peak memory),
naive / SDPA and chunked / SDPA (time, memory) and the bf16 speed-up (fp32 time /
bf16 time per slice).

Timing: every timed call is run ``warmup`` times first (1 with ``quick``, else 2),
then ``repeats`` times; the MEDIAN is reported. The networks' passes are timed
interleaved (unet, mfcnet, unet, mfcnet, ...), so that a shared machine's load
changes hit every network alike and their ratios are measured side by side. The
clock is wall time, or with ``clock="cpu"`` this process's CPU time (with one torch
thread, what the work cost whatever else runs on the machine). CUDA work is
synchronised inside each timed call.

FLOPs: ``FlopCounterMode`` counts matrix products and convolutions as 2 x MACs and
ignores element-wise work (BatchNorm, ReLU, softmax, pooling). MFCNet is counted
with its ``"chunked"`` attention, whose products are exactly what the maths needs
(``Q K^T`` at the query width ``C/8``, ``M F`` at the value width ``C``); the SDPA
path zero-pads queries and keys to the value width and would count ``Q K^T`` up to
8 times over. The registry has no formula for the CPU flash-attention kernel, so
one is added (``2 b h n m (d + d_v)``, the formula torch uses for the CUDA kernels)
for networks that call it.

Memory (:data:`MEMORY_METHOD`): on CUDA, ``torch.cuda.max_memory_allocated`` during
the call minus what was allocated before it. On CPU, ``torch.profiler`` with
``profile_memory=True``: every allocation and free of torch's CPU allocator during
the call, ordered by time (at operator granularity), summed; the maximum of that
running sum. Both count the EXTRA tensor memory the call needed (activations,
outputs, workspaces), not the weights already in memory, nor memory oneDNN or
Python allocate outside torch's allocator.

Machine information recorded: CPU model, logical cores and those usable by this
process, torch threads, torch/python versions, device (and GPU name), native bf16
support, load average (a shared machine skews every timing).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from hepaseg import __version__
from hepaseg.errors import HepasegError
from hepaseg.io.atomic import atomic_path

__all__ = [
    "CLOCKS",
    "IRCADB_SHAPE",
    "MEMORY_METHOD",
    "benchmark_tables",
    "count_flops",
    "find_ircadb",
    "interleaved_medians",
    "machine_info",
    "median_seconds",
    "peak_memory_bytes",
    "run_benchmark",
    "write_untrained_checkpoint",
]

MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated during the call minus memory allocated before it",
    "cpu": (
        "torch.profiler(profile_memory=True): max of the running sum of torch CPU allocator "
        "allocations - frees during the call (operator granularity); excludes weights"
    ),
}
#: 3D-IRCADb 1.1: 129 axial slices of 512 x 512 pixels (0.57 x 0.57 x 1.6 mm).
IRCADB_SHAPE = (129, 512, 512)
IRCADB_SPACING = (1.6, 0.57, 0.57)
QUICK_VOLUME_SHAPE = (16, 512, 512)
#: Cases of the multi-case prepare set (each the size of the prepare phantom).
PREPARE_CASES = 4
#: Benchmark data options: the paper's 224 x 224 slices with one neighbour slice on each side.
BENCH_WINDOW = (-200.0, 250.0)
BENCH_CONTEXT_SLICES = 1

_MB = 2.0**20


# --- measuring ----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: Clocks of the timings: wall time, or the CPU time of this process (all its threads). With
#: ``--threads 1`` the CPU time is what the work cost, whatever else runs on a shared machine.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def median_seconds(
    fn: Callable[[], Any], *, repeats: int, warmup: int, device: torch.device, clock: str = "wall"
) -> float:
    """Median seconds (``clock``: :data:`CLOCKS`) of ``fn()`` over ``repeats`` runs after ``warmup`` untimed ones."""
    return interleaved_medians({"fn": fn}, repeats=repeats, warmup=warmup, device=device, clock=clock)["fn"]


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int, device: torch.device, clock: str = "wall"
) -> dict[str, float]:
    """Median seconds of each ``fn()``, its timed runs interleaved with the others' (a, b, a, b, ...).

    Interleaving spreads a shared machine's load changes over every entry alike, so ratios of
    the medians are fairer than ratios of runs timed one after the other. Every ``fn`` first
    runs ``warmup`` times untimed.
    """
    now = CLOCKS[clock]
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = now()
            fn()
            _sync(device)
            times[name].append(now() - t0)
    return {name: float(statistics.median(t)) for name, t in times.items()}


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop lines), restoring it afterwards."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded interpreters): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Extra peak tensor memory (bytes, >= 0) of one call ``fn()``; see :data:`MEMORY_METHOD`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, int(torch.cuda.max_memory_allocated(device) - base))
    from torch.profiler import ProfilerActivity, profile

    # The profiler prints C++ lines on fd 2 (start/stop, "memory block allocated before profiling");
    # silence them. ``fn`` already ran untimed and unsilenced before, and exceptions still propagate.
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each event's self memory is what it allocated minus what it freed (children excluded);
    # "[memory]" events are allocations/frees outside any operator.
    events = sorted(
        (e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage
    )
    running = itertools.accumulate(delta for _, delta in events)
    return max(0, int(max(running, default=0)))


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``softmax(Q K^T) V``: ``2 b h n m d`` for ``Q K^T`` plus ``2 b h n m d_v`` for the product."""
    b, h, n, d = query_shape
    m, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * n * m * d + 2 * b * h * n * m * d_v


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs (2 x MACs of convolutions and matrix products) of ``model(x)`` in inference mode."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None:
        mapping[cpu_flash] = _sdpa_cpu_flops
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with torch.inference_mode(), counter:
        model(x)
    return int(counter.get_total_flops())


# --- machine ------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cpu_native_bf16() -> bool:
    from hepaseg.models.context import cpu_has_native_bf16

    return cpu_has_native_bf16()


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, torch threads and version, device, bf16 support, load average."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hepaseg": __version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_native_bf16": _cpu_native_bf16(),
    }
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        info["load_average_1m"] = None
    return info


# --- checkpoints and data -------------------------------------------------------------------------


def write_untrained_checkpoint(
    path: str | os.PathLike,
    *,
    model: str = "mfcnet",
    width: int = 32,
    data_options: dict[str, Any] | None = None,
    seed: int = 0,
    head_bias: float | None = None,
) -> Path:
    """Write an untrained network as a hepaseg checkpoint (the format of ``training/checkpoint.py``).

    ``state_dict`` keys are ``net.<param>`` and ``checkpoint["hepaseg"]`` holds the model name,
    options, channels, width and data options, so :func:`hepaseg.training.load_checkpoint`
    rebuilds it. Default data options: window ``(-200, 250)`` HU, ``size`` 224, one context
    slice on each side. ``head_bias``: zero the ``1 x 1`` head's weights and set its bias, so the
    logit is that constant everywhere (e.g. -4: no tumour) while every layer still computes.
    Written atomically.
    """
    from hepaseg.models import build_model

    opts = {"window": list(BENCH_WINDOW), "size": 224, "context_slices": BENCH_CONTEXT_SLICES, "slices": "all",
            "target": "tumor"}
    opts.update(data_options or {})
    in_channels = 2 * int(opts["context_slices"]) + 1
    torch.manual_seed(seed)
    net = build_model(model, in_channels=in_channels, num_classes=1, base_width=width)
    if head_bias is not None:
        with torch.no_grad():
            net.head.weight.zero_()
            net.head.bias.fill_(float(head_bias))
    checkpoint = {
        "state_dict": {f"net.{key}": value for key, value in net.state_dict().items()},
        "hepaseg": {
            "version": __version__, "model": model, "model_options": {}, "in_channels": in_channels,
            "num_classes": 1, "base_width": width, "data_options": opts,
            "metrics": {"note": "untrained (hepaseg benchmark)"}, "config": {},
        },
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return Path(path)


def find_ircadb() -> Path | None:
    """``3Dircadb1.1`` under ``$HEPASEG_SHARED_DATA``, ``<repo>/../shared/data`` or ``./../shared/data``."""
    candidates = []
    if os.environ.get("HEPASEG_SHARED_DATA"):
        candidates.append(Path(os.environ["HEPASEG_SHARED_DATA"]))
    repo_root = Path(__file__).resolve().parents[3]  # src/hepaseg/experiments/benchmark.py -> repo
    candidates += [repo_root.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for root in candidates:
        if (root / "3Dircadb1.1").is_dir():
            return root / "3Dircadb1.1"
    return None


# --- the parts ----------------------------------------------------------------------------------


def _bf16_skip_note(device: torch.device) -> str | None:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"skipped: {torch.cuda.get_device_name(device)} has no bf16 support"
    return None


def _step_fns(
    nets: dict[str, torch.nn.Module], x: torch.Tensor, *, train: bool, bf16: bool, device: torch.device
) -> dict[str, Callable[[], None]]:
    """One inference pass or one training step (forward + backward) per network.

    bf16: autocast with channels_last weights and inputs; else float32 NCHW. A training step
    is forward, a BCE-with-logits loss against a fixed random mask, backward, gradients set
    to None (no optimizer: its cost does not depend on the architecture's FLOPs).
    """
    memory_format = torch.channels_last if bf16 else torch.contiguous_format
    x = x.contiguous(memory_format=memory_format)
    target = (torch.rand(x.shape[0], 1, *x.shape[2:], generator=torch.Generator().manual_seed(1)) > 0.9)
    target = target.float().to(device)
    fns = {}
    for name, net in nets.items():
        net.to(memory_format=memory_format).train(train)

        def step(net: torch.nn.Module = net) -> None:
            with contextlib.ExitStack() as stack:
                if not train:
                    stack.enter_context(torch.inference_mode())
                if bf16:
                    stack.enter_context(torch.autocast(device_type=device.type, dtype=torch.bfloat16))
                logits = net(x)
            if train:
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
                loss.backward()
                net.zero_grad(set_to_none=True)

        fns[name] = step
    return fns


#: The timed passes of every network: (key, training step?, bf16 + channels_last?).
PASSES = (("fp32", False, False), ("bf16", False, True), ("train_fp32", True, False), ("train_bf16", True, True))


def _time_networks(
    names: Sequence[str], *, width: int, size: int, batch: int, repeats: int, warmup: int, device: torch.device,
    clock: str,
) -> dict[str, dict[str, Any]]:
    """``{name: {<pass>_ms_per_slice: ...}}`` for :data:`PASSES`, each pass interleaved over the networks."""
    from hepaseg.models import build_model

    torch.manual_seed(0)
    nets = {name: build_model(name, in_channels=1, num_classes=1, base_width=width).to(device) for name in names}
    x = torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    out: dict[str, dict[str, Any]] = {name: {} for name in names}
    skip = _bf16_skip_note(device)
    for key, train, bf16 in PASSES:
        if bf16 and skip:
            for name in names:
                out[name][f"{key}_ms_per_slice"] = None
            continue
        try:
            seconds = interleaved_medians(_step_fns(nets, x, train=train, bf16=bf16, device=device),
                                          repeats=repeats, warmup=warmup, device=device, clock=clock)
        except RuntimeError as exc:  # autocast or a kernel unsupported on this device
            if not bf16:
                raise
            skip = f"skipped: bf16 autocast failed ({str(exc).splitlines()[0][:120]})"
            for name in names:
                out[name][f"{key}_ms_per_slice"] = None
            continue
        for name in names:
            out[name][f"{key}_ms_per_slice"] = 1e3 * seconds[name] / batch
    native = device.type == "cuda" or _cpu_native_bf16()
    note = skip or ("native bf16" if native else "emulated bf16 (no AVX512-BF16/AMX): expect a slow-down")
    for name in names:
        out[name]["bf16_note"] = note
    return out


def _bench_models(
    names: Sequence[str], *, width: int, size: int, batch: int, repeats: int, warmup: int, device: torch.device,
    clock: str,
) -> list[dict[str, Any]]:
    from hepaseg.models import build_model, count_parameters

    rows = []
    for name in names:
        torch.manual_seed(0)
        model = build_model(name, in_channels=1, num_classes=1, base_width=width).eval().to(device)
        if hasattr(model, "set_attention_impl"):
            # FLOPs of what the maths needs: the chunked path computes Q K^T at the query width,
            # where the SDPA path pays for zero-padded heads.
            model.set_attention_impl("chunked")
        row: dict[str, Any] = {"name": name, "params": count_parameters(model)}
        row["gflops"] = count_flops(model, torch.rand(1, 1, size, size, device=device)) / 1e9
        if hasattr(model, "set_attention_impl"):
            model.set_attention_impl("auto")
        x = torch.rand(batch, 1, size, size, device=device)

        def forward(model: torch.nn.Module = model, x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                model(x)

        forward()  # untimed: oneDNN picks its kernels on the first call
        row["peak_memory_mb"] = peak_memory_bytes(forward, device) / _MB
        rows.append(row)
    times = _time_networks(names, width=width, size=size, batch=batch, repeats=repeats, warmup=warmup,
                           device=device, clock=clock)
    for row in rows:
        t = times[row["name"]]
        row.update(t)
        row["fp32_slices_per_s"] = 1e3 / t["fp32_ms_per_slice"]
        row["bf16_slices_per_s"] = None if t["bf16_ms_per_slice"] is None else 1e3 / t["bf16_ms_per_slice"]
        row["bf16_speedup"] = _ratio(t["fp32_ms_per_slice"], t["bf16_ms_per_slice"])
    return rows


def _ratio_row(m: dict[str, Any], u: dict[str, Any]) -> dict[str, float | None]:
    """MFCNet / U-Net of every timed pass (keys ``fp32_time``, ``bf16_time``, ``train_fp32_time``...)."""
    return {f"{key}_time": _ratio(m[f"{key}_ms_per_slice"], u[f"{key}_ms_per_slice"]) for key, _, _ in PASSES}


ATTENTION_IMPLS = ("chunked", "sdpa", "naive")


def _bench_attention(
    spatial: int, channels: int, batch: int, *, repeats: int, warmup: int, device: torch.device, clock: str = "wall"
) -> dict[str, Any]:
    from hepaseg.models.context import SpatialContext

    n = spatial * spatial
    result: dict[str, Any] = {
        "input_shape": [batch, channels, spatial, spatial], "n": n, "pass": "forward + backward",
        "naive_matrix_mb": batch * n * n * 4 / _MB,  # the float32 (B, N, N) attention matrix
    }
    torch.manual_seed(0)
    x = torch.randn(batch, channels, spatial, spatial, device=device, requires_grad=True)
    blocks = {}
    for impl in ATTENTION_IMPLS:
        torch.manual_seed(0)
        blocks[impl] = SpatialContext(channels, attention_impl=impl).to(device)
        with torch.no_grad():
            blocks[impl].alpha.fill_(0.5)  # a trained-looking weight: the context term is in the graph

    def make_step(block: SpatialContext, x: torch.Tensor, bf16: bool) -> Callable[[], None]:
        def step() -> None:
            x.grad = None
            block.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                out = block(x)
            out.float().sum().backward()

        return step

    steps = {impl: make_step(block, x, False) for impl, block in blocks.items()}
    seconds = interleaved_medians(steps, repeats=repeats, warmup=warmup, device=device, clock=clock)
    for impl, step in steps.items():
        result[impl] = {"ms": 1e3 * seconds[impl], "peak_memory_mb": peak_memory_bytes(step, device) / _MB}
    # The same in bf16 autocast on channels_last input: which implementation wins there depends on
    # the machine's bf16 support ("auto" picks by it).
    if _bf16_skip_note(device) is None:
        x_bf16 = x.detach().to(torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        bf16_steps = {impl: make_step(block.to(memory_format=torch.channels_last), x_bf16, True)
                      for impl, block in blocks.items()}
        seconds = interleaved_medians(bf16_steps, repeats=repeats, warmup=warmup, device=device, clock=clock)
        for impl in ATTENTION_IMPLS:
            result[impl]["bf16_ms"] = 1e3 * seconds[impl]
    for impl in ("naive", "chunked"):
        result[f"{impl}_over_sdpa"] = {
            "time": result[impl]["ms"] / result["sdpa"]["ms"],
            "memory": _ratio(result[impl]["peak_memory_mb"], result["sdpa"]["peak_memory_mb"]),
        }
    return result


def _bench_prepare(shape: tuple[int, int, int], size: int, work: Path) -> dict[str, Any]:
    from rich.console import Console

    from hepaseg.data.phantom import write_phantom_dataset
    from hepaseg.data.prepare import prepare

    src = work / "prepare_src"
    write_phantom_dataset(src, "lits", n_cases=1, shape=shape, spacing=IRCADB_SPACING)
    t0 = time.perf_counter()
    manifest = prepare(
        src, work / "prepared", window=BENCH_WINDOW, size=size, slices="all", context_slices=BENCH_CONTEXT_SLICES,
        split=(1.0, 0.0, 0.0), progress=False, console=Console(file=io.StringIO()),
    )
    seconds = time.perf_counter() - t0
    n = int(manifest["n_slices"])
    return {"source": "phantom (NIfTI, LiTS layout)", "shape": list(shape), "size": size, "slices": n,
            "seconds": seconds, "slices_per_s": n / seconds}


def _bench_prepare_workers(n_cases: int, shape: tuple[int, int, int], size: int, work: Path,
                           workers: int = 2) -> dict[str, Any]:
    """``prepare`` of an ``n_cases`` LiTS-layout phantom set with 1 and with ``workers`` processes, side
    by side: slices/s of each (worker start-up included), the speed-up, each run's peak memory per
    worker, and whether the two outputs are byte for byte the same."""
    from rich.console import Console

    from hepaseg.data.phantom import write_phantom_dataset
    from hepaseg.data.prepare import prepare

    src = work / "prepare_multi_src"
    write_phantom_dataset(src, "lits", n_cases=n_cases, shape=shape, spacing=IRCADB_SPACING)
    runs = {}
    for n in (1, workers):
        report: dict[str, Any] = {}
        t0 = time.perf_counter()
        manifest = prepare(
            src, work / f"prepared_w{n}", window=BENCH_WINDOW, size=size, slices="all",
            context_slices=BENCH_CONTEXT_SLICES, split=(1.0, 0.0, 0.0), progress=False,
            console=Console(file=io.StringIO()), workers=n, report=report,
        )
        seconds = time.perf_counter() - t0
        peaks = [mb for mb in report["peak_rss_mb"].values() if mb is not None]
        runs[n] = {"seconds": seconds, "slices_per_s": int(manifest["n_slices"]) / seconds,
                   "peak_rss_mb_per_worker": peaks}
    same = all(
        a.read_bytes() == (work / f"prepared_w{workers}" / a.relative_to(work / "prepared_w1")).read_bytes()
        for a in sorted((work / "prepared_w1").rglob("*")) if a.is_file()
    )
    return {"source": "phantom (NIfTI, LiTS layout)", "cases": n_cases, "shape": list(shape), "size": size,
            "slices": int(manifest["n_slices"]), "workers": workers, "one": runs[1], "many": runs[workers],
            "speedup": runs[1]["seconds"] / runs[workers]["seconds"], "identical_output": same,
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}


def _bench_predict(
    shape: tuple[int, int, int] | None, *, size: int, batch: int, width: int, device: torch.device, work: Path,
) -> dict[str, Any]:
    from hepaseg.data.phantom import write_phantom_dataset
    from hepaseg.inference.pipeline import predict_case

    ircadb = find_ircadb() if shape is None else None
    if ircadb is not None:
        source, kind = ircadb, "3D-IRCADb 1.1"
    else:
        shape = shape or IRCADB_SHAPE
        source = write_phantom_dataset(work / "predict_src", "lits", n_cases=1, shape=shape,
                                       spacing=IRCADB_SPACING)[0]
        kind = "phantom"
    # An untrained head turns noise into thousands of speckle "lesions" whose lesion table and
    # surface metrics take minutes -- work a trained network never causes. A constant head logit
    # of -4 (p = 0.018: no tumour) keeps every layer's cost and times the writing of a clean result.
    ckpt = write_untrained_checkpoint(work / "mfcnet_untrained.ckpt", model="mfcnet", width=width,
                                      data_options={"size": size}, head_bias=-4.0)
    t0 = time.perf_counter()
    result = predict_case(source, work / "predicted", checkpoint=ckpt, batch=batch, progress=False,
                          device=str(device))
    seconds = time.perf_counter() - t0
    z = result.shape[0]
    return {
        "source": str(source), "kind": kind, "shape": list(result.shape),
        "model": "mfcnet (untrained; head logit -4: predicts no tumour)", "lesions": len(result.lesions),
        "width": width, "size": size, "batch": batch, "seconds": seconds,
        "timings": {k: float(v) for k, v in result.timings.items()},
        "inference_slices_per_s": z / result.timings["inference"],
        "precision": "auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32",
    }


#: The speckled mask of the write benchmark: 8 M of 3D-IRCADb 1.1's 33.8 M voxels (what a barely
#: trained model marked as tumour there), each voxel tumour independently with this probability.
SPECKLE_FRACTION = 8e6 / (IRCADB_SHAPE[0] * IRCADB_SHAPE[1] * IRCADB_SHAPE[2])


def _bench_write(shape: tuple[int, int, int], work: Path) -> dict[str, Any]:
    """Seconds of ``predict``'s write step for a speckled prediction of a ``shape`` phantom.

    :func:`~hepaseg.inference.pipeline.predict_case` itself on a LiTS-layout phantom (its label gives
    the metrics and the liver the lesions are placed against), with the network's answer replaced by
    an i.i.d. speckled mask of :data:`SPECKLE_FRACTION` (8 M voxels at 3D-IRCADb 1.1's size; seeded)
    and a random probability map: the worst case for components and surfaces -- one voxel in four
    is tumour and nearly every tumour voxel is surface. Everything after inference runs as in
    ``hepaseg predict`` (lesion table and confidence columns, volume metrics, mask NIfTI, CSV/JSON,
    overlay), and its own ``timings`` give the step and its parts.
    """
    from unittest import mock

    import numpy as np

    from hepaseg.data.phantom import write_phantom_dataset
    from hepaseg.inference import pipeline

    source = write_phantom_dataset(work / "write_src", "lits", n_cases=1, shape=shape, spacing=IRCADB_SPACING)[0]
    rng = np.random.default_rng(0)
    probability = rng.random(shape, dtype=np.float32)
    tumor = (probability < SPECKLE_FRACTION).astype(np.uint8)
    probability = np.where(tumor > 0, 1.0 - probability, probability * 0.5).astype(np.float32)  # > 0.5 on tumour
    found = pipeline._Found(tumor=tumor, postprocess_info={}, probability=probability, uncertainty=None, votes=None)
    ckpt = write_untrained_checkpoint(work / "write_unet.ckpt", model="unet", width=4, data_options={"size": 64})
    models = pipeline.load_models(ckpt)
    # Only the network's answer is replaced: reading, the lesion rows, metrics and every file are predict's own.
    with mock.patch.object(pipeline, "_predict_tumour", return_value=found):
        result = pipeline.predict_case(source, work / "write", models=models, progress=False)
    t = result.timings
    parts = {key: t[f"write_{key}"] for key in ("lesions", "metrics", "volumes", "tables", "overlay")}
    return {"shape": list(shape), "mask": "i.i.d. speckle", "tumor_voxels": int(np.count_nonzero(tumor)),
            "lesions": len(result.lesions), "seconds": t["write"], "parts": parts}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


# --- entry point ----------------------------------------------------------------------------------


def run_benchmark(
    models: Sequence[str] | None = None,
    *,
    width: int = 64,
    size: int = 224,
    batch: int = 8,
    repeats: int = 5,
    quick: bool = False,
    device: str | torch.device | None = None,
    attention: tuple[int, int, int] = (56, 256, 4),
    prepare_shape: tuple[int, int, int] | None = None,
    predict_shape: tuple[int, int, int] | None = None,
    predict_width: int = 32,
    ratio_widths: Sequence[int] = (),
    clock: str = "wall",
    threads: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure the networks and the pipeline on this machine (see the module docstring).

    Args:
        models: registry names (default: every registered network).
        width: ``base_width`` of the networks (default 64, the paper's U-Net).
        size: slice size in pixels (default 224, the paper's).
        batch: slices per forward pass for throughput and memory (default 8).
        repeats: timed runs per measurement; the median is reported (default 5).
        quick: fewer repeats (at most 2, one warm-up) and a ``16 x 512 x 512`` phantom for
            prepare and predict instead of a 3D-IRCADb-sized volume.
        device: ``"cpu"``, ``"cuda"``...; default CUDA when available.
        attention: ``(spatial, channels, batch)`` of the SDPA-vs-naive comparison
            (default ``(56, 256, 4)``: ``N = 3136`` positions).
        prepare_shape: ``(z, y, x)`` of the prepare phantom (default ``(64, 512, 512)``;
            quick: ``(16, 512, 512)``).
        predict_shape: ``(z, y, x)`` of a phantom to predict; default 3D-IRCADb 1.1 itself when
            found, else a ``129 x 512 x 512`` phantom (quick: ``16 x 512 x 512``).
        predict_width: ``base_width`` of the untrained MFCNet used for predict (default 32).
        ratio_widths: further widths at which only mfcnet and unet are timed (every pass,
            interleaved) for their ratios (default none; e.g. ``(32, 64)``).
        clock: ``"wall"`` (default) or ``"cpu"`` (this process's CPU time; see :data:`CLOCKS`).
        threads: torch threads for the run (default: torch's own choice).
        log: called with a short line before each part (progress for long runs).

    Returns:
        A JSON-ready dict: ``machine``, ``settings``, ``models`` (one row each),
        ``ratios`` (``mfcnet_over_unet`` or None, ``by_width``), ``attention``, ``prepare``,
        ``prepare_workers``, ``predict``, ``write``.

    Raises:
        HepasegError: an unknown model name or a non-positive setting.
    """
    _check_settings(width=width, size=size, batch=batch, repeats=repeats, predict_width=predict_width,
                    ratio_widths=ratio_widths, threads=threads, clock=clock)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        names = _model_names(models)
        say = log or (lambda _line: None)
        default_device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device) if device is not None else torch.device(default_device)
        warmup = 1 if quick else 2
        if quick:
            repeats = min(repeats, 2)
        prepare_shape = prepare_shape or (QUICK_VOLUME_SHAPE if quick else (64, 512, 512))
        if predict_shape is None and quick:
            predict_shape = QUICK_VOLUME_SHAPE

        result: dict[str, Any] = {
            "machine": machine_info(dev),
            "settings": {
                "models": names, "width": width, "size": size, "batch": batch, "repeats": repeats, "warmup": warmup,
                "quick": quick, "clock": clock, "ratio_widths": list(ratio_widths),
                "timing": "median of repeats after warm-up, each pass interleaved over the networks",
                "memory_method": MEMORY_METHOD["cuda" if dev.type == "cuda" else "cpu"],
                "flops": "torch.utils.flop_counter.FlopCounterMode, batch 1, 2 x MACs of convs and matmuls",
            },
        }
        say(f"models {', '.join(names)} (width {width}, {size} x {size}, batch {batch}; inference and training step)")
        rows = _bench_models(names, width=width, size=size, batch=batch, repeats=repeats, warmup=warmup, device=dev,
                             clock=clock)
        result["models"] = rows
        result["ratios"] = _mfcnet_over_unet(rows)
        result["ratios"]["by_width"] = _ratios_by_width(ratio_widths, size=size, batch=batch, repeats=repeats,
                                                        warmup=warmup, device=dev, clock=clock, say=say)

        spatial, channels, att_batch = attention
        say(f"spatial context: chunked vs sdpa vs naive at {spatial} x {spatial} x {channels}, batch {att_batch}")
        result["attention"] = _bench_attention(spatial, channels, att_batch, repeats=repeats, warmup=warmup,
                                               device=dev, clock=clock)
        result.update(_bench_pipeline(prepare_shape, predict_shape, size=size, batch=batch,
                                      predict_width=predict_width, device=dev, say=say))
        return result
    finally:
        torch.set_num_threads(previous_threads)  # a library call leaves the process as it found it


def _check_settings(*, width: int, size: int, batch: int, repeats: int, predict_width: int,
                    ratio_widths: Sequence[int], threads: int | None, clock: str) -> None:
    """One-line errors for a non-positive setting or an unknown clock, before any work."""
    checks = [("--width", width), ("--size", size), ("--batch", batch), ("--repeats", repeats),
              ("predict_width", predict_width), *(("--ratio-widths", w) for w in ratio_widths)]
    if threads is not None:
        checks.append(("--threads", threads))
    for name, value in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HepasegError(f"{name}: expected a positive integer, got {value!r}")
    if clock not in CLOCKS:
        raise HepasegError(f"--clock: expected {' or '.join(CLOCKS)}, got {clock!r}")


def _model_names(models: Sequence[str] | None) -> list[str]:
    """The registry names to measure (default every registered one); an unknown name lists the valid ones."""
    from hepaseg.models import list_models, model_info

    names = list(list_models()) if models is None else [str(m) for m in models]
    if not names:
        raise HepasegError("--models: expected at least one model name (or all), got none")
    for name in names:
        model_info(name)  # unknown names raise listing the valid ones
    return names


def _mfcnet_over_unet(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``result["ratios"]`` (before ``by_width``): mfcnet's row over unet's, or a note when one is missing."""
    by_name = {row["name"]: row for row in rows}
    if "mfcnet" not in by_name or "unet" not in by_name:
        return {"mfcnet_over_unet": None, "note": "needs both mfcnet and unet in --models"}
    m, u = by_name["mfcnet"], by_name["unet"]
    return {"mfcnet_over_unet": {
        "params": m["params"] / u["params"],
        "gflops": m["gflops"] / u["gflops"],
        **_ratio_row(m, u),
        "peak_memory": _ratio(m["peak_memory_mb"], u["peak_memory_mb"]),
    }}


def _ratios_by_width(ratio_widths: Sequence[int], *, size: int, batch: int, repeats: int, warmup: int,
                     device: torch.device, clock: str, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """mfcnet and unet timed (interleaved) at each further width, with their ratios."""
    by_width = []
    for w in ratio_widths:
        say(f"mfcnet and unet at width {w} ({size} x {size}, batch {batch}; inference and training step)")
        times = _time_networks(("unet", "mfcnet"), width=w, size=size, batch=batch, repeats=repeats, warmup=warmup,
                               device=device, clock=clock)
        by_width.append({"width": w, "unet": times["unet"], "mfcnet": times["mfcnet"],
                         "mfcnet_over_unet": _ratio_row(times["mfcnet"], times["unet"])})
    return by_width


def _bench_pipeline(prepare_shape: Sequence[int], predict_shape: Sequence[int] | None, *, size: int, batch: int,
                    predict_width: int, device: torch.device, say: Callable[[str], None]) -> dict[str, Any]:
    """``prepare``, ``prepare_workers``, ``predict`` and ``write`` of the result, in a scratch folder removed after."""
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hepaseg-benchmark-") as tmp:
        work = Path(tmp)
        say(f"prepare: phantom {prepare_shape[0]} x {prepare_shape[1]} x {prepare_shape[2]} at {size}")
        result["prepare"] = _bench_prepare(tuple(prepare_shape), size, work)
        multi_shape = tuple(prepare_shape)
        say(f"prepare: {PREPARE_CASES} phantoms {' x '.join(map(str, multi_shape))} with 1 and 2 workers")
        result["prepare_workers"] = _bench_prepare_workers(PREPARE_CASES, multi_shape, size, work)
        volume = "3D-IRCADb-sized volume" if predict_shape is None else f"phantom {predict_shape}"
        say(f"predict: untrained width-{predict_width} mfcnet, {volume}")
        result["predict"] = _bench_predict(
            None if predict_shape is None else tuple(predict_shape), size=size, batch=batch, width=predict_width,
            device=device, work=work,
        )
        write_shape = tuple(predict_shape) if predict_shape is not None else IRCADB_SHAPE
        say(f"write step: speckled mask on a phantom {write_shape}")
        result["write"] = _bench_write(write_shape, work)
    return result


# --- tables ---------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def benchmark_tables(result: dict[str, Any]) -> list:
    """Rich tables of a :func:`run_benchmark` result: machine, models, ratios, attention, pipeline."""
    from rich.table import Table

    machine = Table(title="machine", show_header=False)
    for key, value in result["machine"].items():
        machine.add_row(key, str(value))
    s = result["settings"]
    machine.add_row("settings", f"width {s['width']}, {s['size']} x {s['size']}, batch {s['batch']}, "
                                f"median of {s['repeats']} after {s['warmup']} warm-up")
    machine.add_row("memory", s["memory_method"])

    clock = "CPU" if s.get("clock") == "cpu" else "wall"
    models = Table(title=f"networks (width {s['width']}, {s['size']} x {s['size']}; {clock} ms per slice at batch "
                         f"{s['batch']}; train = forward + backward)")
    for col in ("model", "params (M)", "GFLOPs/slice", "fp32 ms", "bf16+CL ms", "bf16 speed-up", "train fp32 ms",
                "train bf16+CL ms", "peak MB (fp32)"):
        models.add_column(col, justify="left" if col == "model" else "right")
    for row in result["models"]:
        models.add_row(
            row["name"], _fmt(row["params"] / 1e6), _fmt(row["gflops"]), _fmt(row["fp32_ms_per_slice"], 1),
            _fmt(row["bf16_ms_per_slice"], 1), _fmt(row["bf16_speedup"]) + "x",
            _fmt(row["train_fp32_ms_per_slice"], 1), _fmt(row["train_bf16_ms_per_slice"], 1),
            _fmt(row["peak_memory_mb"], 1),
        )
    notes = sorted({row["bf16_note"] for row in result["models"]})
    models.caption = "bf16: " + "; ".join(notes)

    tables = [machine, models]
    ratios = result["ratios"]["mfcnet_over_unet"]
    passes = ("fp32_time", "bf16_time", "train_fp32_time", "train_bf16_time")
    headers = ("fp32", "bf16+CL", "train fp32", "train bf16+CL")
    if ratios is not None:
        t = Table(title=f"mfcnet / unet (width {s['width']})")
        for col in ("params", "GFLOPs", *headers, "peak memory"):
            t.add_column(col, justify="right")
        t.add_row(*(_fmt(ratios[k], 3) + "x" for k in ("params", "gflops", *passes, "peak_memory")))
        tables.append(t)
    if result["ratios"].get("by_width"):
        t = Table(title=f"mfcnet / unet by width ({clock} time, each pass interleaved)")
        t.add_column("width", justify="right")
        for col in headers:
            t.add_column(col, justify="right")
        for entry in result["ratios"]["by_width"]:
            t.add_row(str(entry["width"]), *(_fmt(entry["mfcnet_over_unet"][k], 3) + "x" for k in passes))
        tables.append(t)

    a = result["attention"]
    b, c, h, w = a["input_shape"]
    att = Table(title=f"spatial context extractor {h} x {w} x {c}, batch {b}",
                caption=f"{a['pass']}; the naive N x N matrix alone: {a['naive_matrix_mb']:.1f} MB")
    for col in ("implementation", "fp32 ms", "peak MB (fp32)", "bf16+CL ms"):
        att.add_column(col, justify="left" if col == "implementation" else "right")
    for impl in ATTENTION_IMPLS:
        att.add_row(impl, _fmt(a[impl]["ms"], 1), _fmt(a[impl]["peak_memory_mb"], 1),
                    _fmt(a[impl].get("bf16_ms"), 1))
    for impl in ("naive", "chunked"):
        r = a[f"{impl}_over_sdpa"]
        bf16 = _ratio(a[impl].get("bf16_ms"), a["sdpa"].get("bf16_ms"))
        att.add_row(f"{impl} / sdpa", _fmt(r["time"]) + "x", _fmt(r["memory"]) + "x",
                    "-" if bf16 is None else _fmt(bf16) + "x")
    tables.append(att)

    p, q = result["prepare"], result["predict"]
    pipe = Table(title="pipeline")
    for col in ("step", "input", "seconds", "throughput"):
        pipe.add_column(col, justify="left" if col in ("step", "input") else "right")
    pipe.add_row("prepare", f"{p['source']} {' x '.join(map(str, p['shape']))} -> {p['size']}",
                 _fmt(p["seconds"]), f"{p['slices_per_s']:.1f} slices/s")
    m = result.get("prepare_workers")
    if m is not None:
        for n, run in ((1, m["one"]), (m["workers"], m["many"])):
            rss = ", ".join(f"{mb:,.0f}" for mb in run["peak_rss_mb_per_worker"])
            pipe.add_row(f"prepare --workers {n}",
                         f"{m['cases']} x {' x '.join(map(str, m['shape']))} -> {m['size']} ({m['cores']} cores)",
                         _fmt(run["seconds"]), f"{run['slices_per_s']:.1f} slices/s (peak MB per worker: {rss})")
        pipe.add_row(f"  {m['workers']} workers / 1", "identical output" if m["identical_output"] else
                     "OUTPUT DIFFERS", "", f"{m['speedup']:.2f}x")
    t = q["timings"]
    pipe.add_row(
        "predict (end to end)",
        f"{q['kind']} {' x '.join(map(str, q['shape']))}, {q['model']} width {q['width']}",
        _fmt(q["seconds"]),
        f"{q['inference_slices_per_s']:.1f} slices/s (read {t['read']:.1f} s, inference {t['inference']:.1f} s, "
        f"write {t['write']:.1f} s)",
    )
    w = result.get("write")
    if w is not None:
        parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in w["parts"].items())
        pipe.add_row("predict write step", f"{w['mask']} of {w['tumor_voxels']:,} voxels on "
                     f"{' x '.join(map(str, w['shape']))} ({w['lesions']:,} lesions)", _fmt(w["seconds"]), parts)
    tables.append(pipe)
    return tables
