"""MFCNet / U-Net time ratios with the context blocks of an earlier revision next to today's.

Three networks are timed side by side in one process: U-Net, MFCNet whose context blocks are
those of ``--before`` (a git revision; its ``src/hepaseg/models/context.py`` is loaded as a
separate module), and today's MFCNet. Every pass (fp32 and bf16 + channels_last inference,
fp32 and bf16 + channels_last training step = forward + BCE + backward) is timed interleaved
(unet, before, after, unet, ...), median of ``--repeats`` after one warm-up. With
``--clock cpu`` (default) the time is this process's CPU time; run with one thread
(``OMP_NUM_THREADS=1``) so that it is what the work cost, whatever else runs on a shared machine.

    OMP_NUM_THREADS=1 python benchmarks/context_before_after.py --width 32
    OMP_NUM_THREADS=1 python benchmarks/context_before_after.py --width 64 --passes fp32,bf16

Prints one line per pass: ms per slice of each network and the ratios to U-Net.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hepaseg.models import build_model

REPO = Path(__file__).resolve().parents[1]
PASSES = {"fp32": (False, False), "bf16": (False, True), "train_fp32": (True, False), "train_bf16": (True, True)}


def load_context_module(revision: str, tmp: Path):
    """``hepaseg/models/context.py`` as it was at ``revision``, imported under another name."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:src/hepaseg/models/context.py"],
                            check=True, capture_output=True, text=True).stdout
    path = tmp / "context_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("context_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["context_before"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def build(name: str, width: int, before) -> torch.nn.Module:
    net = build_model("unet" if name == "unet" else "mfcnet", base_width=width)
    if name == "before":
        for stage in list(net.context):  # same places, the old block (its defaults)
            net.context[stage] = before.ContextAggregation(net.widths[int(stage) - 1])
    return net


def step_fn(net: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, train: bool, bf16: bool):
    memory_format = torch.channels_last if bf16 else torch.contiguous_format
    net = net.to(memory_format=memory_format).train(train)
    x = x.contiguous(memory_format=memory_format)

    def step() -> None:
        if not train:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                net(x)
            return
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = net(x)
        torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target).backward()
        net.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="8a9a5bd", help="git revision of the old context blocks")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--passes", default=",".join(PASSES), help=f"comma-separated, from {', '.join(PASSES)}")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        before = load_context_module(args.before, Path(tmp))
        torch.manual_seed(0)
        x = torch.rand(args.batch, 1, args.size, args.size)
        target = (torch.rand(args.batch, 1, args.size, args.size) > 0.9).float()
        names = ("unet", "before", "after")
        nets = {name: build(name, args.width, before) for name in names}
        print(f"width {args.width}, {args.size} px, batch {args.batch}, {torch.get_num_threads()} thread(s), "
              f"{args.clock} time, median of {args.repeats}; before = {args.before}")
        for key in args.passes.split(","):
            train, bf16 = PASSES[key]
            steps = {name: step_fn(net, x, target, train, bf16) for name, net in nets.items()}
            for step in steps.values():
                step()  # warm-up: oneDNN picks its kernels
            times: dict[str, list[float]] = {name: [] for name in names}
            for _ in range(args.repeats):
                for name, step in steps.items():
                    t0 = clock()
                    step()
                    times[name].append(clock() - t0)
            ms = {name: 1e3 * statistics.median(t) / args.batch for name, t in times.items()}
            print(f"{key:10s} unet {ms['unet']:7.1f} ms/slice | before {ms['before']:7.1f} "
                  f"({ms['before'] / ms['unet']:.3f}x) | after {ms['after']:7.1f} ({ms['after'] / ms['unet']:.3f}x)",
                  flush=True)


if __name__ == "__main__":
    main()
