"""smp is imported without torch._dynamo, and nothing that needs torch._dynamo loses it.

Every case runs in a fresh interpreter: the import happens once per process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run(code: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return out.stdout.split()


def test_model_loads_and_runs_without_dynamo(tmp_path) -> None:
    out = run(
        f"""
        import sys
        from geoseg.models.bundle import ModelSpec, build_module, load_bundle, load_module
        from geoseg.models.bundle import save_bundle
        import torch
        spec = ModelSpec(classes=["background", "building"])
        save_bundle(spec, build_module(spec).state_dict(), {str(tmp_path / "m")!r})
        module = load_module(load_bundle({str(tmp_path / "m")!r})).eval()
        with torch.inference_mode():
            y = module(torch.rand(1, 3, 64, 64))
        print(tuple(y.shape) == (1, 2, 64, 64), "torch._dynamo" in sys.modules)
        print(type(torch._dynamo).__name__, callable(torch._dynamo.disable))
        print("torch._dynamo" in sys.modules, sys.modules["torch._dynamo"] is torch._dynamo)
        """
    )
    assert out == ["True", "False", "module", "True", "True", "True"]


def test_deferred_names_reach_the_real_functions() -> None:
    out = run(
        """
        import sys, torch
        from geoseg.models import _smp
        with _smp._dynamo_deferred():
            def twice(v):
                return v * 2
            g = torch.compiler.disable(twice)
        print("torch._dynamo.eval_frame" in sys.modules, g.__name__)
        smp = _smp.import_smp()
        from torchvision.ops import roi_align  # its is_compile_supported came from a stand-in
        print("torch._dynamo.eval_frame" in sys.modules)
        boxes = torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]])
        x = torch.arange(16.0).reshape(1, 1, 4, 4)
        print(tuple(roi_align(x, boxes, 2, aligned=True).shape) == (1, 1, 2, 2))
        print(g(torch.ones(1)).item(), "torch._dynamo.eval_frame" in sys.modules)
        """
    )
    assert out == ["False", "twice", "False", "True", "2.0", "True"]


def test_stand_ins_fall_back_to_the_real_package() -> None:
    out = run(
        """
        import sys, importlib, torch
        from geoseg.models import _smp
        with _smp._dynamo_deferred():
            stand_in = sys.modules["torch._dynamo"]
            print(type(stand_in).__name__)
            cfg = stand_in.config                     # a name the stand-in does not set
            print(cfg.__name__, type(sys.modules["torch._dynamo"]).__name__)
        with _smp._dynamo_deferred():
            print(type(sys.modules.get("torch._dynamo")).__name__)  # real already: no stand-in
        print(type(torch._dynamo).__name__, torch._dynamo.config is cfg)
        """
    )
    assert out == ["_StandIn", "torch._dynamo.config", "module", "module", "module", "True"]


def test_other_submodule_import_under_stand_ins_gets_the_real_one() -> None:
    out = run(
        """
        import sys, torch
        from geoseg.models import _smp
        with _smp._dynamo_deferred():
            import torch._dynamo.eval_frame as ef
            real = sys.modules["torch._dynamo"]
        print(type(real).__name__, ef.__name__, ef.__spec__.name)
        print(ef.__file__.endswith("eval_frame.py"))
        print(sys.modules["torch._dynamo.eval_frame"] is ef, torch._dynamo is real)
        """
    )
    name = "torch._dynamo.eval_frame"
    assert out == ["module", name, name, "True", "True", "True"]
