"""The method mini-language of ``eval --methods`` (``tome[match=grid]:0.5``) and the rows it makes."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...methods.base import MethodConfig, config_fields
from ..caches import CacheSpec
from ..options import METHODS, UNPATCHED

KNOWN_METHODS = tuple(METHODS)

DEFAULT_METHODS = ",".join(KNOWN_METHODS)


class EvalError(ValueError):
    """A bad input to :func:`evaluate` (the CLI turns it into a usage error, exit code 2)."""


@dataclass(frozen=True)
class Variant:
    """One row of the results: a method at a ratio, or the unpatched reference (``config`` None)."""

    method: str
    config: MethodConfig | None = None
    #: Added to the noise seed: the noise-floor row is the unpatched model from other noise.
    noise_offset: int = 0
    #: A caching accelerator stacked with the method (``eval --cache``), or None.
    cache: CacheSpec | None = None

    @property
    def ratio(self) -> float | None:
        return None if self.config is None else self.config.ratio

    @property
    def name(self) -> str:
        """The results' method column: the method, with the cache stacked on it (the cache alone: its name)."""
        if self.cache is None:
            return self.method
        return self.cache.label if self.config is None else f"{self.method} + {self.cache.label}"

    @property
    def label(self) -> str:
        if self.config is None:
            return "unpatched" if self.noise_offset == 0 and self.cache is None else self.name
        merged = f"{self.method} {self.config.ratio:g}"
        return merged if self.cache is None else f"{merged} + {self.cache.label}"

    @property
    def folder(self) -> str:
        name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.method).strip("_")
        name = name if self.config is None else f"{name}-{self.config.ratio:g}"
        return name if self.cache is None else f"{name}+{re.sub(r'[^A-Za-z0-9_.=-]+', '_', self.cache.label)}"


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
