"""Where the commands run: the device, the dtype, syncing it, and loading a pipeline from safetensors weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..calibrate import timed

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

__all__ = ["DTYPES", "load_pipeline", "resolve_device", "synchronize", "timed"]


def resolve_device(name: str, usage_error: Callable[[str], None]) -> torch.device:
    """``auto`` (CUDA when torch sees one), ``cpu``, ``cuda`` or ``cuda:N``; a usage error for CUDA without one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        usage_error(f"--device {name}, but torch sees no CUDA device (torch.cuda.is_available() is False)")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queue (a no-op on CPU): wall-clock timing on both sides of a call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_pipeline(model: str, dtype: torch.dtype):
    """Load a pipeline from safetensors weights only (never pickle), turning the usual failures into advice."""
    from diffusers import DiffusionPipeline  # here, not at the top: importing diffusers takes seconds (--help)

    folder = Path(model).expanduser()
    if not folder.exists() and looks_like_path(model):
        raise SystemExit(
            f"tokenmerge: the pipeline folder {model} does not exist. Pass a folder saved with "
            "pipe.save_pretrained(DIR), or a Hugging Face Hub id (owner/name) already in the local cache."
        )
    if folder.is_file():
        raise SystemExit(
            f"tokenmerge: {model} is a file; --model takes a pipeline folder (with model_index.json, saved with "
            "pipe.save_pretrained(DIR)) or a Hugging Face Hub id (owner/name)"
        )
    if folder.is_dir() and not any(folder.rglob("*.safetensors")):
        raise SystemExit(
            f"tokenmerge: the pipeline folder {model} has no .safetensors weights; tokenmerge never loads "
            "pickle (.bin/.ckpt) weights. Re-save it with pipe.save_pretrained(DIR, safe_serialization=True)."
        )
    # float32 is the default; asking for it by name only draws diffusers' torch_dtype deprecation warning.
    # (Loading in the dtype, rather than casting afterwards, keeps a model's float32-only modules in float32.)
    dtype_option = {} if dtype == torch.float32 else {"torch_dtype": dtype}
    try:
        return DiffusionPipeline.from_pretrained(model, use_safetensors=True, **dtype_option)
    except OSError as err:
        if folder.is_dir():
            raise SystemExit(f"tokenmerge: could not load the pipeline folder {model}: {err}") from err
        raise SystemExit(hub_failure_message(model, err)) from err
    except ValueError as err:  # diffusers: "neither a valid local path nor a valid repo id"
        if folder.is_dir():
            raise
        raise SystemExit(hub_failure_message(model, err)) from err


def looks_like_path(model: str) -> bool:
    """A local path rather than a Hub id (``owner/name``, or a bare ``name``): absolute, relative with ``.``, ``~``,
    a trailing or Windows separator, or more than one ``/``."""
    return (model.startswith(("/", "./", "../", "~", ".\\")) or model in (".", "..") or "\\" in model
            or model.endswith("/") or model.count("/") > 1)


def hub_failure_message(model: str, err: Exception) -> str:
    return (
        f"tokenmerge: could not load {model!r}: it is not a local folder, and loading it from the Hugging Face "
        f"Hub failed (no network, no such model, or not in the local cache): {err}\n"
        "Pass a local pipeline folder with --model DIR instead: one saved with pipe.save_pretrained(DIR), "
        f"or one downloaded elsewhere with `hf download {model} --local-dir DIR` (huggingface-cli download "
        "in older huggingface_hub)."
    )
