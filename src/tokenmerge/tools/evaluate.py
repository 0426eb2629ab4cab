"""``tokenmerge eval``: the quality and the speed-up of token-merging methods, against the unpatched model.

    tokenmerge eval --methods tome,importance --ratios 0.5,0.7 --split heldout --count 200 --seeds 0,1,2 --out OUT

For every prompt batch and seed the unpatched reference is generated once, then every method x ratio from the
same seed (in a rotating order, so that slow drifts of the machine spread evenly): the wall time of each call
gives the speed-up, measured in the same run. Each method's images are compared with the reference (PSNR,
SSIM, LPIPS when its weights are present). On the testbed, the judge reads every image (condition accuracy)
and the Fréchet distance of its features to real images of the same captions measures the distribution (FD).
On real models, CLIP score and FID come from local weights (``--clip-model``, ``--fid-reference`` with
``--inception-weights``).

Writes ``results.json``, ``results.csv``, ``results.md`` (also printed), ``quality_vs_speedup.png`` and
``grid.png`` to ``--out``. Under ``accelerate launch`` the prompt batches are sharded across the processes and
the metric states are summed over them (torchmetrics' distributed sync); the main process writes the files.
The metrics and their protocol are in docs/quality.md. :func:`evaluate` is the Python entry point.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from ..api import patched
from ..methods.base import MethodConfig, config_fields
from ..state import is_signal
from ..testbed.data import ATTRIBUTES, SPLIT_SEEDS, Scene, all_scenes, object_mask, render, sample_scenes
from .options import METHODS, UNPATCHED, number_list, positive_int
from .reports import markdown_table as table_of
from .runtime import DTYPES, load_pipeline, resolve_device, synchronize

KNOWN_METHODS = tuple(METHODS)
DEFAULT_METHODS = ",".join(KNOWN_METHODS)
DEFAULT_SPLIT = "heldout"
DEFAULT_COUNT = 200
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"  # what torchvision (hence torchmetrics' LPIPS) loads for AlexNet
GRID_CELL = 96  # grid images are scaled up by a whole factor to about this many pixels (testbed images are 32)
RESULT_FILES = ("results.json", "results.csv", "results.md", "quality_vs_speedup.png", "grid.png")
ROW_FIELDS = ("method", "ratio", "seconds_per_image", "speedup", "psnr", "psnr_object", "psnr_background", "ssim",
              "lpips", "accuracy",
              *(f"accuracy_{name}" for name in ATTRIBUTES), "fd", "clip_score", "fid", "n")


class EvalError(ValueError):
    """A bad input to :func:`evaluate` (the CLI turns it into a usage error, exit code 2)."""


# ----------------------------------------------------------------------------------------------- inputs

@dataclass(frozen=True)
class Variant:
    """One row of the results: a method at a ratio, or the unpatched reference (``config`` None)."""

    method: str
    config: MethodConfig | None = None
    #: Added to the noise seed: the noise-floor row is the unpatched model from other noise.
    noise_offset: int = 0

    @property
    def ratio(self) -> float | None:
        return None if self.config is None else self.config.ratio

    @property
    def label(self) -> str:
        if self.config is None:
            return "unpatched" if self.noise_offset == 0 else self.method
        return f"{self.method} {self.config.ratio:g}"

    @property
    def folder(self) -> str:
        name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.method).strip("_")
        return name if self.config is None else f"{name}-{self.config.ratio:g}"


REFERENCE = Variant(UNPATCHED)
#: The unpatched model again, from other noise (``noise_floor=True``): the accuracy and FD differences that are
#: sampling noise, and the PSNR of an unrelated sample of the same caption.
NOISE_FLOOR = Variant("unpatched, other noise", noise_offset=1_000_003)


def method_name(config: MethodConfig) -> str:
    """The method's CLI name, followed by the fields set away from their defaults: ``importance[dst_selection=topk]``."""
    name = type(config).name or type(config).__name__.lower()
    default = type(config)()
    changed = [f"{field.name}={getattr(config, field.name)}" for field in config_fields(config)
               if field.name not in ("ratio", "seed") and _plain(getattr(config, field.name))
               and getattr(config, field.name) != getattr(default, field.name)]
    return f"{name}[{';'.join(changed)}]" if changed else name


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _option_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[lowered]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


_METHOD_ITEM = re.compile(r"^\s*([A-Za-z_]*)\s*(?:\[([^\]]*)\])?\s*(?::(.*))?$")


def parse_methods(methods: str | Sequence[str | MethodConfig], ratios: Sequence[float] | None = None
                  ) -> list[Variant]:
    """The method variants to evaluate (the unpatched reference is not among them: it always runs).

    ``methods`` is ``"tome,importance:0.7,importance[dst_selection=topk]:0.7"`` or a sequence of such items and
    of method configs; ``[field=value;...]`` sets config fields (the paper's ablation switches). An item without
    a ratio takes each of ``ratios`` (the cross product), or its config's default ratio when ``ratios`` is None.
    """
    if isinstance(methods, str):
        items: list[Any] = [part for part in re.split(r",(?![^\[]*\])", methods) if part.strip()]
    else:
        items = list(methods)
    variants: dict[str, Variant] = {}
    for item in items:
        if isinstance(item, MethodConfig):
            variant = Variant(method_name(item), item)
            variants.setdefault(variant.label, variant)
            continue
        if not isinstance(item, str):
            raise EvalError(f"a method is a name such as 'tome' or 'tome:0.5' or a config, got {item!r}")
        match = _METHOD_ITEM.match(item)
        if match is None:
            raise EvalError(f"cannot read method {item.strip()!r}; write NAME, NAME:RATIO or "
                            f"NAME[field=value;...]:RATIO, e.g. importance[dst_selection=topk]:0.7")
        name, options_text, ratio_text = match.group(1).lower(), match.group(2), match.group(3)
        if not name or name in (UNPATCHED, "none"):  # the reference runs anyway
            continue
        if name not in KNOWN_METHODS:
            raise EvalError(f"unknown method {name!r}; known methods: {', '.join(KNOWN_METHODS)}")
        options: dict[str, Any] = {}
        known_fields = {field.name for field in config_fields(METHODS[name])} - {"ratio"}
        for option in filter(str.strip, (options_text or "").split(";")):
            key, has_value, value = option.partition("=")
            if not has_value or key.strip() not in known_fields:
                raise EvalError(f"bad option {option.strip()!r} for {name}: write field=value with a field among "
                                f"{', '.join(sorted(known_fields))}")
            options[key.strip()] = _option_value(value)
        if ratio_text is not None:
            try:
                item_ratios: list[float | None] = [float(ratio_text)]
            except ValueError:
                raise EvalError(f"bad ratio in {item.strip()!r}: write METHOD:RATIO, e.g. {name}:0.5") from None
        else:
            item_ratios = list(ratios) if ratios else [None]
        for ratio in item_ratios:
            try:
                config = METHODS[name](**options) if ratio is None else METHODS[name](ratio=ratio, **options)
            except (ValueError, TypeError) as err:  # the config names the field and its range
                raise EvalError(str(err)) from None
            variant = Variant(method_name(config), config)
            variants.setdefault(variant.label, variant)
    return list(variants.values())


@dataclass
class PromptSet:
    """The prompts, and their testbed scenes when every prompt is a testbed caption (judge metrics)."""

    prompts: list[str]
    scenes: list[Scene] | None = None
    source: str = "prompts"

    @classmethod
    def from_prompts(cls, prompts: Sequence[str], source: str = "prompts") -> PromptSet:
        prompts = [str(prompt) for prompt in prompts]
        if not prompts:
            raise EvalError("no prompts to evaluate")
        by_caption = {scene.caption: scene for scene in all_scenes()}
        scenes = [by_caption.get(prompt) for prompt in prompts]
        return cls(prompts, scenes if all(scene is not None for scene in scenes) else None, source)


def read_coco_captions(path: str | Path, image_root: str | Path | None = None) -> list[tuple[str, Path]]:
    """``(caption, image path)`` per image of a COCO-style captions file, in image-id order (first caption).

    The file has ``images`` (``id``, ``file_name``) and ``annotations`` (``image_id``, ``caption``), as
    ``captions_val2014.json``; ``file_name`` is relative to ``image_root`` (default: the file's folder).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = {image["id"]: image["file_name"] for image in data["images"]}
        captions: dict[Any, str] = {}
        for note in sorted(data["annotations"], key=lambda note: (note["image_id"], note.get("id", 0))):
            captions.setdefault(note["image_id"], " ".join(note["caption"].split()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise EvalError(f"{path} is not a COCO-style captions file (a JSON object with 'images' [id, file_name] "
                        f"and 'annotations' [image_id, caption]): {err!r}") from None
    root = Path(image_root) if image_root is not None else path.parent
    return [(captions[key], root / files[key]) for key in sorted(captions) if key in files]


def load_prompts(path: str | Path | None = None, split: str = DEFAULT_SPLIT, count: int | None = None
                 ) -> PromptSet:
    """Prompts from a text file (one a line; blank lines skipped) or a COCO captions ``.json``, or the captions
    of ``count`` scenes of a testbed split (default 200). ``count`` also keeps the first prompts of a file."""
    if count is not None and count < 1:
        raise EvalError(f"the prompt count must be at least 1, got {count}")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise EvalError(f"prompts file {path} does not exist")
        if path.suffix.lower() == ".json":
            prompts = [caption for caption, _ in read_coco_captions(path)]
        else:
            prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise EvalError(f"prompts file {path} has no prompts (one prompt per line; blank lines are skipped)")
        return PromptSet.from_prompts(prompts[:count], source=str(path))
    if split not in SPLIT_SEEDS:
        raise EvalError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_SEEDS)}")
    scenes = sample_scenes(split, DEFAULT_COUNT if count is None else count)
    return PromptSet([scene.caption for scene in scenes], scenes, f"testbed split {split!r}")


def reference_images(path: str | Path, image_root: str | Path | None = None) -> list[Path]:
    """The FID reference images: every image under a folder, or those a COCO captions file lists."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    elif path.is_file() and path.suffix.lower() == ".json":
        files = [image for _, image in read_coco_captions(path, image_root)]
        missing = [image for image in files if not image.is_file()]
        if missing:
            raise EvalError(f"--fid-reference {path}: {len(missing)} of its {len(files)} images are missing, e.g. "
                            f"{missing[0]}; pass --image-root DIR, the folder its file_name entries are relative to")
    else:
        raise EvalError(f"--fid-reference {path}: no such folder of images or COCO-style captions .json")
    if not files:
        raise EvalError(f"--fid-reference {path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) there")
    return files


def check_metric_paths(clip_model: str | Path | None, fid_reference: str | Path | None,
                       inception_weights: str | Path | None, image_root: str | Path | None = None) -> list[Path]:
    """Fail early, before any model loads, when CLIP score or FID cannot run; return the FID reference images."""
    if clip_model is not None and not (Path(clip_model) / "config.json").is_file():
        raise EvalError(
            f"--clip-model {clip_model}: no CLIP model folder there (no config.json). CLIP score needs local "
            f"weights: on a machine with network, `hf download openai/clip-vit-base-patch16 --local-dir "
            f"{clip_model}` (CLIP ViT-B/16, the papers' choice), then copy the folder here")
    if fid_reference is None:
        if inception_weights is not None:
            raise EvalError("--inception-weights is for FID, which needs --fid-reference (reference images)")
        return []
    references = reference_images(fid_reference, image_root)
    if inception_weights is None:
        raise EvalError(
            "FID needs the Inception weights as a local file, --inception-weights FILE: torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth (the URL is torch_fidelity.feature_extractor_inceptionv3."
            "URL_INCEPTION_V3); without it torchmetrics would try to download them")
    if not Path(inception_weights).is_file():
        raise EvalError(f"--inception-weights {inception_weights}: no such file")
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise EvalError("FID needs the torch-fidelity package (its Inception network): pip install torch-fidelity")
    return references


def lpips_status() -> str | None:
    """None when torchmetrics' LPIPS can run offline (torchvision and AlexNet's weights present), else why not."""
    weights = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS
    try:
        import torchvision  # noqa: F401
    except ImportError:
        missing = "torchvision is not installed (pip install torchvision)"
        if not weights.is_file():
            missing += f" and AlexNet's ImageNet weights are not at {weights}"
    else:
        if weights.is_file():
            return None
        missing = f"AlexNet's ImageNet weights are not at {weights}"
    return (f"LPIPS skipped (recorded as null): {missing}; torchvision downloads {ALEXNET_WEIGHTS} there on first "
            "use when online, or copy it there")


def make_lpips() -> nn.Module:
    """torchmetrics' LPIPS (AlexNet, the LPIPS paper's default), on images in ``[0, 1]``."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    return LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)


def load_model(model: str | Path | None = None, dtype: str = "float32"):
    """The testbed (``model`` None), a saved testbed folder, or any diffusers pipeline folder (safetensors)."""
    from ..testbed import pipeline as testbed

    if dtype not in DTYPES:
        raise EvalError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if model is None:
        try:
            return testbed.load_testbed(None, DTYPES[dtype])
        except FileNotFoundError:
            raise EvalError(
                f"the testbed generator is not trained yet: no weights at {testbed.WEIGHTS_DIR}. Train it with "
                f"`python -m tokenmerge.testbed.train --out {testbed.WEIGHTS_DIR} --steps 20000` (it needs a GPU; "
                "see docs/testbed.md), or pass --model DIR to evaluate a diffusers pipeline folder") from None
    folder = Path(model)
    if folder.is_dir():
        index = folder / "model_index.json"
        if index.is_file() and json.loads(index.read_text()).get("_class_name") == testbed.TestbedPipeline.__name__:
            return testbed.load_testbed(folder, DTYPES[dtype])
        return load_pipeline(str(folder), DTYPES[dtype])
    text = str(model)
    if folder.is_absolute() or text.startswith(".") or text.count("/") != 1:
        raise EvalError(f"--model {model}: no such folder")
    return load_pipeline(text, DTYPES[dtype])  # a Hub id (from the local cache); fails with advice when offline


# ---------------------------------------------------------------------------------------- pure helpers

def shard(items: Sequence, num_processes: int, process_index: int) -> list:
    """The contiguous part of ``items`` process ``process_index`` of ``num_processes`` takes, as accelerate's
    ``split_between_processes``: the first ``len % num_processes`` processes take one more."""
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} out of range for {num_processes} processes")
    size, extra = divmod(len(items), num_processes)
    start = process_index * size + min(process_index, extra)
    return list(items[start : start + size + (process_index < extra)])


def batches_of(count: int, batch: int) -> list[list[int]]:
    """Prompt indices ``0..count-1`` in batches of ``batch`` (the last may be shorter)."""
    return [list(range(start, min(start + batch, count))) for start in range(0, count, batch)]


def batch_seed(seed: int, first_index: int) -> int:
    """The generator seed of the batch starting at prompt ``first_index``: distinct noise in every batch, the
    same for the reference and every method, and independent of how batches are spread over processes."""
    return int(np.random.SeedSequence([seed, first_index]).generate_state(1)[0])


def real_jitter_seed(index: int, seed: int) -> int:
    """Jitter seed of the real testbed image that stands for prompt ``index`` at ``seed`` in the FD."""
    return int(np.random.SeedSequence([0x7E57, index, seed]).generate_state(1)[0])


class FeatureIdentity(nn.Module):
    """A "feature extractor" for features already computed: lets torchmetrics' FID statistics take them."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class JudgeFeatures(nn.Module):
    """The judge's 128-d penultimate features (``Judge.features``) of images in ``[0, 1]``: the FD's space."""

    def __init__(self, judge: nn.Module) -> None:
        super().__init__()
        self.judge = judge.eval()
        self.num_features = judge.heads[next(iter(judge.heads))].in_features

    def train(self, mode: bool = True) -> JudgeFeatures:
        return super().train(False)  # BatchNorm must keep its running statistics

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.judge.features(images.float())


def frechet_distance(features_a: torch.Tensor | np.ndarray, features_b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(n, d)``, in float64.

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` computed by torchmetrics' FID code
    (``FrechetInceptionDistance`` with a custom feature module; the trace of the square root from the
    eigenvalues of ``S_a S_b``, no scipy). Clamped at 0 (rounding can give -1e-12 for identical sets).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    a = torch.as_tensor(features_a, dtype=torch.float64)
    b = torch.as_tensor(features_b, dtype=torch.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two (n, d) feature sets of the same d, got {tuple(a.shape)} and {tuple(b.shape)}")
    metric = FrechetInceptionDistance(feature=FeatureIdentity(a.shape[1]), normalize=True, sync_on_compute=False)
    metric.update(a, real=True)
    metric.update(b, real=False)
    return max(0.0, float(metric.compute()))


# ----------------------------------------------------------------------------------------------- scoring

REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


class Scores:
    """Every metric of one variant, as torchmetrics accumulators that sum over processes when computed."""

    def __init__(self, judged: bool, fd_features: nn.Module | None, lpips: bool, clip: bool,
                 fid_features: nn.Module | None) -> None:
        from torchmetrics.aggregation import MeanMetric, SumMetric
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.ssim import StructuralSimilarityIndexMeasure

        self.metrics: dict[str, Any] = {
            "seconds": SumMetric(), "images": SumMetric(), "psnr": MeanMetric(),
            "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
        }
        if lpips:
            self.metrics["lpips"] = MeanMetric()
        if judged:
            self.metrics["psnr_object"] = MeanMetric()
            self.metrics["psnr_background"] = MeanMetric()
            self.metrics["accuracy"] = MeanMetric()
            self.metrics.update({f"accuracy_{name}": MeanMetric() for name in ATTRIBUTES})
            self.metrics["fd"] = FrechetInceptionDistance(feature=fd_features, normalize=True,
                                                          reset_real_features=False)
        if clip:
            self.metrics["clip_score"] = MeanMetric()
        if fid_features is not None:
            self.metrics["fid"] = FrechetInceptionDistance(feature=fid_features, reset_real_features=False)

    def to(self, device: torch.device) -> Scores:
        for metric in self.metrics.values():
            metric.to(device)
        return self

    def compute(self, real: dict[str, Any]) -> dict[str, float | None]:
        """Every value, summed over processes (collective: every process calls it, in the same order)."""
        values: dict[str, float | None] = {}
        for name, metric in self.metrics.items():
            if name in real:
                for state in REAL_STATES:
                    setattr(metric, state, getattr(real[name], state).clone())
                if not hasattr(metric, "orig_dtype"):  # set by update(): missing on a process that had no batch
                    metric.orig_dtype = torch.float32
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    value = float(metric.compute())
                except RuntimeError:  # a Fréchet distance of fewer than 2 images
                    value = math.nan
            if name in ("fd", "fid") and not math.isnan(value):
                value = max(0.0, value)
            values[name] = None if math.isnan(value) else value
        return values


class ClipFeatures(nn.Module):
    """A ``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return the projected embeddings as
    tensors: transformers 5 returns model outputs (embeddings in ``pooler_output``), which torchmetrics' CLIPScore
    (1.9) takes for tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        self.config = model.config

    @staticmethod
    def _embeddings(output: Any) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._embeddings(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._embeddings(self.model.get_text_features(*args, **kwargs))


def inception_module(weights: str | Path) -> nn.Module:
    """The FID Inception v3 (torch-fidelity's port of the TensorFlow network, 2048-d pool features, uint8 images
    in) from a local weights file: what ``FrechetInceptionDistance(feature=2048)`` builds, without a download."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                              feature_extractor_weights_path=str(weights))


def judge_correct(judge: nn.Module, images: torch.Tensor, scenes: Sequence[Scene]) -> torch.Tensor:
    """``(B, attributes)`` bool on the images' device: the judge reads each attribute as the caption says."""
    from ..testbed.judge import label_tensor

    predicted = judge.predict(images)
    targets = label_tensor(list(scenes))
    return torch.stack([predicted[name] == targets[name].to(images.device) for name in ATTRIBUTES], dim=1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def load_reference_image(path: Path, height: int, width: int) -> np.ndarray:
    """An RGB image center-cropped to the generated aspect ratio and resized (bicubic) to the generated size."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = min(image.width / width, image.height / height)
        crop_w, crop_h = round(width * scale), round(height * scale)
        left, top = (image.width - crop_w) // 2, (image.height - crop_h) // 2
        image = image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.Resampling.BICUBIC)
        return np.asarray(image)


# ------------------------------------------------------------------------------------------------ the run

@dataclass
class EvalResult:
    """What :func:`evaluate` measured: one row per variant (the reference first), notes, files written."""

    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    def row(self, method: str, ratio: float | None = None) -> dict[str, Any]:
        for row in self.rows:
            if row["method"] == method and (ratio is None or row["ratio"] == ratio):
                return row
        raise KeyError(f"no row for {method} {ratio}")


def _generate(pipe, prompts: list[str], steps: int, seed: int, device: torch.device, options: dict) -> torch.Tensor:
    generator = torch.Generator(device).manual_seed(seed)
    images = pipe(prompt=prompts, num_inference_steps=steps, generator=generator, output_type="pt", **options).images
    return images.float().clamp(0, 1)


def evaluate(
    model: Any = None, *, methods: str | Sequence[str | MethodConfig] = DEFAULT_METHODS,
    ratios: Sequence[float] | None = None, prompts: str | Path | Sequence[str] | PromptSet | None = None,
    split: str = DEFAULT_SPLIT, count: int | None = None, seeds: Sequence[int] = (0,), steps: int = 20,
    guidance: float | None = None, batch: int = 16, height: int | None = None, width: int | None = None,
    out: str | Path | None = None, device: str = "auto", dtype: str = "float32",
    clip_model: str | Path | None = None, fid_reference: str | Path | None = None,
    inception_weights: str | Path | None = None, image_root: str | Path | None = None,
    save_images: bool = False, grid_prompts: int = 6, progress: bool = True, noise_floor: bool = False,
    log: Callable[[str], None] = print,
) -> EvalResult:
    """Evaluate token-merging methods against the unpatched model; write the result files to ``out``.

    ``model``: None for the testbed, a pipeline folder (or saved testbed), or a loaded pipeline. ``methods`` and
    ``ratios``: see :func:`parse_methods`. ``prompts``: a file (see :func:`load_prompts`), a list of prompts or a
    :class:`PromptSet`; None takes ``count`` captions of the testbed ``split``. ``guidance`` None keeps the
    pipeline's default scale. Inputs are checked before any model loads; a bad one raises :class:`EvalError`.
    Runs on one process as is, or sharded under ``accelerate launch`` (every process returns the same rows).
    ``noise_floor``: add a row of the unpatched model from other noise (:data:`NOISE_FLOOR`).
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    variants = [REFERENCE, *([NOISE_FLOOR] if noise_floor else []), *parse_methods(methods, ratios)]
    if isinstance(prompts, PromptSet):
        prompt_set = prompts
    elif isinstance(prompts, (str, Path)) or prompts is None:
        prompt_set = load_prompts(prompts, split, count)
    else:
        prompt_set = PromptSet.from_prompts(list(prompts)[:count])
    seeds = tuple(int(seed) for seed in seeds)
    if not seeds:
        raise EvalError("no seeds: give at least one, e.g. --seeds 0")
    for name, value in (("steps", steps), ("batch", batch), ("grid_prompts", grid_prompts)):
        if value < 1:
            raise EvalError(f"{name} must be at least 1, got {value}")
    if guidance is not None and guidance <= 1:
        users = [v.label for v in variants if v.config is not None and is_signal(v.config.signal, "cfg")]
        if users:
            raise EvalError(f"{', '.join(users)} read token importance from classifier-free guidance, which "
                            f"guidance {guidance:g} turns off; use a guidance scale above 1")
    references = check_metric_paths(clip_model, fid_reference, inception_weights, image_root)

    # On CPU, accelerate needs cpu=True to see a multi-process (torchrun / accelerate launch) run as one.
    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    main = state.is_main_process
    say = log if main else (lambda message: None)
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        say(message)

    def bad_device(message: str) -> None:
        raise EvalError(message)

    from ..testbed.pipeline import IMAGE_SIZE, TestbedPipeline

    if model is None or isinstance(model, (str, Path)):
        if state.num_processes > 1 and device in ("auto", "cuda"):
            run_device = state.device
        else:
            run_device = resolve_device(device, bad_device)
        pipe = load_model(model, dtype).to(run_device)
        model_name = "testbed" if model is None else str(model)
    else:
        pipe = model
        run_device = pipe.device if device == "auto" else resolve_device(device, bad_device)
        pipe.to(run_device)
        model_name = type(pipe).__name__
    pipe.set_progress_bar_config(disable=True)
    testbed = isinstance(pipe, TestbedPipeline)
    options: dict[str, Any] = {}
    if guidance is not None:
        options["guidance_scale"] = guidance
    if height is not None or width is not None:
        if testbed:
            raise EvalError(f"--height/--width do not apply to the testbed: its images are {IMAGE_SIZE}x{IMAGE_SIZE}")
        options.update({key: value for key, value in (("height", height), ("width", width)) if value is not None})

    judge = None
    if testbed and prompt_set.scenes is not None:
        from ..testbed.judge import load_judge

        judge = load_judge(IMAGE_SIZE).to(run_device)
    elif testbed:
        note("judge metrics (accuracy, FD) skipped: not every prompt is a testbed caption")
    else:
        note("judge metrics (accuracy, FD) are for the testbed only: null for this model")
    lpips_metric = None
    lpips_skip = lpips_status()
    if lpips_skip:
        note(lpips_skip)
    else:
        lpips_metric = make_lpips().to(run_device)
    clip_metric = None
    if clip_model is not None:
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPModel, CLIPProcessor

        clip_metric = CLIPScore(model_name_or_path=lambda: (ClipFeatures(CLIPModel.from_pretrained(clip_model)),
                                                            CLIPProcessor.from_pretrained(clip_model)))
        clip_metric.to(run_device)

    fd_features = JudgeFeatures(judge) if judge is not None else None
    fid_features = None
    real: dict[str, Any] = {}
    if references:
        from torchmetrics.image.fid import FrechetInceptionDistance

        real["fid"] = FrechetInceptionDistance(feature=inception_module(inception_weights),
                                               reset_real_features=False).to(run_device)
        fid_features = real["fid"].inception
    if fd_features is not None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        real["fd"] = FrechetInceptionDistance(feature=fd_features, normalize=True,
                                              reset_real_features=False).to(run_device)
    scores = {v.label: Scores(judge is not None, fd_features, lpips_metric is not None, clip_metric is not None,
                              fid_features).to(run_device) for v in variants}

    all_batches = batches_of(len(prompt_set.prompts), batch)
    my_batches = shard(all_batches, state.num_processes, state.process_index)
    out = Path(out) if out is not None else None
    grid_cells: list[tuple[str, int, np.ndarray]] = []

    with torch.no_grad():
        # Warm-up, untimed: first kernels and allocations must not count against the first variant timed.
        warm_prompts = [prompt_set.prompts[i] for i in all_batches[0]]
        for variant in variants:
            with _patched(pipe, variant, 0):
                image_shape = _generate(pipe, warm_prompts, min(steps, 2), 0, run_device, options).shape
        bar = tqdm(total=len(my_batches) * len(seeds) * len(variants), desc="tokenmerge eval", unit="call",
                   disable=not (progress and main))
        for batch_indices in my_batches:
            batch_prompts = [prompt_set.prompts[i] for i in batch_indices]
            batch_scenes = [prompt_set.scenes[i] for i in batch_indices] if judge is not None else None
            for seed_position, seed in enumerate(seeds):
                noise_seed = batch_seed(seed, batch_indices[0])
                turn = (batch_indices[0] // batch * len(seeds) + seed_position) % len(variants)
                outputs = {}
                for variant in variants[turn:] + variants[:turn]:  # rotate who runs first
                    with _patched(pipe, variant, noise_seed):
                        synchronize(run_device)
                        start = time.perf_counter()
                        outputs[variant.label] = _generate(pipe, batch_prompts, steps, noise_seed + variant.noise_offset,
                                                           run_device, options)
                        synchronize(run_device)
                        seconds = time.perf_counter() - start
                    scores[variant.label].metrics["seconds"].update(seconds)
                    scores[variant.label].metrics["images"].update(len(batch_indices))
                    bar.update(1)
                _score_batch(outputs, scores, batch_indices, batch_prompts, batch_scenes, seed, judge, real,
                             lpips_metric, clip_metric)
                for variant in variants:
                    images = to_uint8(outputs[variant.label]).permute(0, 2, 3, 1).cpu().numpy()
                    for index, image in zip(batch_indices, images):
                        if seed_position == 0 and index < grid_prompts:
                            grid_cells.append((variant.label, index, image))
                        if save_images and out is not None:
                            folder = out / "images" / variant.folder
                            folder.mkdir(parents=True, exist_ok=True)
                            Image.fromarray(image).save(folder / f"{index:05d}_seed{seed}.png")
        bar.close()
        my_references = shard(references, state.num_processes, state.process_index)
        for chunk in batches_of(len(my_references), batch):
            pixels = np.stack([load_reference_image(my_references[i], image_shape[2], image_shape[3]) for i in chunk])
            real["fid"].update(torch.from_numpy(pixels).permute(0, 3, 1, 2).to(run_device), real=True)

    # Every process computes (the metric states are summed across processes), in the same order.
    computed = {v.label: scores[v.label].compute(real) for v in variants}
    rows = _rows(variants, computed)
    grid_cells = gather_object(grid_cells)
    settings = {
        "model": model_name, "methods": [v.label for v in variants[1:]], "prompts": prompt_set.source,
        "count": len(prompt_set.prompts), "seeds": list(seeds), "steps": steps, "guidance": guidance,
        "batch": batch, "image_size": list(image_shape[2:]), "device": str(run_device), "dtype": dtype,
        "processes": state.num_processes, "grid_prompts": prompt_set.prompts[:grid_prompts],
    }
    result = EvalResult(rows, notes, settings)
    if main and out is not None:
        result.files = write_results(result, out, variants, grid_cells, grid_prompts, log)
    state.wait_for_everyone()
    return result


def _patched(pipe, variant: Variant, noise_seed: int):
    """The variant's patch for one call (a no-op context for the reference); unseeded configs get the call's seed."""
    import contextlib

    if variant.config is None:
        return contextlib.nullcontext(pipe)
    config = variant.config
    if config.seed is None:
        config = dataclasses.replace(config, seed=noise_seed)
    return patched(pipe, config)


def _score_batch(outputs: dict[str, torch.Tensor], scores: dict[str, Scores], batch_indices: list[int],
                 prompts: list[str], scenes: list[Scene] | None, seed: int, judge, real: dict[str, Any],
                 lpips_metric, clip_metric) -> None:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    reference = outputs[REFERENCE.label]
    if "fd" in real:
        from ..testbed.judge import to_tensor

        pixels = np.stack([np.asarray(render(scenes[k], reference.shape[-1], jitter_seed=real_jitter_seed(i, seed)))
                           for k, i in enumerate(batch_indices)])
        real["fd"].update(to_tensor(pixels).to(reference.device), real=True)
    for label, images in outputs.items():
        metrics = scores[label].metrics
        metrics["psnr"].update(peak_signal_noise_ratio(images, reference, data_range=1.0, reduction="none",
                                                       dim=(1, 2, 3)))
        metrics["ssim"].update(images, reference)
        if lpips_metric is not None:
            metrics["lpips"].update(lpips_metric(images, reference), weight=len(images))
            lpips_metric.reset()
        if judge is not None:
            for name, psnr in region_psnr(images, reference, scenes).items():
                metrics[name].update(psnr)
            correct = judge_correct(judge, images, scenes).float()
            metrics["accuracy"].update(correct.all(dim=1).float())
            for column, name in enumerate(ATTRIBUTES):
                metrics[f"accuracy_{name}"].update(correct[:, column])
            metrics["fd"].update(images, real=False)
        if clip_metric is not None:
            metrics["clip_score"].update(clip_metric(to_uint8(images), prompts), weight=len(images))
            clip_metric.reset()
        if "fid" in metrics:
            metrics["fid"].update(to_uint8(images), real=False)


def region_psnr(images: torch.Tensor, reference: torch.Tensor, scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    """Per-image PSNR (dB, data range 1) inside each scene's object region and over its background.

    The regions are :func:`tokenmerge.testbed.data.object_mask`'s: where the prompt's object is, and the rest.
    Tests the importance paper's claim directly: merging guided by importance keeps detail where the prompt
    matters.
    """
    size = images.shape[-1]
    inside = torch.from_numpy(np.stack([object_mask(scene, size) for scene in scenes])).to(images.device)
    error = (images.float() - reference.float()).square().mean(dim=1)  # (B, H, W), channel mean
    result = {}
    for name, region in (("psnr_object", inside), ("psnr_background", ~inside)):
        mse = (error * region).sum(dim=(1, 2)) / region.sum(dim=(1, 2)).clamp_min(1)
        result[name] = -10.0 * torch.log10(mse)  # inf where identical, as peak_signal_noise_ratio
    return result


def _rows(variants: list[Variant], computed: dict[str, dict[str, float | None]]) -> list[dict[str, Any]]:
    reference = computed[REFERENCE.label]
    reference_time = reference["seconds"] / reference["images"]
    rows = []
    for variant in variants:
        values = computed[variant.label]
        seconds = values["seconds"] / values["images"]
        row = {name: values.get(name) for name in ROW_FIELDS}
        row.update(method=variant.method, ratio=variant.ratio, seconds_per_image=seconds,
                   speedup=reference_time / seconds, n=int(values["images"]))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- outputs

def write_results(result: EvalResult, out: Path, variants: list[Variant], grid_cells, grid_prompts: int,
                  log: Callable[[str], None] = print) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / name for name in RESULT_FILES}
    payload = {"settings": result.settings, "notes": result.notes, "rows": [_json_row(r) for r in result.rows]}
    files["results.json"].write_text(json.dumps(payload, indent=2) + "\n")
    with files["results.csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=ROW_FIELDS)
        writer.writeheader()
        for row in result.rows:
            writer.writerow({key: _csv_value(row[key]) for key in ROW_FIELDS})
    table = markdown_table(result.rows)
    log(table)
    files["results.md"].write_text(_markdown_report(result, table))
    plot_quality(result.rows, files["quality_vs_speedup.png"])
    cells = {(label, index): image for label, index, image in grid_cells}
    columns = sorted({index for _, index in cells})[:grid_prompts]
    image_grid([[cells[(v.label, i)] for i in columns] for v in variants], [v.label for v in variants],
               [f"prompt {i}" for i in columns]).save(files["grid.png"])
    log("wrote " + ", ".join(str(path) for path in files.values()))
    return files


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    """Strict JSON: an infinite PSNR (identical images) is written as the string "inf"."""
    return {key: ("inf" if isinstance(value, float) and math.isinf(value) else value) for key, value in row.items()}


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.6g}"
    return value


COLUMNS = {  # row key -> (markdown header, format)
    "method": ("method", "{}"), "ratio": ("ratio", "{:g}"), "seconds_per_image": ("s / image", "{:.4g}"),
    "speedup": ("speed-up", "{:.2f}x"), "psnr": ("PSNR dB", "{:.2f}"), "psnr_object": ("PSNR object", "{:.2f}"),
    "psnr_background": ("PSNR background", "{:.2f}"), "ssim": ("SSIM", "{:.4f}"),
    "lpips": ("LPIPS", "{:.4f}"), "accuracy": ("accuracy", "{:.3f}"),
    **{f"accuracy_{name}": (name, "{:.3f}") for name in ATTRIBUTES},
    "fd": ("FD", "{:.3f}"), "clip_score": ("CLIP", "{:.2f}"), "fid": ("FID", "{:.2f}"), "n": ("n", "{}"),
}
ALWAYS_SHOWN = ("method", "ratio", "seconds_per_image", "speedup", "n")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table; a metric column nobody has a value for is left out."""
    keys = [key for key in COLUMNS if key in ALWAYS_SHOWN or any(row[key] is not None for row in rows)]
    return table_of([COLUMNS[key][0] for key in keys], ([_cell(row[key], COLUMNS[key][1]) for key in keys]
                                                        for row in rows))


def _cell(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return spec.format(value)


def _markdown_report(result: EvalResult, table: str) -> str:
    s = result.settings
    lines = [
        "# tokenmerge eval", "",
        f"Model: {s['model']}; prompts: {s['count']} from {s['prompts']}; seeds {s['seeds']}; {s['steps']} steps; "
        f"guidance {s['guidance'] if s['guidance'] is not None else 'pipeline default'}; batch {s['batch']}; "
        f"{s['device']} {s['dtype']}; {s['processes']} process(es).", "",
        table, "",
        "Fidelity (PSNR, SSIM, LPIPS) is against the unpatched images from the same seeds; the unpatched row "
        "compares them with themselves. Speed-up: unpatched seconds per image / the method's, in the same run.",
    ]
    if result.notes:
        lines += ["", *(f"- {note}" for note in result.notes)]
    lines += ["", "![quality against speed-up](quality_vs_speedup.png)", "", "![grid](grid.png)", "",
              "Grid columns:", *(f"{i}. {prompt}" for i, prompt in enumerate(s["grid_prompts"])), ""]
    return "\n".join(lines)


PLOTTED = (("accuracy", "condition accuracy"), ("fd", "FD (judge features)"), ("psnr", "PSNR dB"),
           ("ssim", "SSIM"), ("lpips", "LPIPS"), ("clip_score", "CLIP score"), ("fid", "FID"))


def plot_quality(rows: list[dict[str, Any]], path: Path) -> Path:
    """One panel per available quality metric against the measured speed-up; a line per method (its ratios)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def finite(value: Any) -> bool:
        return isinstance(value, (int, float)) and math.isfinite(value)

    panels = [(key, title) for key, title in PLOTTED if any(finite(row[key]) for row in rows)][:4]
    figure = Figure(figsize=(4.2 * max(1, len(panels)), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, max(1, len(panels)), squeeze=False)[0]
    methods = list(dict.fromkeys(row["method"] for row in rows if row["ratio"] is not None))
    for axis, (key, title) in zip(axes, panels):
        reference = [row for row in rows if row["ratio"] is None and finite(row[key])]
        if reference:
            axis.scatter([reference[0]["speedup"]], [reference[0][key]], marker="*", s=140, color="black",
                         label="unpatched", zorder=3)
        for method in methods:
            points = sorted((row["speedup"], row[key], row["ratio"]) for row in rows
                            if row["method"] == method and row["ratio"] is not None and finite(row[key]))
            if not points:
                continue
            xs, ys, ratios = zip(*points)
            axis.plot(xs, ys, marker="o", label=method)
            for x, y, ratio in points:
                axis.annotate(f"{ratio:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        axis.set_xlabel("measured speed-up (x)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    if not panels:
        axes[0].text(0.5, 0.5, "no quality metric available", ha="center", va="center")
    figure.savefig(path, dpi=110)
    return path


def image_grid(rows: list[list[np.ndarray]], row_labels: Sequence[str], column_labels: Sequence[str]) -> Image.Image:
    """Images in a table: a labelled row per variant, a labelled column per prompt; small images scaled up."""
    font = ImageFont.load_default()
    cells = [[Image.fromarray(image) for image in row] for row in rows]
    first = next((image for row in cells for image in row), Image.new("RGB", (GRID_CELL, GRID_CELL)))
    factor = max(1, GRID_CELL // max(first.size))
    cell_w, cell_h = first.width * factor, first.height * factor
    pad = 6
    label_w = max(int(font.getlength(label)) for label in row_labels) + 2 * pad
    text_h = font.getbbox("Ag")[3] + pad
    width = label_w + len(column_labels) * (cell_w + pad) + pad
    height = text_h + len(rows) * (cell_h + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(column_labels):
        draw.text((label_w + j * (cell_w + pad), pad // 2), label, fill=(0, 0, 0), font=font)
    for i, (label, row) in enumerate(zip(row_labels, cells)):
        top = text_h + i * (cell_h + pad)
        draw.text((pad, top + cell_h // 2 - text_h // 2), label, fill=(0, 0, 0), font=font)
        for j, image in enumerate(row):
            scaled = image.resize((cell_w, cell_h), Image.Resampling.NEAREST)
            canvas.paste(scaled, (label_w + j * (cell_w + pad), top))
    return canvas


# --------------------------------------------------------------------------------------------------- CLI

def register(commands) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to ``tokenmerge``'s subparsers."""
    parser = commands.add_parser(
        "eval", help="measure the quality and speed-up of merging methods against the unpatched model",
        description="Generate with every method x ratio and unpatched from the same seeds; write fidelity, "
                    "judge metrics (testbed), CLIP score and FID (real models, local weights), timings, a plot "
                    "and an image grid. See docs/quality.md.",
    )
    parser.add_argument("--model", help="pipeline folder (safetensors weights; a saved testbed too) or Hub id in "
                                        "the local cache; default: the shipped testbed generator")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f'comma-separated methods, each optionally with its ratio, e.g. "tome:0.5,importance:0.7";'
                             f' known: {", ".join(KNOWN_METHODS)} (default: all). The unpatched reference always runs')
    parser.add_argument("--ratios", type=number_list(float, "0.5,0.7"),
                        help="ratios for the methods named without one (every method x ratio); default: each "
                             "method's default ratio")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompts", type=Path,
                        help="text file, one prompt per line (or a COCO-style captions .json: first caption per image)")
    source.add_argument("--split", choices=tuple(SPLIT_SEEDS),
                        help=f"testbed split whose captions are the prompts (default {DEFAULT_SPLIT})")
    parser.add_argument("--count", type=positive_int,
                        help=f"number of prompts (default: {DEFAULT_COUNT} from a split, all of a file)")
    parser.add_argument("--seeds", type=number_list(int, "0,1,2"), default=(0,), help="seeds (default 0)")
    parser.add_argument("--steps", type=positive_int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the pipeline's)")
    parser.add_argument("--batch", type=positive_int, default=16, help="prompts per pipeline call (default 16)")
    parser.add_argument("--height", type=positive_int, help="image height (default: the model's; not the testbed)")
    parser.add_argument("--width", type=positive_int, help="image width (default: the model's; not the testbed)")
    parser.add_argument("--out", required=True, type=Path, help="folder for results.json/.csv/.md and the figures")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--clip-model", type=Path, help="local CLIP folder (e.g. openai/clip-vit-base-patch16): "
                                                        "adds CLIP score")
    parser.add_argument("--fid-reference", type=Path,
                        help="reference images for FID: a folder, or a COCO-style captions .json listing them")
    parser.add_argument("--inception-weights", type=Path,
                        help="FID Inception weights file (torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")
    parser.add_argument("--image-root", type=Path,
                        help="folder the COCO file's file_name entries are relative to (default: the file's folder)")
    parser.add_argument("--save-images", action="store_true",
                        help="also write every image to OUT/images/<method>-<ratio>/ (e.g. for clean-fid)")
    parser.add_argument("--grid-prompts", type=positive_int, default=6, help="prompts (columns) in grid.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--noise-floor", action="store_true",
                        help="add a row of the unpatched model from other noise: the sampling noise of accuracy and "
                             "FD, against which the methods' differences are read")
    parser.set_defaults(handler=run_eval, usage_error=parser.error)
    return parser


def run_eval(args: argparse.Namespace) -> EvalResult:
    try:
        return evaluate(
            args.model, methods=args.methods, ratios=args.ratios, prompts=args.prompts,
            split=args.split or DEFAULT_SPLIT, count=args.count, seeds=args.seeds, steps=args.steps,
            guidance=args.guidance, batch=args.batch, height=args.height, width=args.width, out=args.out,
            device=args.device, dtype=args.dtype, clip_model=args.clip_model, fid_reference=args.fid_reference,
            inception_weights=args.inception_weights, image_root=args.image_root, save_images=args.save_images,
            grid_prompts=args.grid_prompts, progress=not args.no_progress, noise_floor=args.noise_floor,
        )
    except EvalError as err:
        args.usage_error(str(err))
