"""Reading a module call's arguments by name, wherever the caller put them (positionally or by keyword).

A hook sees ``(args, kwargs)`` as the caller wrote them: diffusers' blocks call ``attn1(norm_hidden_states,
encoder_hidden_states=..., attention_mask=...)``, a pipeline calls its U-Net with ``sample`` first and its PixArt
transformer with the timestep third. :class:`Signature` records, once per module when the hooks are installed,
where each argument of its ``forward`` sits, so the hooks read and replace ``hidden_states``, ``timestep`` or
``attention_mask`` by name; nothing is inspected during a call (``torch.compile`` traces plain indexing).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@dataclass(frozen=True)
class Signature:
    """The positions of a module's ``forward`` arguments (``self`` excluded)."""

    owner: str
    positions: dict[str, int]
    names: frozenset[str]
    takes_any: bool  # forward(**kwargs): any keyword is accepted

    @classmethod
    def of(cls, module: nn.Module) -> Signature:
        """Read from ``module.forward``; where a wrapper replaced it on the instance with a bare ``(*args,
        **kwargs)`` (DeepCache's ``DeepCacheSDHelper`` does, on the U-Net and its blocks), from its class's."""
        parameters = list(inspect.signature(module.forward).parameters.values())
        if all(p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for p in parameters):
            parameters = list(inspect.signature(type(module).forward).parameters.values())[1:]
        positional = [p.name for p in parameters if p.kind in _POSITIONAL]
        return cls(type(module).__name__, {name: i for i, name in enumerate(positional)},
                   frozenset(p.name for p in parameters),
                   any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters))

    @property
    def first(self) -> str:
        """The first positional argument: the tokens, for an attention, an MLP or a linear layer."""
        return min(self.positions, key=self.positions.get)

    def read(self, args: tuple, kwargs: dict, name: str, default: object = None) -> object:
        """The argument ``name`` of a call (``default`` when it was not passed)."""
        index = self.positions.get(name)
        if index is not None and index < len(args):
            return args[index]
        return kwargs.get(name, default)

    def replace(self, args: tuple, kwargs: dict, name: str, value: object) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with the argument ``name`` set to ``value``, where the caller put it."""
        index = self.positions.get(name)
        if index is not None and index < len(args):
            return (*args[:index], value, *args[index + 1:]), kwargs
        if not (name in self.names or self.takes_any):
            raise TypeError(f"{self.owner}.forward takes no argument {name!r}")
        return args, {**kwargs, name: value}
