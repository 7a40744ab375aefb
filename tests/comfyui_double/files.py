"""The files the test double's nodes write and read: real PNG, WAV and MP4-header files, ComfyUI's names.

`save` names files as ComfyUI's `get_save_image_path`: the prefix may hold a subfolder
(`jobs/run` -> subfolder `jobs`, files `run_00001_.png`), the counter is one past the highest of
the files already there with that prefix, so a prompt run twice leaves two files, and a prefix
that leaves the folder (`../x`) fails the node. Images are one solid colour (from the seed), so
they stay small and tell runs apart.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import wave
import zlib
from dataclasses import dataclass
from typing import Any

import folder_paths

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# --disable-metadata: SaveImage writes no prompt/workflow text chunks (ComfyUI's flag).
DISABLE_METADATA = False


@dataclass
class Image:
    width: int
    height: int
    rgb: bytes


def colour(seed: str) -> bytes:
    return hashlib.sha256(seed.encode()).digest()[:3]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(image: Image, text: dict[str, str]) -> bytes:
    """A valid 8-bit RGB PNG, with ComfyUI's tEXt chunks (`prompt`, then each extra_pnginfo key)."""
    width, height = min(max(image.width, 1), 2048), min(max(image.height, 1), 2048)
    row = b"\x00" + image.rgb * width  # filter type 0, then the pixels
    header = struct.pack("!IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = [_chunk(b"IHDR", header)]
    chunks += [_chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1")) for key, value in text.items()]
    chunks += [_chunk(b"IDAT", zlib.compress(row * height)), _chunk(b"IEND", b"")]
    return PNG_SIGNATURE + b"".join(chunks)


def png_size(head: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG's first 24 bytes; None for anything else."""
    if len(head) < 24 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack("!II", head[16:24])
    return int(width), int(height)


def metadata(prompt: dict[str, Any], extra_data: dict[str, Any]) -> dict[str, str]:
    """What SaveImage embeds: the prompt, and each extra_pnginfo entry (the UI's workflow), as JSON."""
    text = {"prompt": json.dumps(prompt)}
    pnginfo = extra_data.get("extra_pnginfo")
    if isinstance(pnginfo, dict):
        text.update({str(key): json.dumps(value) for key, value in pnginfo.items()})
    return text


def wav(seconds: float = 0.1, rate: int = 8000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as audio:
        audio.setnchannels(1)
        audio.setsampwidth(2)
        audio.setframerate(rate)
        audio.writeframes(b"\0\0" * int(seconds * rate))
    return out.getvalue()


def mp4(frames: int) -> bytes:
    """An ISO base media file: its `ftyp` box (as an H.264 MP4 starts) and a `free` box of `frames` bytes."""
    ftyp = b"isom" + struct.pack("!I", 512) + b"isomiso2avc1mp41"
    free = b"\0" * frames
    return struct.pack("!I", 8 + len(ftyp)) + b"ftyp" + ftyp + struct.pack("!I", 8 + len(free)) + b"free" + free


def directory(kind: str) -> str:
    """The folder of a ComfyUI file type: output, input or temp."""
    return {
        "output": folder_paths.get_output_directory,
        "input": folder_paths.get_input_directory,
        "temp": folder_paths.get_temp_directory,
    }[kind]()


def save(kind: str, prefix: str, suffix: str, data: bytes, counter_suffix: str = "_") -> dict[str, Any]:
    """Write `data` as the next `<prefix>_NNNNN_<suffix>` of its folder; return ComfyUI's item for it."""
    root = os.path.abspath(directory(kind))
    subfolder = os.path.dirname(os.path.normpath(prefix))
    name = os.path.basename(os.path.normpath(prefix))
    folder = os.path.abspath(os.path.join(root, subfolder))
    if os.path.commonpath((root, folder)) != root:
        raise ValueError(
            f"**** ERROR: Saving image outside the output folder is not allowed.\n full_output_folder: {folder}\n"
            f"         output_dir: {root}"
        )
    os.makedirs(folder, exist_ok=True)
    counter = 1 + max([_counter(existing, name) for existing in os.listdir(folder)] or [0])
    filename = f"{name}_{counter:05}{counter_suffix}{suffix}"
    with open(os.path.join(folder, filename), "xb") as out:
        out.write(data)
    return {"filename": filename, "subfolder": subfolder, "type": kind}


def _counter(existing: str, name: str) -> int:
    """The counter of `<name>_NNNNN...` (0 for any other file), as ComfyUI's map_filename reads it."""
    if os.path.normcase(existing[: len(name) + 1]) != os.path.normcase(name + "_"):
        return 0
    digits = existing[len(name) + 1 :].split("_")[0].split(".")[0]
    return int(digits) if digits.isdigit() else 0


def input_files() -> list[str]:
    """input/'s files, as LoadImage's combo lists them: sorted, its top level only."""
    root = folder_paths.get_input_directory()
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if os.path.isfile(os.path.join(root, n)))


def exists(kind: str, name: str) -> bool:
    """Whether `name` (it may hold a sub-folder: `sub/a.png`) is a file of that folder, inside it."""
    root = os.path.abspath(directory(kind))
    path = os.path.abspath(os.path.join(root, name))
    return os.path.commonpath((root, path)) == root and os.path.isfile(path)
