"""Model and data folders of the ComfyUI test double, with ComfyUI's `folder_paths` names.

Custom nodes import this module by its ComfyUI name, so fixture nodes that use it work
unchanged against a real ComfyUI checkout.
"""

from __future__ import annotations

import logging
import os

supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}

# Legacy folder names that ComfyUI maps onto their current names.
LEGACY_NAMES = {"unet": "diffusion_models", "clip": "text_encoders"}

# folder key -> (sub-folders of models/ searched by default, file extensions listed)
STANDARD_FOLDERS: dict[str, tuple[tuple[str, ...], set[str]]] = {
    "checkpoints": (("checkpoints",), supported_pt_extensions),
    "configs": (("configs",), {".yaml"}),
    "loras": (("loras",), supported_pt_extensions),
    "vae": (("vae",), supported_pt_extensions),
    "text_encoders": (("text_encoders", "clip"), supported_pt_extensions),
    "diffusion_models": (("unet", "diffusion_models"), supported_pt_extensions),
    "clip_vision": (("clip_vision",), supported_pt_extensions),
    "style_models": (("style_models",), supported_pt_extensions),
    "embeddings": (("embeddings",), supported_pt_extensions),
    "diffusers": (("diffusers",), {"folder"}),
    "vae_approx": (("vae_approx",), supported_pt_extensions),
    "controlnet": (("controlnet", "t2i_adapter"), supported_pt_extensions),
    "gligen": (("gligen",), supported_pt_extensions),
    "upscale_models": (("upscale_models",), supported_pt_extensions),
    "hypernetworks": (("hypernetworks",), supported_pt_extensions),
    "photomaker": (("photomaker",), supported_pt_extensions),
    "classifiers": (("classifiers",), {""}),
    "model_patches": (("model_patches",), supported_pt_extensions),
    "audio_encoders": (("audio_encoders",), supported_pt_extensions),
    "latent_upscale_models": (("latent_upscale_models",), supported_pt_extensions),
}

folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {}
base_path = ""
models_dir = ""
output_directory = ""
input_directory = ""
temp_directory = ""
user_directory = ""


def set_base_directory(path: str) -> None:
    """Reset every folder to its default under `path` (ComfyUI's --base-directory)."""
    global base_path, models_dir, output_directory, input_directory, temp_directory, user_directory
    base_path = os.path.abspath(path)
    models_dir = os.path.join(base_path, "models")
    output_directory = os.path.join(base_path, "output")
    input_directory = os.path.join(base_path, "input")
    temp_directory = os.path.join(base_path, "temp")
    user_directory = os.path.join(base_path, "user")
    folder_names_and_paths.clear()
    for key, (subdirs, extensions) in STANDARD_FOLDERS.items():
        folder_names_and_paths[key] = ([os.path.join(models_dir, d) for d in subdirs], set(extensions))
    folder_names_and_paths["custom_nodes"] = ([os.path.join(base_path, "custom_nodes")], set())


def map_legacy(folder_name: str) -> str:
    return LEGACY_NAMES.get(folder_name, folder_name)


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    """Register a search path; default paths go first, others last, never twice."""
    folder_name = map_legacy(folder_name)
    if folder_name not in folder_names_and_paths:
        folder_names_and_paths[folder_name] = ([], set())
    paths = folder_names_and_paths[folder_name][0]
    if full_folder_path in paths:
        if is_default:
            paths.remove(full_folder_path)
            paths.insert(0, full_folder_path)
    elif is_default:
        paths.insert(0, full_folder_path)
    else:
        paths.append(full_folder_path)


def get_folder_paths(folder_name: str) -> list[str]:
    return list(folder_names_and_paths[map_legacy(folder_name)][0])


def _walk(directory: str) -> list[str]:
    """Files under `directory`, relative to it; links are followed, dangling ones skipped."""
    found: list[str] = []
    if not os.path.isdir(directory):
        return found
    for dirpath, _dirnames, filenames in os.walk(directory, followlinks=True):
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            if not os.path.exists(path):
                logging.warning("Warning: Unable to access %s. Skipping this path.", path)
                continue
            found.append(os.path.relpath(path, directory).replace(os.sep, "/"))
    return found


def get_filename_list(folder_name: str) -> list[str]:
    """Every model file of a folder key, merged over all its paths (404 if the key is unknown)."""
    paths, extensions = folder_names_and_paths[map_legacy(folder_name)]
    names: set[str] = set()
    for directory in paths:
        for name in _walk(directory):
            if not extensions or os.path.splitext(name)[1].lower() in extensions:
                names.add(name)
    return sorted(names)


def get_full_path(folder_name: str, filename: str) -> str | None:
    """First match wins, in search-path order."""
    for directory in folder_names_and_paths[map_legacy(folder_name)][0]:
        candidate = os.path.join(directory, filename)
        if os.path.isfile(candidate):
            return candidate
    return None


def get_output_directory() -> str:
    return output_directory


def get_input_directory() -> str:
    return input_directory


def get_temp_directory() -> str:
    return temp_directory


def get_user_directory() -> str:
    return user_directory


def set_output_directory(path: str) -> None:
    global output_directory
    output_directory = path


def set_input_directory(path: str) -> None:
    global input_directory
    input_directory = path


def set_temp_directory(path: str) -> None:
    global temp_directory
    temp_directory = path


def set_user_directory(path: str) -> None:
    global user_directory
    user_directory = path


set_base_directory(os.path.dirname(os.path.realpath(__file__)))
