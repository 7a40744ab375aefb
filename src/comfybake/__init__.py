"""comfybake: bake and provision GPU machines that serve ComfyUI."""

from importlib import resources
from importlib.metadata import PackageNotFoundError, version


def _version() -> str:
    try:
        return version("comfybake")
    except PackageNotFoundError:  # the host's command (scripts/build-cli.py writes VERSION), or a bare tree
        try:
            return resources.files(__name__).joinpath("VERSION").read_text(encoding="utf-8").strip()
        except OSError:
            return "0+unknown"


__version__ = _version()
