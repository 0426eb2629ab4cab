"""The testbed generator: a small pixel-space text-to-image diffusion model built from diffusers classes.

``UNet2DConditionModel`` with self- and cross-attention at its full 32x32 resolution (1024 tokens, where
merging happens), a small ``CLIPTextModel`` trained with it, a word-level tokenizer of the captions'
vocabulary, and a DDIM scheduler. ``TestbedPipeline`` is a ``DiffusionPipeline``: it saves and loads with
``save_pretrained`` / ``from_pretrained`` and runs classifier-free guidance as a batched ``[uncond; cond]``
call, like Stable Diffusion, so every tokenmerge method patches it the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from .data import ATTRIBUTES

IMAGE_SIZE = 32
MAX_TOKENS = 20
WEIGHTS_DIR = Path(__file__).parent / "weights" / "testbed"


def caption_vocabulary() -> list[str]:
    """Every word a caption can use."""
    words = {"a", "at", "the", "in", "on", "background"}
    for values in ATTRIBUTES.values():
        for value in values:
            words.update(value.split())
    return sorted(words)


def build_tokenizer():
    """A word-level tokenizer (``PreTrainedTokenizerFast``) over the caption vocabulary; unknown words -> [UNK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    vocab = {word: i for i, word in enumerate(specials + caption_vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]", model_max_length=MAX_TOKENS)


def build_models(width: int = 64, seed: int = 0):
    """``(unet, text_encoder, tokenizer, scheduler)`` of the testbed, freshly initialised."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(width, 2 * width, 2 * width),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width, attention_head_dim=4, norm_num_groups=16,
    )
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                              set_alpha_to_one=True, prediction_type="epsilon")
    return unet, text_encoder, tokenizer, scheduler


def make_portable(folder: Path) -> None:
    """Rewrite what transformers 5 saves in a form transformers 4 (the oldest the project declares) loads too: the
    tokenizer's class as ``PreTrainedTokenizerFast`` (5 writes ``TokenizersBackend``, its new name for that class),
    and the text encoder's weights under their ``text_model.`` prefix (5 drops it; 4 would then leave every weight
    randomly initialised). Both forms load in transformers 5."""
    import json

    from safetensors.torch import load_file, save_file

    for path, rewrite in ((folder / "model_index.json", lambda d: {**d, "tokenizer": ["transformers",
                                                                                       "PreTrainedTokenizerFast"]}),
                          (folder / "tokenizer" / "tokenizer_config.json",
                           lambda d: {**d, "tokenizer_class": "PreTrainedTokenizerFast"})):
        path.write_text(json.dumps(rewrite(json.loads(path.read_text())), indent=2, sort_keys=True) + "\n")
    weights = folder / "text_encoder" / "model.safetensors"
    state = load_file(weights)
    if not all(key.startswith("text_model.") for key in state):
        save_file({key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in state.items()},
                  weights, metadata={"format": "pt"})


class TestbedPipeline(DiffusionPipeline):
    """Text-to-image on the testbed's 32x32 scenes, with classifier-free guidance."""

    __test__ = False  # pytest: a pipeline, not a test class

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, text_encoder, tokenizer, scheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Saved as ``save_pretrained`` does, then made loadable by transformers 4 too (:func:`make_portable`)."""
        super().save_pretrained(save_directory, **kwargs)
        make_portable(Path(save_directory))

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                                return_tensors="pt")
        return self.text_encoder(tokens.input_ids.to(self.device))[0]

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 20, guidance_scale: float = 3.0,
                 generator: torch.Generator | None = None, output_type: str = "pil") -> ImagePipelineOutput:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        self._guidance_scale = guidance_scale
        cond = self.encode(prompts)
        context = torch.cat([self.encode([""] * len(prompts)), cond]) if self.do_classifier_free_guidance else cond
        dtype = self.unet.dtype
        sample = torch.randn((len(prompts), 3, IMAGE_SIZE, IMAGE_SIZE), generator=generator,
                             device=generator.device if generator is not None else self.device)
        sample = sample.to(self.device, dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        self._num_timesteps = len(self.scheduler.timesteps)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([sample] * 2) if self.do_classifier_free_guidance else sample
            eps = self.unet(model_input, t, encoder_hidden_states=context.to(dtype)).sample
            if self.do_classifier_free_guidance:
                uncond, cond_eps = eps.chunk(2)
                eps = uncond + guidance_scale * (cond_eps - uncond)
            sample = self.scheduler.step(eps, t, sample).prev_sample
        images = (sample.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return ImagePipelineOutput(images=images)
        images = images.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "pil":
            images = self.numpy_to_pil(images)
        return ImagePipelineOutput(images=images)


def load_testbed(path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> TestbedPipeline:
    """The shipped testbed pipeline (or the one saved at ``path``), from safetensors weights."""
    path = Path(path) if path is not None else WEIGHTS_DIR
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"no testbed pipeline at {path}; train one with `python -m tokenmerge.testbed.train --out {path}`"
        )
    pipe = TestbedPipeline.from_pretrained(path, use_safetensors=True)
    pipe.unet.to(dtype)
    pipe.text_encoder.to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
