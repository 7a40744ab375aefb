"""Node registry of the ComfyUI test double: a few built-in classes, its optional nodes, then custom nodes.

The built-in classes declare their inputs as ComfyUI does (combos of model files, of input/ files,
of samplers) and, for jobs, "run" in `double_run`: the loaders and encoders pass stand-ins on,
EmptyLatentImage sets size and batch, KSampler spends its share of the run time in steps with
`progress`, VAEDecode makes one image per latent, SaveImage/PreviewImage write real PNG files
(output/ and temp/), LoadImage reads an input/ file. Output nodes of the double's own:
TestDoubleVideoCombine (a `.mp4` under key `gifs`, as VideoHelperSuite), TestDoubleSaveAudio (a
`.wav` under key `audio`) and TestDoubleFail (raises: ComfyUI's execution_error).

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
import random
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import files
import folder_paths

Inputs = dict[str, tuple[Any, ...]]
# Combo values of KSampler, a subset of ComfyUI's lists.
SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_2m_sde", "ddim", "uni_pc"]
SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal"]
# The size of an image nothing gave a size to (a SaveImage whose `images` link is missing).
DEFAULT_SIZE = 64
# Image sides are capped so that a large latent stays a small, fast file.
MAX_SIDE = 2048


@dataclass
class RunContext:
    """What the executor hands a built-in node's `double_run`: where it is, and the run time it spends."""

    node_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    seconds: float
    wait: Callable[[float], None]
    progress: Callable[[int, int], None]


class _BuiltinNode:
    """A ComfyUI built-in class: INPUT_TYPES as ComfyUI declares it (a subset of the inputs), and
    `double_run(context, **inputs) -> (outputs, ui)` in place of the real work."""

    CATEGORY = "builtin"
    DESCRIPTION = ""
    RETURN_TYPES: tuple[str, ...] = ()
    OUTPUT_NODE = False
    FUNCTION = "run"
    REQUIRED: ClassVar[Inputs] = {}
    OPTIONAL: ClassVar[Inputs] = {}

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, Any]]:
        spec: dict[str, dict[str, Any]] = {"required": cls.required()}
        if cls.OPTIONAL:
            spec["optional"] = dict(cls.OPTIONAL)
        return spec

    @classmethod
    def required(cls) -> dict[str, tuple[Any, ...]]:
        return dict(cls.REQUIRED)

    @classmethod
    def double_run(cls, context: RunContext, **inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
        context.wait(context.seconds)
        return tuple({"type": t, "node": context.node_id} for t in cls.RETURN_TYPES), None


def _combo(folder: str) -> Callable[[], list[str]]:
    return lambda: folder_paths.get_filename_list(folder)


class CheckpointLoaderSimple(_BuiltinNode):
    CATEGORY = "loaders"
    DESCRIPTION = "Loads a diffusion model checkpoint."
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")

    @classmethod
    def required(cls) -> dict[str, tuple[Any, ...]]:
        return {"ckpt_name": (folder_paths.get_filename_list("checkpoints"),)}


class LoraLoader(_BuiltinNode):
    CATEGORY = "loaders"
    RETURN_TYPES = ("MODEL", "CLIP")

    @classmethod
    def required(cls) -> dict[str, tuple[Any, ...]]:
        return {
            "model": ("MODEL",),
            "clip": ("CLIP",),
            "lora_name": (folder_paths.get_filename_list("loras"),),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
            "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
        }


class VAELoader(_BuiltinNode):
    CATEGORY = "loaders"
    RETURN_TYPES = ("VAE",)

    @classmethod
    def required(cls) -> dict[str, tuple[Any, ...]]:
        return {"vae_name": (folder_paths.get_filename_list("vae"),)}


class CLIPTextEncode(_BuiltinNode):
    CATEGORY = "conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    REQUIRED: ClassVar[Inputs] = {"text": ("STRING", {"multiline": True, "dynamicPrompts": True}), "clip": ("CLIP",)}


class EmptyLatentImage(_BuiltinNode):
    CATEGORY = "latent"
    RETURN_TYPES = ("LATENT",)
    REQUIRED: ClassVar[Inputs] = {
        "width": ("INT", {"default": 512, "min": 16, "max": 16384, "step": 8}),
        "height": ("INT", {"default": 512, "min": 16, "max": 16384, "step": 8}),
        "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
    }

    @classmethod
    def double_run(cls, context: RunContext, **inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
        context.wait(context.seconds)
        latent = {"width": _int(inputs.get("width"), 512), "height": _int(inputs.get("height"), 512),
                  "batch": max(_int(inputs.get("batch_size"), 1), 1), "seed": 0}  # fmt: skip
        return (latent,), None


class KSampler(_BuiltinNode):
    """The step-taking node: its share of the run time, one `progress` message per step."""

    CATEGORY = "sampling"
    RETURN_TYPES = ("LATENT",)
    STEPS_INPUT = "steps"
    REQUIRED: ClassVar[Inputs] = {
        "model": ("MODEL",),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
        "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
        "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
        "sampler_name": (SAMPLERS,),
        "scheduler": (SCHEDULERS,),
        "positive": ("CONDITIONING",),
        "negative": ("CONDITIONING",),
        "latent_image": ("LATENT",),
        "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
    }

    @classmethod
    def double_run(cls, context: RunContext, **inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
        steps = max(_int(inputs.get("steps"), 20), 1)
        for step in range(1, steps + 1):
            context.wait(context.seconds / steps)
            context.progress(step, steps)
        given = inputs.get("latent_image")
        latent = dict(given) if isinstance(given, dict) and "batch" in given else {}
        latent = {"width": DEFAULT_SIZE, "height": DEFAULT_SIZE, "batch": 1, **latent}
        latent["seed"] = _int(inputs.get("seed"), 0)
        return (latent,), None


class VAEDecode(_BuiltinNode):
    CATEGORY = "latent"
    RETURN_TYPES = ("IMAGE",)
    REQUIRED: ClassVar[Inputs] = {"samples": ("LATENT",), "vae": ("VAE",)}

    @classmethod
    def double_run(cls, context: RunContext, **inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
        context.wait(context.seconds)
        latent = inputs.get("samples")
        if not isinstance(latent, dict) or "batch" not in latent:
            latent = {"width": DEFAULT_SIZE, "height": DEFAULT_SIZE, "batch": 1, "seed": 0}
        images = [
            files.Image(latent["width"], latent["height"], files.colour(f"{latent['seed']}:{index}"))
            for index in range(latent["batch"])
        ]
        return (images,), None


def _int(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _images(value: object) -> list[files.Image]:
    """The images an IMAGE input carries; one default image when it is not linked to any."""
    if isinstance(value, list) and value and all(isinstance(i, files.Image) for i in value):
        return value
    return [files.Image(DEFAULT_SIZE, DEFAULT_SIZE, files.colour("default"))]


class SaveImage(_BuiltinNode):
    """Writes each image as a real PNG under output/, ComfyUI's counter naming: `<prefix>_00001_.png`."""

    CATEGORY = "image"
    OUTPUT_NODE = True
    DESCRIPTION = "Saves the input images to your ComfyUI output directory."
    FOLDER = "output"
    REQUIRED: ClassVar[Inputs] = {
        "images": ("IMAGE", {"tooltip": "The images to save."}),
        "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": "The prefix for the file to save."}),
    }

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, Any]]:
        return {**super().INPUT_TYPES(), "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    @classmethod
    def prefix(cls, inputs: dict[str, Any]) -> str:
        return str(inputs.get("filename_prefix", "ComfyUI"))

    @classmethod
    def double_run(cls, context: RunContext, **inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
        context.wait(context.seconds)
        text = {} if files.DISABLE_METADATA else files.metadata(context.prompt, context.extra_data)
        saved = [
            files.save(cls.FOLDER, cls.prefix(inputs), ".png", files.png(image, text))
            for image in _images(inputs.get("images"))
        ]
        return (), {"images": saved}


class PreviewImage(SaveImage):
    """SaveImage into temp/ (type `temp`), ComfyUI's random `ComfyUI_temp_xxxxx` prefix."""

    DESCRIPTION = "Saves the input images to your ComfyUI temp directory."
    FOLDER = "temp"
    REQUIRED: ClassVar[Inputs] = {"images": ("IMAGE",)}

    @classmethod
    def prefix(cls, inputs: dict[str, Any]) -> str:
        return "ComfyUI_temp_" + "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))  # noqa: S311


class LoadImage(_BuiltinNode):
    """An image of input/ (a combo of its files, as ComfyUI lists them); the image keeps the file's size."""

    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE", "MASK")

    @classmethod
    def required(cls) -> dict[str, tuple[Any, ...]]:
        return {"image": (files.input_files(), {"image_upload": True})}

    @classmethod
    def VALIDATE_INPUTS(cls, image: object) -> bool | str:
        """As ComfyUI's: any file of input/ (an upload into a sub-folder too), in place of the combo check."""
        return True if isinstance(image, str) and files.exists("input", image) else f"Invalid image file: {image}"

    @classmethod
    def double_run(cls, context: RunContext, **inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
        context.wait(context.seconds)
        path = os.path.join(folder_paths.get_input_directory(), str(inputs.get("image")))
        with open(path, "rb") as image_file:  # a missing file fails the node, as in ComfyUI
            width, height = files.png_size(image_file.read(33)) or (DEFAULT_SIZE, DEFAULT_SIZE)
        image = files.Image(width, height, files.colour(str(inputs.get("image"))))
        return ([image], {"type": "MASK", "node": context.node_id}), None


class TestDoubleVideoCombine(_BuiltinNode):
    """A video output as VideoHelperSuite's VHS_VideoCombine gives it: key `gifs`, an `.mp4` under output/
    (an ISO media file header, not a playable video), `<prefix>_00001.mp4`."""

    CATEGORY = "test double"
    OUTPUT_NODE = True
    REQUIRED: ClassVar[Inputs] = {
        "images": ("IMAGE",),
        "frame_rate": ("FLOAT", {"default": 8, "min": 1, "step": 1}),
        "filename_prefix": ("STRING", {"default": "TestDoubleVideo"}),
    }

    @classmethod
    def double_run(cls, context: RunContext, **inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
        context.wait(context.seconds)
        frames = len(_images(inputs.get("images")))
        item = files.save("output", str(inputs.get("filename_prefix", "TestDoubleVideo")), ".mp4",
                          files.mp4(frames), counter_suffix="")  # fmt: skip
        rate = inputs.get("frame_rate", 8)
        item.update({"format": "video/h264-mp4", "frame_rate": float(rate) if isinstance(rate, (int, float)) else 8.0})
        return (), {"gifs": [item]}


class TestDoubleSaveAudio(_BuiltinNode):
    """A file output under a key of its own (`audio`, as ComfyUI's SaveAudio): a short silent WAV."""

    CATEGORY = "test double"
    OUTPUT_NODE = True
    REQUIRED: ClassVar[Inputs] = {"filename_prefix": ("STRING", {"default": "TestDoubleAudio"})}
    OPTIONAL: ClassVar[Inputs] = {"images": ("IMAGE",)}

    @classmethod
    def double_run(cls, context: RunContext, **inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
        context.wait(context.seconds)
        item = files.save("output", str(inputs.get("filename_prefix", "TestDoubleAudio")), ".wav", files.wav())
        return (), {"audio": [item]}


class TestDoubleFail(_BuiltinNode):
    """An output node that raises when it runs: ComfyUI's `execution_error`, with its `message`."""

    CATEGORY = "test double"
    OUTPUT_NODE = True
    REQUIRED: ClassVar[Inputs] = {"message": ("STRING", {"default": "TestDoubleFail failed, as it always does"})}
    OPTIONAL: ClassVar[Inputs] = {"images": ("IMAGE",)}

    @classmethod
    def double_run(cls, context: RunContext, **inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
        context.wait(context.seconds)
        raise RuntimeError(str(inputs.get("message", "TestDoubleFail failed, as it always does")))


NODE_CLASS_MAPPINGS: dict[str, type] = {
    node.__name__: node
    for node in (
        CheckpointLoaderSimple,
        LoraLoader,
        VAELoader,
        CLIPTextEncode,
        EmptyLatentImage,
        KSampler,
        VAEDecode,
        SaveImage,
        PreviewImage,
        LoadImage,
        TestDoubleVideoCombine,
        TestDoubleSaveAudio,
        TestDoubleFail,
    )
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
