"""Zero123++ (multi-view): six 320x320 views tiled 3 x 2 in one 960x640 image, on an SD 2 U-Net wrapped with
reference attention.

The community pipeline's denoiser (``pipe.unet``) is a wrapper module (``RefOnlyNoisedUNet``) holding the real
``UNet2DConditionModel`` as ``.unet``. Each step it runs the U-Net twice: first on the noised reference image
with ``cross_attention_kwargs={"mode": "w", ...}``, where every self-attention stores its input (keys/values of
the reference), then on the tiled views with ``mode="r"``, where every self-attention appends the stored
reference tokens to its keys and values. This adapter:

* patches the inner U-Net's blocks, and merges only in the views pass: the reference pass is left whole, so
  the merged view queries attend to the full reference keys/values (the processor concatenates
  ``[merged views; reference]``, the output has the merged length and is unmerged as usual);
* treats the tiled latent as one grid (the views attend to each other in one self-attention, so matching
  across views is the model's own grouping); the importance map is the tiled latent's;
* counts steps and reads the prediction on the inner U-Net's views pass (:attr:`call_site`), so the wrapper's own
  draw of the reference noise (``torch.randn_like`` from the global generator) happens before the patch's random
  stream is lent, and draws exactly what it draws unpatched;
* patches the wrapper even when applied to the pipeline before its first call: ``Zero123PlusPipeline`` wraps its
  U-Net inside ``__call__`` (``pipe.prepare()``), which :meth:`prepare_pipeline` runs first.

Preset (Sec. 4.1, App. B): the first two and last two blocks (``max_downsample=2``), ``pool=0.6``, pruning in
the first 10 of 50 steps. Any wrapper (or wrapper of wrappers, e.g. its depth ControlNet's ``DepthControlUNet``)
with a ``.unet`` U-Net and the ``mode`` convention is handled the same way.
"""

from __future__ import annotations

from torch import nn

from .base import ExampleShape
from .unet import UNetAdapter

#: The ``cross_attention_kwargs["mode"]`` of the reference pass (Zero123++'s convention).
REFERENCE_MODE = "w"
#: The community pipeline's class (by name: tokenmerge does not import community code).
PIPELINE_CLASS = "Zero123PlusPipeline"
#: The condition image's side in pixels (its reference pass runs on 40x40 latents).
REFERENCE_SIZE = 320


class Zero123PlusAdapter(UNetAdapter):
    family = "zero123pp"
    description = "a wrapper with a UNet2DConditionModel as .unet and reference attention (Zero123++)"
    #: SD 2 layout (linear projections, per-level heads), attention in three of four levels, in the reference
    #: wrapper's stand-in.
    tiny_configs = {"zero123pp": dict(
        _class_name="UNet2DConditionModel", _wrapper="ReferenceUNet", sample_size=16, in_channels=4, out_channels=4,
        layers_per_block=1, norm_num_groups=16, block_out_channels=(32, 32, 64, 64), attention_head_dim=(2, 2, 4, 4),
        use_linear_projection=True, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32,
    )}

    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__(inner_unet(denoiser))
        self.denoiser = denoiser
        self.family = "zero123pp"

    @staticmethod
    def handles(denoiser: nn.Module) -> bool:
        from diffusers import UNet2DConditionModel

        return not isinstance(denoiser, UNet2DConditionModel) and inner_unet(denoiser) is not None

    @staticmethod
    def prepare_pipeline(pipeline: object) -> None:
        from diffusers import UNet2DConditionModel

        if (any(cls.__name__ == PIPELINE_CLASS for cls in type(pipeline).__mro__)
                and isinstance(getattr(pipeline, "unet", None), UNet2DConditionModel)):
            pipeline.prepare()  # what its __call__ does first: pipe.unet becomes the reference-attention wrapper

    @property
    def call_site(self) -> nn.Module:
        return self.unet

    def install(self, state) -> None:
        """Nothing of the plain U-Net's: the wrapper's reference pass is expected here, and left whole."""

    def check(self, config) -> None:
        if config.proportional_attention or not config.merge_queries:
            raise ValueError(
                f"tokenmerge: {type(config).__name__}(proportional_attention={config.proportional_attention}, "
                f"merge_queries={config.merge_queries}) cannot run on Zero123++: its reference attention appends "
                "the reference image's tokens to the keys inside its own processor, where neither a size bias nor "
                "separate merged keys line up with them. Use proportional_attention=False and merge_queries=True "
                "(the family preset)."
            )
        super().check(config)

    def skips_call(self, read) -> bool:
        return (read("cross_attention_kwargs") or {}).get("mode") == REFERENCE_MODE

    def _example(self, s: ExampleShape) -> tuple[tuple, dict]:
        """The six views tiled in one latent (960x640 px natively), CLIP-sized conditioning states, and the reference
        latent of the 320x320 condition image (``cross_attention_kwargs["cond_lat"]``), which the wrapper runs first."""
        args, kwargs = super()._example(s)
        config = self.unet.config
        reference = s.randn(s.batch, config.in_channels, REFERENCE_SIZE // 8, REFERENCE_SIZE // 8)
        return args, {**kwargs, "cross_attention_kwargs": {"cond_lat": reference}}


def inner_unet(module: nn.Module, depth: int = 3) -> nn.Module | None:
    """The ``UNet2DConditionModel`` found by following ``.unet`` from a wrapper (at most ``depth`` wrappers)."""
    from diffusers import UNet2DConditionModel

    for _ in range(depth):
        module = module._modules.get("unet")
        if module is None or isinstance(module, UNet2DConditionModel):
            return module
    return None
