"""EfficientNet-Lite0, Lite1 and Lite2 encoders side by side in the same U-Net.

For each encoder: parameters (whole U-Net and encoder alone), the size of its weights stored
as float16 (the bundle's ``weights.safetensors``), and the bare forward time of one tile
(batch 1) on the CPU, in bf16 autocast with channels_last where the CPU has native bf16.
The models run interleaved, one forward each per round, so that load from other processes
hits all of them alike; ratios to the first encoder are taken within each round, and their
median over the rounds is reported. CPU time (all threads of this process) is reported beside
wall time: on a loaded machine, it leaves out the time the process waited for a core.

    python benchmarks/bench_encoders.py --size 1024 --rounds 9
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import machine

from geoseg.models.bundle import ModelSpec, build_module, save_bundle
from geoseg.models.predictor import cpu_supports_bf16

ENCODERS = [f"tu-tf_efficientnet_lite{n}" for n in range(3)]


def spec_for(encoder: str) -> ModelSpec:
    """The U-Net measured: decoder [128, 64, 32, 16, 16], 4 classes, RGB."""
    return ModelSpec(
        encoder=encoder,
        decoder_channels=[128, 64, 32, 16, 16],
        classes=["background", "building", "road", "water"],
    )


def fp16_bytes(spec: ModelSpec, module: torch.nn.Module) -> int:
    """Size in bytes of the module's weights file written as float16."""
    with tempfile.TemporaryDirectory() as tmp:
        save_bundle(spec, module.state_dict(), Path(tmp) / "m", dtype=torch.float16)
        return (Path(tmp) / "m" / "weights.safetensors").stat().st_size


def forward_s(module: torch.nn.Module, x: torch.Tensor, bf16: bool) -> tuple[float, float]:
    """Wall and CPU seconds (all threads of this process) of one forward pass of ``x``."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode(), autocast:
        module(x)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoders", nargs="+", default=ENCODERS)
    ap.add_argument("--size", type=int, default=1024, help="tile side, pixels")
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds (after one warm-up)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bf16 = not args.fp32 and cpu_supports_bf16()
    print(f"{machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"U-Net decoder [128, 64, 32, 16, 16], 4 classes, batch 1, {args.size}² px, "
        f"{'bf16 autocast' if bf16 else 'fp32'}, channels_last, median of {args.rounds} rounds"
    )
    torch.manual_seed(0)
    modules, sizes = {}, {}
    for name in args.encoders:
        spec = spec_for(name)
        module = build_module(spec).eval().to(memory_format=torch.channels_last)
        modules[name] = module
        sizes[name] = fp16_bytes(spec, module)
    x = torch.rand(1, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    walls: dict[str, list[float]] = {name: [] for name in modules}
    cpus: dict[str, list[float]] = {name: [] for name in modules}
    for module in modules.values():
        forward_s(module, x, bf16)  # warm-up: oneDNN picks and caches its kernels
    for _ in range(args.rounds):
        for name, module in modules.items():
            wall, cpu = forward_s(module, x, bf16)
            walls[name].append(wall)
            cpus[name].append(cpu)
    base = args.encoders[0]
    print(
        f"{'encoder':28s} {'params':>10s} {'encoder':>10s} {'fp16 MB':>8s} {'wall s':>7s} "
        f"{'min s':>6s} {'cpu s':>6s} {'params×':>8s} {'wall×':>6s} {'cpu×':>6s}"
    )
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    for name, module in modules.items():
        enc = sum(p.numel() for p in module.encoder.parameters())  # type: ignore[union-attr]
        # ratios per round (both models ran back to back, under the same load), then the median
        wall_x = statistics.median(a / b for a, b in zip(walls[name], walls[base], strict=True))
        cpu_x = statistics.median(a / b for a, b in zip(cpus[name], cpus[base], strict=True))
        print(
            f"{name:28s} {params[name]:>10,d} {enc:>10,d} {sizes[name] / 1e6:>8.1f} "
            f"{statistics.median(walls[name]):>7.3f} {min(walls[name]):>6.3f} "
            f"{statistics.median(cpus[name]):>6.3f} {params[name] / params[base]:>8.2f} "
            f"{wall_x:>6.2f} {cpu_x:>6.2f}"
        )
    print(
        f"wall s: median of the rounds; min s: fastest round; cpu s: median CPU time; "
        f"ratios to {base}: median over rounds of the same round's ratio"
    )


if __name__ == "__main__":
    main()
