"""ComfyUI's optional latent nodes, in the test double: they need nothing beyond the standard library."""


class LatentAdd:
    CATEGORY = "latent/advanced"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "op"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples1": ("LATENT",), "samples2": ("LATENT",)}}

    def op(self, samples1, samples2):
        return (samples1,)


NODE_CLASS_MAPPINGS = {"LatentAdd": LatentAdd}
