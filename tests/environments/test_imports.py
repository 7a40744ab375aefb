"""What a failed node most likely lacks: its module-level imports, read with ast, against what
a real interpreter provides (this test run's own, in a subprocess), and ComfyUI's log of its own
optional nodes. No build: the cheap half of the import gate's diagnosis."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from harness.environments import engine

from comfybake.engine.comfyui_log import gate_failures, optional_node_failures
from comfybake.engine.environment import imports

PACK = {
    "__init__.py": (
        "import os, sys\n"
        "import numpy.linalg as la\n"
        "from . import helpers\n"
        "from .helpers import thing\n"
        "import pack_module\n"
        "import comfy.model_management\n"
        "import folder_paths\n"
        "try:\n"
        "    import cv2\n"
        "except Exception:\n"
        "    cv2 = None\n"
        "if sys.platform == 'linux':\n"
        "    from sklearn.cluster import KMeans as KM\n"
        "def later():\n"
        "    import comfybake_lazy_dependency\n"
        "class Node:\n"
        "    import comfybake_class_level\n"
    ),
    "helpers.py": "import yaml\nthing = 1\n",
    "sub/pack_module.py": "",
    "broken.py": "def (:\n",
}


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_module_level_imports_are_read_with_their_names_and_whether_they_are_swallowed(tmp_path: Path) -> None:
    found = imports.imports(str(write(tmp_path / "pack", PACK)))
    assert [(i.module, i.statement, i.binds, i.file, i.line, i.swallowed) for i in found] == [
        ("os", "import os", ("os",), "__init__.py", 1, False),
        ("sys", "import sys", ("sys",), "__init__.py", 1, False),
        ("numpy", "import numpy.linalg as la", ("la",), "__init__.py", 2, False),
        ("pack_module", "import pack_module", ("pack_module",), "__init__.py", 5, False),
        ("comfy", "import comfy.model_management", ("comfy",), "__init__.py", 6, False),
        ("folder_paths", "import folder_paths", ("folder_paths",), "__init__.py", 7, False),
        ("cv2", "import cv2", ("cv2",), "__init__.py", 9, True),
        ("sklearn", "from sklearn.cluster import KMeans as KM", ("KM",), "__init__.py", 13, False),
        ("yaml", "import yaml", ("yaml",), "helpers.py", 1, False),
    ], "relative imports, functions, class bodies and files that do not parse are left out"


def test_the_interpreter_says_which_names_it_cannot_import() -> None:
    # yaml is installed (PyYAML's metadata maps it), json is the stdlib.
    names = ["yaml", "json", "comfybake_surely_missing", "not-an-identifier"]
    assert imports.missing_modules(sys.executable, names) == ["comfybake_surely_missing"]


def test_likely_missing_packages_name_the_distribution_and_the_setting(tmp_path: Path) -> None:
    comfyui = write(tmp_path / "ComfyUI", {"folder_paths.py": "", "comfy/__init__.py": "", "custom_nodes/.keep": ""})
    pack = write(comfyui / "custom_nodes" / "Pack", PACK)
    lines = imports.likely_missing(str(pack), str(comfyui), sys.executable, "name 'KM' is not defined")
    # The one bound to the name in the error first, then in source order; numpy is not in this
    # test run's venv either, yaml (helpers.py) is.
    assert [line.split(":")[0].strip() for line in lines] == [
        "likely missing package scikit-learn",
        "likely missing package numpy",
        "likely missing package opencv-python",
    ]
    assert lines[2].endswith("`import cv2` (__init__.py line 9, inside a try that swallows its ImportError), and"
                             " nothing installed in the venv provides cv2; add opencv-python to the environment's"
                             " pip_packages")  # fmt: skip
    # A site's import_names come before the built-in table.
    site = {"cv2": "opencv-python-headless"}
    headless = imports.likely_missing(str(pack), str(comfyui), sys.executable, "", names=site)
    assert "add opencv-python-headless to the environment's pip_packages" in headless[1]  # source order
    torch = write(tmp_path / "ComfyUI" / "comfy_extras", {"nodes_audio.py": "import torchaudio\n"})
    [audio] = imports.likely_missing(str(torch / "nodes_audio.py"), str(comfyui), sys.executable, "")
    assert audio.endswith("add torchaudio to torch_packages, or pick a torch flavour that includes it")


@pytest.mark.parametrize("names", [{"cv2.x": "opencv-python"}, {"cv2": ""}, {"cv2": ["opencv-python"]}])
def test_import_names_must_map_import_names_to_distributions(make_spec: Any, names: dict[str, Any]) -> None:
    spec = make_spec(import_names=names)
    with pytest.raises(engine.EnvError) as failure:
        engine.Builder(spec).run()
    [(module, package)] = names.items()
    assert str(failure.value) == (
        "environment comm: import_names (comfyui_environments_import_names) must map a top-level import name to the"
        f" distribution that provides it (cv2: opencv-python), got {module!r}: {package!r}"
    )
    assert not Path(spec.root).exists() or not (Path(spec.root) / "releases").exists()


# ComfyUI's log when one of its optional nodes and one custom node fail (v0.8.0's wording).
LOG = """\
Traceback (most recent call last):
  File "/opt/ComfyUI/nodes.py", line 2133, in load_custom_node
    module_spec.loader.exec_module(module)
  File "/opt/ComfyUI/comfy_extras/nodes_audio.py", line 4, in <module>
    import torchaudio
ModuleNotFoundError: No module named 'torchaudio'

Cannot import /opt/ComfyUI/comfy_extras/nodes_audio.py module for custom nodes: No module named 'torchaudio'
Traceback (most recent call last):
  File "/opt/ComfyUI/custom_nodes/Pack/__init__.py", line 9, in <module>
NameError: name 'yaml' is not defined

Cannot import /opt/ComfyUI/custom_nodes/Pack module for custom nodes: name 'yaml' is not defined

Import times for custom nodes:
   0.0 seconds (IMPORT FAILED): /opt/ComfyUI/custom_nodes/Pack

WARNING: some comfy_extras/ nodes did not import correctly. This may be because they are missing some dependencies.

IMPORT FAILED: nodes_audio.py
IMPORT FAILED: nodes_audio_encoder.py

This issue might be caused by new missing dependencies added the last time you updated ComfyUI.
Please do a: pip install -r requirements.txt

IMPORT FAILED: not-listed-under-a-warning.py
"""


def test_optional_nodes_and_custom_nodes_are_told_apart_in_comfyuis_log() -> None:
    assert list(gate_failures(LOG, "/opt/ComfyUI")) == ["Pack"]
    assert gate_failures(LOG, "/opt/ComfyUI")["Pack"].startswith("name 'yaml' is not defined\n    Traceback")
    optional = optional_node_failures(LOG)
    assert list(optional) == ["comfy_extras/nodes_audio.py", "comfy_extras/nodes_audio_encoder.py"]
    assert optional["comfy_extras/nodes_audio.py"].startswith("No module named 'torchaudio'\n    Traceback")
    assert optional["comfy_extras/nodes_audio_encoder.py"] == "see the output of main.py --quick-test-for-ci"
