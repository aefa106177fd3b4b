"""Reading a scene from an S3-compatible store against reading it from local disk.

Starts a moto S3 server in a process of its own on the loopback interface, uploads the same
synthetic scene there, and runs ``predict_scene`` on the local file and on its ``s3://`` URL
side by side in one process, and on an ``http://`` URL of a plain range-request server (a
process of its own, ``tests/http_support.py``), with the model that takes no time
(``bench_phases.py``), so that reading is as large a share of the time as it can be. Prints
the throughputs and their ratios to local disk (the goal: ≥ 0.8). moto copies the whole
object for every range request (its ``FakeKey.value``), so its figure is moto's bound.

    python benchmarks/bench_remote.py [--size 8192] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

from _common import ROOT, machine, scene_args
from bench_phases import install_null_model
from bench_predict import OUT, bundle, scene


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    args = scene_args(__doc__)

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    os.environ.update({**env, "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    http_port = free_port()
    http = subprocess.Popen(
        [sys.executable, "-m", "tests.http_support", str(OUT), str(http_port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.environ["GEOSEG_BENCH_HTTP"] = f"http://127.0.0.1:{http_port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/bench", method="PUT")).close()
        run(args)
    finally:
        for proc in (server, http):
            proc.terminate()
            proc.wait()


def run(args: argparse.Namespace) -> None:
    import obstore

    from geoseg.engine.cluster import open_client
    from geoseg.engine.options import PredictOptions
    from geoseg.engine.scene import predict_scene
    from geoseg.io.raster import open_scene
    from geoseg.io.remote import _store
    from geoseg.models.bundle import load_bundle

    path = scene(args.size)
    store, _ = _store("s3://bench/")
    t = time.perf_counter()
    obstore.put(store, path.name, path)
    upload_s = time.perf_counter() - t
    model = load_bundle(bundle("resnet18", 512, 64))
    workers = install_null_model(len(model.spec.classes))
    sources = {
        "local disk": str(path),
        "HTTP (loopback)": f"{os.environ['GEOSEG_BENCH_HTTP']}/{path.name}",
        "S3 (loopback moto)": f"s3://bench/{path.name}",
    }
    mp = 0.0
    best: dict[str, float] = {}
    print(f"machine: {machine()}")
    size_mib = path.stat().st_size / 2**20
    print(f"scene {path.name}: {size_mib:.0f} MiB, uploaded in {upload_s:.1f} s")
    with open_client(PredictOptions(workers=workers)) as client:
        for _ in range(args.repeat):
            for name, src in sources.items():
                sc = open_scene(src)
                mp = sc.width * sc.height / 1e6
                out = OUT / "remote" / name.split()[0].lower()
                shutil.rmtree(out, ignore_errors=True)
                opts = PredictOptions(workers=workers, chunk=args.chunk, halo=64)
                t = time.perf_counter()
                predict_scene(sc, model, out, opts, client)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    for name, secs in best.items():
        print(f"{name:<20} {secs:>7.2f} s {mp / secs:>7.1f} MP/s")
    for name in list(sources)[1:]:
        print(f"{name} / local disk throughput: {best['local disk'] / best[name]:.2f}")


if __name__ == "__main__":
    main()
