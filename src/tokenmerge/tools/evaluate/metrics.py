"""``eval``'s metrics: fidelity (PSNR by region, SSIM, LPIPS), the testbed judge's accuracy, FD/FID, CLIP score."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ...testbed.data import ATTRIBUTES, Scene, object_mask

ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"  # what torchvision (hence torchmetrics' LPIPS) loads for AlexNet


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
    from ...testbed.judge import label_tensor

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
