"""Node registry of the ComfyUI test double: a few built-in classes, its optional nodes, then custom nodes.

ComfyUI's optional nodes are the files `init_builtin_extra_nodes` lists in `comfy_extras/`;
custom nodes are every package (a folder with `__init__.py`) or single `.py` file under each
`custom_nodes` path, skipping `*.disabled` and `__pycache__`. All are imported by one function,
so a failure is logged the same way (its traceback, then `Cannot import ... module for custom
nodes:`), and start-up goes on. A failed custom node is marked `(IMPORT FAILED)` in the import
times; failed optional nodes are listed after the custom nodes, under ComfyUI's
`WARNING: some comfy_extras/ nodes did not import correctly` line, one `IMPORT FAILED: <file>` each.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
import traceback

import folder_paths


class _BuiltinNode:
    CATEGORY = "builtin"
    RETURN_TYPES: tuple[str, ...] = ()
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, object]]:
        return {"required": {}}


def _builtin(name: str, folder: str | None = None) -> type:
    def input_types(cls: type) -> dict[str, dict[str, object]]:
        if folder is None:
            return {"required": {}}
        return {"required": {"name": (folder_paths.get_filename_list(folder),)}}

    return type(name, (_BuiltinNode,), {"INPUT_TYPES": classmethod(input_types)})


NODE_CLASS_MAPPINGS: dict[str, type] = {
    "CheckpointLoaderSimple": _builtin("CheckpointLoaderSimple", "checkpoints"),
    "LoraLoader": _builtin("LoraLoader", "loras"),
    "VAELoader": _builtin("VAELoader", "vae"),
    "CLIPTextEncode": _builtin("CLIPTextEncode"),
    "EmptyLatentImage": _builtin("EmptyLatentImage"),
    "KSampler": _builtin("KSampler"),
    "VAEDecode": _builtin("VAEDecode"),
    "SaveImage": _builtin("SaveImage"),
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
# Where each class from a module came from: class name -> its python_module (`custom_nodes.<folder>`).
NODE_SOURCES: dict[str, str] = {}
# ComfyUI's optional nodes, in the order init_builtin_extra_nodes imports them.
EXTRAS_FILES = ("nodes_latent.py", "nodes_audio.py")


def load_custom_node(module_path: str, module_parent: str = "custom_nodes") -> bool:
    """Import one custom (or optional) node; on failure log ComfyUI's lines and return False."""
    module_name = os.path.basename(module_path)
    if os.path.isfile(module_path):
        module_name = os.path.splitext(module_name)[0]
        location = module_path
    else:
        location = os.path.join(module_path, "__init__.py")
    if module_parent != "custom_nodes":
        module_name = f"{module_parent}.{module_name}"
    try:
        spec = importlib.util.spec_from_file_location(
            module_name, location, submodule_search_locations=None if os.path.isfile(module_path) else [module_path]
        )
        if spec is None or spec.loader is None:
            raise ImportError(f"no module spec for {location}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        mappings = getattr(module, "NODE_CLASS_MAPPINGS", None)
        if mappings is None:
            logging.warning("Skip %s module for custom nodes due to the lack of NODE_CLASS_MAPPINGS.", module_path)
            return False
        for name, node_class in mappings.items():
            NODE_CLASS_MAPPINGS[name] = node_class
            NODE_SOURCES[name] = module_name if module_parent != "custom_nodes" else f"custom_nodes.{module_name}"
        NODE_DISPLAY_NAME_MAPPINGS.update(getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", {}) or {})
        return True
    except Exception as exc:  # noqa: BLE001 - a broken node must not stop the server (ComfyUI behaviour)
        sys.modules.pop(module_name, None)
        logging.warning(traceback.format_exc())
        logging.warning("Cannot import %s module for custom nodes: %s", module_path, exc)
        return False


def _candidates(custom_node_path: str) -> list[str]:
    if not os.path.isdir(custom_node_path):
        return []
    found = []
    for entry in sorted(os.listdir(custom_node_path)):
        path = os.path.join(custom_node_path, entry)
        if entry == "__pycache__" or entry.endswith(".disabled"):
            continue
        if os.path.isfile(path) and not entry.endswith(".py"):
            continue
        found.append(path)
    return found


def run_prestartup_scripts() -> None:
    """Run each node's prestartup_script.py before anything else is imported."""
    times = []
    for custom_node_path in folder_paths.get_folder_paths("custom_nodes"):
        for module_path in _candidates(custom_node_path):
            script = os.path.join(module_path, "prestartup_script.py")
            if not os.path.isfile(script):
                continue
            started = time.perf_counter()
            ok = True
            try:
                spec = importlib.util.spec_from_file_location(os.path.splitext(script)[0], script)
                if spec is None or spec.loader is None:
                    raise ImportError(f"no module spec for {script}")
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
            except Exception as exc:  # noqa: BLE001 - ComfyUI logs and goes on
                logging.error("Failed to execute startup-script: %s / %s", script, exc)
                ok = False
            times.append((time.perf_counter() - started, module_path, ok))
    if times:
        logging.info("\nPrestartup times for custom nodes:")
        for seconds, module_path, ok in sorted(times):
            logging.info("%6.1f seconds%s: %s", seconds, "" if ok else " (PRESTARTUP FAILED)", module_path)
        logging.info("")


def init_builtin_extra_nodes() -> list[str]:
    """Import ComfyUI's optional nodes from comfy_extras/; return the files that failed."""
    extras_dir = os.path.join(os.path.dirname(os.path.realpath(__file__)), "comfy_extras")
    return [name for name in EXTRAS_FILES if not load_custom_node(os.path.join(extras_dir, name), "comfy_extras")]


def init_extra_nodes(init_custom_nodes: bool = True) -> list[str]:
    """Import ComfyUI's optional nodes, then every custom node; return the custom node paths that failed."""
    import_failed = init_builtin_extra_nodes()
    failed = init_external_custom_nodes() if init_custom_nodes else []
    if not init_custom_nodes:
        logging.info("Skipping loading of custom nodes")
    if import_failed:
        logging.warning(
            "WARNING: some comfy_extras/ nodes did not import correctly. This may be because they are missing"
            " some dependencies.\n"
        )
        for name in import_failed:
            logging.warning("IMPORT FAILED: %s", name)
        logging.warning(
            "\nThis issue might be caused by new missing dependencies added the last time you updated ComfyUI."
        )
        logging.warning("Please do a: pip install -r requirements.txt")
        logging.warning("")
    return failed


def init_external_custom_nodes() -> list[str]:
    """Import every custom node; return the module paths that failed."""
    failed: list[str] = []
    times = []
    for custom_node_path in folder_paths.get_folder_paths("custom_nodes"):
        for module_path in _candidates(custom_node_path):
            started = time.perf_counter()
            ok = load_custom_node(module_path)
            times.append((time.perf_counter() - started, module_path, ok))
            if not ok:
                failed.append(module_path)
    if times:
        logging.info("\nImport times for custom nodes:")
        for seconds, module_path, ok in sorted(times):
            logging.info("%6.1f seconds%s: %s", seconds, "" if ok else " (IMPORT FAILED)", module_path)
        logging.info("")
    return failed
