"""What the commands share on their command lines: the names they accept and the argparse types that parse them."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable

from ..methods import METHODS

#: The name of the unpatched model, the baseline of every table (``generate --method`` also takes ``none``).
UNPATCHED = "unpatched"
#: ``--attention``: how merged self-attention runs, as config fields (docs/methods.md, "Size-aware keys and K/V-only
#: merging"); "default" is each method's own, "plain" one key per slot with merged queries (the papers').
ATTENTION_MODES = {
    "default": {},
    "plain": {"proportional_attention": False, "merge_queries": True},
    "sized": {"proportional_attention": True, "merge_queries": True},
    "sized-channel": {"proportional_attention": True, "merge_queries": True, "bias_via": "channel"},
    "kv": {"proportional_attention": False, "merge_queries": False},
    "kv+sized": {"proportional_attention": True, "merge_queries": False},
    "kv+sized-channel": {"proportional_attention": True, "merge_queries": False, "bias_via": "channel"},
}

__all__ = ["ATTENTION_MODES", "METHODS", "UNPATCHED", "at_least", "name_list", "number_list", "parse_names",
           "positive_int", "ratio_list", "ratio_or_auto", "size_list", "step_list"]


def parse_names(text: str, known: Iterable[str], what: str) -> tuple[str, ...]:
    """``"a,b"`` -> ``("a", "b")``; a ``ValueError`` listing the known names for an unknown one."""
    known = tuple(known)
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ValueError(f"unknown {what} {', '.join(map(repr, unknown)) or repr(text)}; "
                         f"known {what}s: {', '.join(known)}")
    return names


def name_list(known: Iterable[str], what: str) -> Callable[[str], tuple[str, ...]]:
    """argparse type: comma-separated names from ``known``."""
    known = tuple(known)

    def parse(text: str) -> tuple[str, ...]:
        try:
            return parse_names(text, known, what)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: a whole number no smaller than ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


positive_int = at_least(1)


def number_list(kind: type, example: str) -> Callable[[str], tuple]:
    """argparse type: comma-separated numbers of ``kind``, at least one."""
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(part) for part in text.split(",") if part.strip())
        except ValueError:
            values = ()
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as {example}, got {text!r}")
        return values

    return parse


def ratio_list(text: str) -> tuple[float, ...]:
    """argparse type: merge ratios in (0, 1), e.g. ``0.3,0.5``."""
    ratios = number_list(float, "0.3,0.5")(text)
    if any(not 0 < ratio < 1 for ratio in ratios):
        raise argparse.ArgumentTypeError(f"expected merge ratios in (0, 1) such as 0.3,0.5; got {text!r}")
    return ratios


def ratio_or_auto(text: str) -> float | str:
    """argparse type of ``generate --ratio``: a number, or ``auto``."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a ratio such as 0.5, or 'auto'; got {text!r}") from None


def step_list(text: str) -> tuple[int, ...]:
    """argparse type of ``--map-steps``: ``"1,5,10"`` -> ``(1, 5, 10)``."""
    try:
        steps = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated step numbers such as 1,5,10, got {text!r}") from None
    if not steps or steps[0] < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative step numbers such as 1,5,10, got {text!r}")
    return steps


Size = int | tuple[int, int]  # pixels: one side of a square, or (height, width)


def size_list(text: str) -> tuple[Size, ...]:
    """argparse type: ``"512,960x640"`` -> ``(512, (960, 640))``: squares, or height x width."""
    try:
        sizes = tuple(int(part) if "x" not in part else tuple(map(int, part.split("x", 1)))
                      for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        sizes = ()
    sides = [side for size in sizes for side in ((size,) if isinstance(size, int) else size)]
    if not sizes or any(side < 8 or side % 8 for side in sides):
        raise argparse.ArgumentTypeError(f"expected image sizes in pixels, multiples of 8, such as 512,1024 or "
                                         f"960x640 (height x width); got {text!r}")
    return sizes


def one_size(text: str) -> Size:
    """argparse type: one image size, ``"1024"`` or ``"480x832"`` (height x width), as :func:`size_list` reads it."""
    sizes = size_list(text)
    if len(sizes) != 1:
        raise argparse.ArgumentTypeError(f"expected one image size, such as 1024 or 480x832; got {text!r}")
    return sizes[0]
