"""End-to-end ``geoseg predict`` against the model's own forward time, memory, and the usual way.

Every number comes from a fresh subprocess, measured side by side in one run:

* ``e2e``: ``geoseg predict`` on a synthetic scene (read, normalize, forward, trim, write COGs).
* ``bare``: only the model's forward passes over the same padded chunks (read and normalized
  untimed), same threads, precision and allocator settings, model loaded and warmed up, run
  as geoseg runs them (one pass at a time; with ``--workers 2`` on a CPU two passes side by
  side, torch's threads shared between them); run before and after ``e2e`` and averaged,
  since this machine's speed drifts. ``--other`` also times the other way. On a CPU each pass
  is the predictor's call (forward and softmax); on a GPU it is the module alone on an input
  already on the device, synchronized. The ratio e2e / bare shows the pipeline's overhead
  over the model itself.
* ``batch``: ``geoseg run`` over a pipeline of ``--scenes`` copies of the scene (one process,
  one model, one cluster); its summary's marginal seconds per scene against one scene's bare
  forward time: the share of a batch's time that the model gets.
* ``naive``: the common approach: read the whole scene, loop over tiles with the same halo,
  accumulate float32 probabilities for the whole scene, argmax, write one GeoTIFF.

Usage::

    python benchmarks/bench_predict.py throughput --size 8192
    python benchmarks/bench_predict.py throughput --size 16384 --base-size 8192 --device cuda
    python benchmarks/bench_predict.py memory --sizes 4096 8192 16384
    python benchmarks/bench_predict.py naive --size 4096
    python benchmarks/bench_predict.py batch --size 16384 --scenes 4 --encoder resnet34 \
        --chunk 2048 --halo 64 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, run_measured

OUT = ROOT / "bench_out"
PY = sys.executable


def scene(size: int) -> Path:
    """A cached synthetic RGB scene of size² pixels."""
    path = OUT / f"scene_{size}.tif"
    if not path.exists():
        OUT.mkdir(exist_ok=True)
        subprocess.run([PY, "-m", "geoseg.synthetic", str(path), "--size", str(size)], check=True)
    return path


def bundle(encoder: str, chunk: int, halo: int) -> Path:
    path = OUT / f"model_{encoder}_{chunk}_{halo}"
    if not path.exists():
        subprocess.run(
            [
                PY,
                "-m",
                "geoseg",
                "-q",
                "model",
                "init",
                str(path),
                "--encoder",
                encoder,
                "--chunk",
                str(chunk),
                "--halo",
                str(halo),
            ],
            check=True,
        )
    return path


def e2e(scene_path: Path, model: Path, args: argparse.Namespace) -> tuple[float, float]:
    out = OUT / f"pred_{scene_path.stem}"
    cmd = [
        PY,
        "-m",
        "geoseg",
        "-q",
        "predict",
        str(scene_path),
        "-m",
        str(model),
        "-o",
        str(out),
        "--device",
        args.device,
        "--precision",
        args.precision,
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    return run_measured(cmd)


BARE = r"""
import json, sys, time
if sys.argv[6] == "1":  # the allocator settings the geoseg command line applies
    from geoseg.runtime import tune_allocator; tune_allocator()
import numpy as np, torch
from geoseg.engine.grid import ChunkGrid
from geoseg.models.bundle import load_bundle, load_module
from geoseg.predict import PredictOptions, TorchPredictor, resolve_device, resolve_precision
from geoseg.predict import torch_threads
from geoseg.io.raster import open_scene
from geoseg.io.reader import read_padded
model, scene_path, device, precision = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
threads, side = int(sys.argv[5]), int(sys.argv[7])
b = load_bundle(model); s = b.spec
device = resolve_device(device)
n = torch_threads(PredictOptions(device=device, threads=threads or None, workers=side), device)
if n: torch.set_num_threads(n)  # as geoseg predict sets them for its workers
pred = TorchPredictor(load_module(b), device, resolve_precision(precision, device))
scene = open_scene(scene_path)
grid = ChunkGrid(scene.width, scene.height, s.chunk, s.halo, multiple=s.stride)
shapes = {(int(c.padded.height), int(c.padded.width)) for c in grid}
cuda = device.startswith("cuda")
def forward(x):
    if not cuda:  # on a CPU: the predictor as geoseg calls it (forward and softmax)
        pred(x)
        return 0.0
    # on a GPU: the module alone on an input already on the device, as fast as it can run
    xt = torch.from_numpy(x).to(device).contiguous(memory_format=torch.channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(pred.precision, torch.float32)
    amp = dtype != torch.float32
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=amp):
        pred.module(xt)
    torch.cuda.synchronize()
    return time.perf_counter() - t
rng = np.random.default_rng(0)
for hw in shapes:  # warm-up, excluded like a loaded worker's
    for _ in range(3 if cuda else 1):
        forward(rng.standard_normal((1, len(s.bands), *hw)).astype(np.float32))
seconds, pixels = 0.0, 0
if side > 1:  # passes side by side on `side` threads, chunks read and normalized first (untimed)
    import queue, threading
    ready = queue.SimpleQueue()
    for c in grid:
        ready.put(s.normalization.apply(*read_padded(scene, c.padded, s.bands))[None])
        pixels += int(c.padded.height) * int(c.padded.width)
    start = threading.Barrier(side + 1)
    def work():
        for hw in shapes:  # each thread warmed up too
            forward(rng.standard_normal((1, len(s.bands), *hw)).astype(np.float32))
        start.wait()
        while True:
            try: x = ready.get_nowait()
            except queue.Empty: return
            forward(x)
    workers = [threading.Thread(target=work) for _ in range(side)]
    for w in workers: w.start()
    start.wait()
    t = time.perf_counter()
    for w in workers: w.join()
    seconds = time.perf_counter() - t
else:
    for c in grid:  # the same pixels as geoseg predict; only the forward passes are timed
        x = s.normalization.apply(*read_padded(scene, c.padded, s.bands))[None]
        t = time.perf_counter()
        gpu_seconds = forward(x)
        seconds += gpu_seconds or time.perf_counter() - t
        pixels += x.shape[-1] * x.shape[-2]
print(json.dumps({"seconds": seconds, "pixels": pixels}))
"""


def bare(
    model: Path, scene_path: Path, args: argparse.Namespace, tuned: bool = True, side: int = 1
) -> dict[str, float]:
    out = subprocess.run(
        [
            PY,
            "-c",
            BARE,
            str(model),
            str(scene_path),
            args.device,
            args.precision,
            str(args.threads or 0),
            "1" if tuned else "0",
            str(side),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


NAIVE = r"""
import sys
from geoseg.runtime import tune_allocator; tune_allocator()  # as the geoseg command line does
import time, numpy as np, rasterio
from geoseg.models.bundle import load_bundle, load_module
from geoseg.predict import TorchPredictor, resolve_device, resolve_precision
model, path, out, device, precision, threads = sys.argv[1:7]
if int(threads): __import__("torch").set_num_threads(int(threads))
b = load_bundle(model); s = b.spec
device = resolve_device(device)
pred = TorchPredictor(load_module(b), device, resolve_precision(precision, device))
with rasterio.open(path) as src:
    img = src.read(s.bands); profile = src.profile           # whole scene in RAM
x = s.normalization.apply(img)                               # whole scene as float32
h, w = img.shape[1:]; tile, halo = s.chunk, s.halo
acc = np.zeros((len(s.classes), h, w), np.float32)            # full-scene accumulator
xp = np.pad(x, ((0, 0), (halo, halo + tile), (halo, halo + tile)), mode="reflect")
for r in range(0, h, tile):
    for c in range(0, w, tile):
        p = pred(xp[None, :, r:r + tile + 2 * halo, c:c + tile + 2 * halo])[0]
        th, tw = min(tile, h - r), min(tile, w - c)
        acc[:, r:r + th, c:c + tw] = p[:, halo:halo + th, halo:halo + tw]
mask = acc.argmax(0).astype(np.uint8)
profile.update(count=1, dtype="uint8", compress="deflate", tiled=True,
               photometric="minisblack")
with rasterio.open(out, "w", **profile) as dst:
    dst.write(mask, 1)
"""


BATCH_JOB = """schema_version: 1
name: bench-batch
description: {n} copies of one synthetic scene, for the marginal cost per scene.
inputs:
  paths: {paths}
model: {model}
predict:
  device: {device}
  precision: {precision}
  chunk: {chunk}
  halo: {halo}
outputs:
  dir: out
  rasters: [probs, mask]
  vectors: {vectors}
  quicklook: false
"""


def cmd_batch(args: argparse.Namespace) -> None:
    from geoseg.runtime import cpu_cores

    model = bundle(args.encoder, args.chunk, args.halo)
    path = scene(args.size)
    work = OUT / f"batch_{args.size}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    paths = []
    for i in range(args.scenes):  # links: distinct scenes to the ledger, no copies on disk
        link = work / f"scene_{i}.tif"
        try:
            os.link(path, link)
        except OSError:
            shutil.copyfile(path, link)
        paths.append(str(link))
    job = work / "job.yml"
    job.write_text(
        BATCH_JOB.format(
            n=args.scenes,
            paths=json.dumps(paths),
            model=json.dumps(str(model)),
            device=args.device,
            precision=args.precision,
            chunk=args.chunk,
            halo=args.halo,
            vectors="true" if args.vectors else "false",
        )
    )
    b = bare(model, path, args)
    t = time.perf_counter()
    run = subprocess.run([PY, "-m", "geoseg", "run", str(job)], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if run.returncode != 0:
        raise SystemExit(f"geoseg run failed ({run.returncode}):\n{run.stdout}\n{run.stderr}")
    b2 = bare(model, path, args)
    bare_s = (b["seconds"] + b2["seconds"]) / 2
    m = re.search(r"first scene done after ([\d.]+) s .*then ([\d.]+) s per scene", run.stdout)
    if m is None:
        raise SystemExit(f"no amortized summary in the output of geoseg run:\n{run.stdout}")
    first, each = float(m.group(1)), float(m.group(2))
    print(
        f"geoseg run, {args.scenes} scenes of {args.size}² px, {args.encoder}, chunk "
        f"{args.chunk} + halo {args.halo} px, device {args.device}, precision {args.precision}, "
        f"vectors {'on' if args.vectors else 'off'}, {cpu_cores()} cores"
    )
    print(f"  whole run          : {wall:8.1f} s (process start to exit)")
    print(f"  first scene        : {first:8.1f} s (start-up included)")
    print(f"  marginal per scene : {each:8.1f} s ({args.size**2 / each / 1e6:.2f} MP/s)")
    print(
        f"  bare forward       : {bare_s:8.1f} s per scene (runs before and after: "
        f"{b['seconds']:.1f}, {b2['seconds']:.1f})"
    )
    print(
        f"  marginal throughput: {100 * bare_s / each:8.1f} % of the bare forward pass's "
        "(target >= 85 %)"
    )


def passes_side_by_side(args: argparse.Namespace) -> int:
    """How many forward passes ``geoseg predict`` runs at once with these options: on a CPU its
    local worker threads (``--workers``, default 1), on a GPU one."""
    if args.device != "cpu":
        return 1
    return args.workers or 1


def cmd_throughput(args: argparse.Namespace) -> None:
    model = bundle(args.encoder, args.chunk, args.halo)
    path = scene(args.size)
    side = passes_side_by_side(args)
    # the bare forward as geoseg runs it (one pass at a time, or side by side with --workers),
    # before and after the end-to-end run, since this machine's speed drifts by 10-15 % within
    # minutes; with --repeat N, N end-to-end runs alternate with N + 1 bare runs, each e2e
    # compared with the mean of the bare runs on either side of it; the median ratio is shown
    bares = [bare(model, path, args, side=side)]
    runs = []
    for _ in range(args.repeat):
        t, r = e2e(path, model, args)
        bares.append(bare(model, path, args, side=side))
        runs.append((t, r, (bares[-2]["seconds"] + bares[-1]["seconds"]) / 2))
    t_e2e, rss, b_seconds = sorted(runs, key=lambda run: run[0] / run[2])[len(runs) // 2]
    b1, b2 = bares[0], bares[-1]
    b = {"seconds": b_seconds, "pixels": b1["pixels"]}
    b0 = bare(model, path, args, tuned=False, side=side) if args.untuned else None
    # the other way to run the model: one pass at a time with all threads, or side by side
    other = 1 if side > 1 else 2
    bo = bare(model, path, args, side=other) if args.other else None
    redundancy = b["pixels"] / args.size**2
    how = f"{side} passes side by side" if side > 1 else "one pass at a time"
    print(
        f"scene {args.size}² px, {args.encoder}, chunk {args.chunk} + halo {args.halo} px, "
        f"device {args.device}, precision {args.precision}, {how}"
    )
    print(
        f"  e2e geoseg predict : {t_e2e:8.1f} s  ({args.size**2 / t_e2e / 1e6:.2f} MP/s of scene, "
        f"peak RSS {rss:.0f} MiB)"
    )
    print(
        f"  bare forward       : {b['seconds']:8.1f} s  "
        f"({b['pixels'] / b['seconds'] / 1e6:.2f} MP/s of model input; {how}; mean of the "
        "runs before and after)"
    )
    if len(runs) > 1:
        print(
            "  runs (e2e / bare): "
            + ", ".join(f"{t:.1f} / {bb:.1f} = {t / bb:.3f}" for t, _, bb in runs)
            + "; bare runs "
            + ", ".join(f"{x['seconds']:.1f}" for x in bares)
            + " s; the median is shown"
        )
    else:
        print(f"  bare runs: {b1['seconds']:.1f} s before, {b2['seconds']:.1f} s after")
    print(
        f"  ratio e2e / bare   : {t_e2e / b['seconds']:8.3f}   (bare-forward share "
        f"{100 * b['seconds'] / t_e2e:.1f} %)"
    )
    if bo is not None:
        other_how = f"{other} passes side by side" if other > 1 else "one pass at a time"
        print(
            f"  bare, {other_how}: {bo['seconds']:8.1f} s  "
            f"(ratio e2e / that: {t_e2e / bo['seconds']:.3f})"
        )
    if b0 is not None:
        print(
            f"  bare, glibc malloc defaults: {b0['seconds']:8.1f} s  "
            f"(ratio e2e / that: {t_e2e / b0['seconds']:.3f})"
        )
    print(f"  redundant compute  : {redundancy:8.3f}   (model pixels per scene pixel)")
    if args.base_size:
        # fixed costs (start-up, loading the model) cancel out: what each extra pixel costs
        small = scene(args.base_size)
        s1 = bare(model, small, args, side=side)
        t_small, _ = e2e(small, model, args)
        s2 = bare(model, small, args, side=side)
        b_small = (s1["seconds"] + s2["seconds"]) / 2
        print(
            f"  at {args.base_size}² px: e2e {t_small:.1f} s, bare {b_small:.1f} s; marginal ratio "
            f"(e2e {args.size}² − e2e {args.base_size}²) / (bare − bare): "
            f"{(t_e2e - t_small) / (b['seconds'] - b_small):.3f}"
        )


def cmd_memory(args: argparse.Namespace) -> None:
    model = bundle(args.encoder, args.chunk, args.halo)
    peaks = {}
    for size in args.sizes:
        t, rss = e2e(scene(size), model, args)
        peaks[size] = rss
        print(
            f"  {size:6d}² px: peak RSS {rss:7.0f} MiB ({rss / 1024:.2f} GiB), {t:7.1f} s",
            flush=True,
        )
    sizes = sorted(peaks)
    for a, b in zip(sizes, sizes[1:], strict=False):
        print(f"  growth {a}² → {b}²: {peaks[b] / peaks[a]:.3f}x")


def cmd_naive(args: argparse.Namespace) -> None:
    model = bundle(args.encoder, args.chunk, args.halo)
    path = scene(args.size)
    t_g, rss_g = e2e(path, model, args)
    t_n, rss_n = run_measured(
        [
            PY,
            "-c",
            NAIVE,
            str(model),
            str(path),
            str(OUT / "naive_mask.tif"),
            args.device,
            args.precision,
            str(args.threads or 0),
        ]
    )
    print(f"scene {args.size}² px, {args.encoder}, tile {args.chunk} + halo {args.halo} px")
    print(f"  geoseg predict : {t_g:7.1f} s, peak RSS {rss_g:7.0f} MiB")
    print(f"  naive loop     : {t_n:7.1f} s, peak RSS {rss_n:7.0f} MiB")
    print(f"  ratio geoseg / naive: time {t_g / t_n:.3f}, RSS {rss_g / rss_n:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("throughput", "memory", "naive", "batch"):
        p = sub.add_parser(name)
        p.add_argument("--encoder", default="resnet18")
        p.add_argument("--chunk", type=int, default=512, help="Chunk core, px.")
        p.add_argument("--halo", type=int, default=64, help="Halo, px.")
        p.add_argument("--device", default="cpu")
        p.add_argument("--precision", default="auto")
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--workers", type=int, default=None, help="geoseg predict --workers.")
        if name == "throughput":
            p.add_argument(
                "--untuned",
                action="store_true",
                help="Also time the bare forward with glibc's default malloc settings.",
            )
            p.add_argument(
                "--repeat",
                type=int,
                default=1,
                help="End-to-end runs, each between two bare runs; the median ratio is shown.",
            )
            p.add_argument(
                "--other",
                action="store_true",
                help="Also time the bare forward run the other way: two passes side by side "
                "where geoseg runs one at a time, and the reverse.",
            )
            p.add_argument(
                "--base-size",
                type=int,
                default=None,
                help="Also run this smaller size and report the marginal ratio, without the "
                "fixed start-up costs.",
            )
        if name == "batch":
            p.add_argument("--scenes", type=int, default=4, help="Scenes in the batch.")
            p.add_argument("--vectors", action="store_true", help="Vectorize each scene too.")
        if name == "memory":
            p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
        else:
            p.add_argument("--size", type=int, default=8192 if name == "throughput" else 4096)
    args = parser.parse_args()
    os.environ.setdefault("GDAL_CACHEMAX", "64")
    t = time.perf_counter()
    commands = {
        "throughput": cmd_throughput,
        "memory": cmd_memory,
        "naive": cmd_naive,
        "batch": cmd_batch,
    }
    commands[args.cmd](args)
    print(f"(benchmark wall time {time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
