"""ComfyUI's optional audio nodes, in the test double: like ComfyUI's, they import torchaudio at
module level, so in a venv without it they fail to import and ComfyUI starts without them."""

import torchaudio  # noqa: F401 - the dependency ComfyUI's audio nodes have


class EmptyLatentAudio:
    CATEGORY = "latent/audio"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seconds": ("FLOAT", {"default": 47.6})}}

    def generate(self, seconds):
        return ({},)


NODE_CLASS_MAPPINGS = {"EmptyLatentAudio": EmptyLatentAudio}
