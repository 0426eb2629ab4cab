"""What ``eval`` generates from and compares with: prompts (testbed splits, text files, COCO captions), models."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...testbed.data import SPLIT_SEEDS, Scene, all_scenes, sample_scenes
from ..runtime import DTYPES, load_pipeline
from .variants import EvalError

DEFAULT_SPLIT = "heldout"

DEFAULT_COUNT = 200

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})


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


def load_model(model: str | Path | None = None, dtype: str = "float32"):
    """The testbed (``model`` None), a saved testbed folder, or any diffusers pipeline folder (safetensors)."""
    from ...testbed import pipeline as testbed

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
