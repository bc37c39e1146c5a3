"""The two ways ANLO reaches users outside this trainer, each checked in a fresh interpreter that sees only a
temporary folder and the environment's site-packages (for torch):

* ``library/hina_anlo.py`` copied alone into stock sd-scripts' ``library`` package (``--optimizer_type
  library.hina_anlo.ANLO``);
* the wheel that ``pyproject.toml`` builds: the top-level module ``hina_anlo`` and nothing else
  (``--optimizer_type hina_anlo.ANLO``), installed with ``pip install --no-deps --target``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from library.hina_anlo import ANLO

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "library" / "hina_anlo.py"

# Run with ``python -I`` (no PYTHONPATH, no user site, not the working directory): the folder is put first on
# sys.path, the optimizer is imported by its class path as sd-scripts does (importlib), and one step is taken.
STEP_SCRIPT = r"""
import importlib, importlib.util, json, sys
folder, class_path = sys.argv[1], sys.argv[2]
sys.path.insert(0, folder)
import torch
module_name, class_name = class_path.rsplit(".", 1)
module = importlib.import_module(module_name)
optimizer_class = getattr(module, class_name)
p = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 12).view(3, 4))
optimizer = optimizer_class([("unet_block.lora_down.weight", p)], lr=0.1)
p.grad = torch.linspace(0.5, -0.25, 12).view(3, 4)
optimizer.step()
print(json.dumps({
    "file": module.__file__,
    "weights": p.detach().view(-1).tolist(),
    "library": importlib.util.find_spec("library") is not None and module_name != "library.hina_anlo",
    "networks": importlib.util.find_spec("networks") is not None,
}))
"""


def _step_in_fresh_interpreter(folder: Path, class_path: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-I", "-c", STEP_SCRIPT, str(folder), class_path],
        capture_output=True, text=True, timeout=300, cwd=folder,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _expected_weights() -> list[float]:
    p = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 12).view(3, 4))
    optimizer = ANLO([("unet_block.lora_down.weight", p)], lr=0.1)
    p.grad = torch.linspace(0.5, -0.25, 12).view(3, 4)
    optimizer.step()
    return p.detach().view(-1).tolist()


@pytest.mark.slow
def test_the_file_copied_alone_into_stock_sd_scripts_library_works(tmp_path):
    library = tmp_path / "library"
    library.mkdir()
    (library / "__init__.py").write_text("")  # stock sd-scripts' library is a package
    shutil.copy(SOURCE, library / "hina_anlo.py")
    result = _step_in_fresh_interpreter(tmp_path, "library.hina_anlo.ANLO")
    assert Path(result["file"]).resolve() == (library / "hina_anlo.py").resolve()
    assert result["weights"] == _expected_weights()


@pytest.mark.slow
def test_the_wheel_installs_the_module_hina_anlo_and_no_trainer_package(tmp_path):
    source = tmp_path / "source"  # build from a copy of what the build reads, leaving the checkout untouched
    (source / "library").mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copy(SOURCE, source / "library")
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = subprocess.run(
        pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(source)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("hina_anlo-*.whl")
    installed = subprocess.run(
        pip + ["install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout + installed.stderr

    top_level = {path.name for path in target.iterdir() if path.name != "__pycache__"}
    assert top_level == {"hina_anlo.py", wheel.name.split("-py3")[0] + ".dist-info"}
    assert (target / "hina_anlo.py").read_bytes() == SOURCE.read_bytes()  # the same code as library.hina_anlo
    metadata = next(target.glob("*.dist-info")).joinpath("METADATA").read_text()
    assert [line for line in metadata.splitlines() if line.startswith("Requires-Dist")] == ["Requires-Dist: torch"]

    result = _step_in_fresh_interpreter(target, "hina_anlo.ANLO")
    assert Path(result["file"]).resolve() == (target / "hina_anlo.py").resolve()
    assert not result["library"] and not result["networks"]
    assert result["weights"] == _expected_weights()
