"""The signature of a captured model: what it takes and returns, checked on every call.

``Signature`` keeps the pytree specs of the call and the result and each input's dtype and
static sizes, so the optimized module takes and returns exactly what the model does and
rejects a wrong input with a one-line error naming it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from fxopt.errors import InputError


@dataclass(frozen=True)
class InputSpec:
    """What one flat tensor input must look like; ``None`` in ``shape`` is a dynamic size.

    ``example`` is the example input's shape (every size concrete), for messages and for
    building inputs of the right form (saving, fresh verification inputs).
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: torch.dtype
    example: tuple[int, ...] | None = None

    @property
    def example_shape(self) -> tuple[int, ...]:
        if self.example is not None:
            return self.example
        return tuple(1 if d is None else d for d in self.shape)

    def describe(self) -> str:
        if self.example is None:
            dims = ", ".join("*" if d is None else str(d) for d in self.shape)
            return f"shape ({dims}) and dtype {self.dtype}"
        dims = ", ".join(str(d) for d in self.example)
        dynamic = [str(i) for i, d in enumerate(self.shape) if d is None]
        free = f" (dim {', '.join(dynamic)} of any size)" if dynamic else ""
        return f"shape ({dims}){free} and dtype {self.dtype}"


@dataclass
class Signature:
    """How the user's call maps to the graph's flat inputs and back."""

    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    inputs: list[InputSpec]
    leaf_names: list[str]

    def flatten(self, args: Sequence[Any], kwargs: Mapping[str, Any] | None = None, *, what: str = "input") -> list[torch.Tensor]:
        """Flatten a call's arguments into the graph's inputs, checking each one."""
        if not kwargs and len(args) == self._positional_tensors and all(isinstance(a, torch.Tensor) for a in args):
            flat = list(args)  # the model takes tensors only, as given: no tree to walk on every call
        else:
            flat, spec = pytree.tree_flatten((tuple(args), self._in_captured_order(kwargs)))
            if spec != self.in_spec:
                expected = _describe_structure(self.in_spec)
                got = _describe_structure(spec)
                raise InputError(f"{what} structure does not match the captured model: expected {expected}, got {got}")
        tensors: list[torch.Tensor] = []
        for position, (leaf, spec_entry) in enumerate(zip(flat, self.inputs)):
            check_input(leaf, spec_entry, position, what=what, all_inputs=self.inputs)
            tensors.append(leaf)
        return tensors

    def flatten_each(self, batches: Iterable[Any], what: str) -> list[list[torch.Tensor]]:
        """:meth:`flatten` of each batch (a tuple of inputs, one tensor, or a dict of keyword
        inputs), an error naming the batch (``"{what} batch {index}, input"``)."""
        return [self.flatten(*split_example_inputs(batch), what=f"{what} batch {index}, input")
                for index, batch in enumerate(batches)]

    def unflatten(self, outputs: Sequence[Any]) -> Any:
        if self.out_spec.is_leaf():  # one tensor out
            return outputs[0]
        return pytree.tree_unflatten(list(outputs), self.out_spec)

    @functools.cached_property
    def _positional_tensors(self) -> int:
        """N where the model takes N positional tensors and nothing else, else -1 (found once:
        the optimized module's every call asks)."""
        n = self.in_spec.num_leaves
        _, plain = pytree.tree_flatten((tuple(range(n)), {}))
        return n if plain == self.in_spec else -1

    def _in_captured_order(self, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
        # Keyword order is not part of a call's meaning, but it is part of a pytree spec.
        kwargs = dict(kwargs or {})
        keys = list(_children(self.in_spec)[1].context or [])
        if set(keys) == set(kwargs):
            return {key: kwargs[key] for key in keys}
        return kwargs


def _children(spec: pytree.TreeSpec) -> list[pytree.TreeSpec]:
    children = getattr(spec, "children", None)  # torch 2.10+; children_specs before
    return list(children()) if callable(children) else list(spec.children_specs)


def _describe_structure(spec: pytree.TreeSpec) -> str:
    args_spec, kwargs_spec = _children(spec)
    n_args = args_spec.num_leaves
    keys = list(kwargs_spec.context or [])
    text = f"{n_args} positional tensor(s)"
    if keys:
        text += f" and keyword(s) {keys}"
    return text


def check_input(value: Any, spec: InputSpec, position: int, *, what: str = "input",
                all_inputs: Sequence[InputSpec] = ()) -> None:
    label = f"{what} {position} ('{spec.name}')"
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{label}: expected a tensor with {spec.describe()}, got {type(value).__name__}")
    if value.dtype != spec.dtype:
        raise InputError(f"{label}: expected dtype {spec.dtype}, got {value.dtype}")
    if value.dim() != len(spec.shape) or any(
        want is not None and want != got for want, got in zip(spec.shape, value.shape)
    ):
        got_dims = ", ".join(str(d) for d in value.shape)
        message = f"{label}: expected {spec.describe()}, got shape ({got_dims})"
        static = [i for i, (want, got) in enumerate(zip(spec.shape, value.shape)) if want is not None and want != got]
        if value.dim() == len(spec.shape) and static:
            dim = static[0]
            message += f"; dim {dim} was captured static"
            if spec.shape[dim] == 1:
                message += (" because the example's size there is 1 (export keeps sizes 0 and 1 static); "
                            "to make it dynamic, compile with examples that have a batch of 2 or more")
            else:
                message += f"; to make it dynamic, compile with dynamic_shapes={_dynamic_hint(spec, dim, all_inputs)}"
            message += " (see docs/shapes-and-saving.md)"
        raise InputError(message)


def _dynamic_hint(spec: InputSpec, dim: int, all_inputs: Sequence[InputSpec]) -> str:
    """A ``dynamic_shapes`` spec that makes ``dim`` of ``spec`` dynamic and keeps what is
    dynamic now: a spec given by hand replaces the default dynamic batch, and export wants an
    entry for every input, the same dimension dynamic in every input of the same size there.
    ``Dim.AUTO`` lets export find the bounds the model needs (its position table, say)."""
    size = spec.example_shape[dim]
    entries = []
    for other in all_inputs or [spec]:
        dims = {d for d, want in enumerate(other.shape) if want is None}
        if other is spec or (len(other.shape) > dim and other.shape[dim] is not None
                             and other.example_shape[dim] == size):
            dims.add(dim)
        value = "{" + ", ".join(f"{d}: Dim.AUTO" for d in sorted(dims)) + "}" if dims else "None"
        entries.append(f"'{other.name}': {value}")
    return "{" + ", ".join(entries) + "} (Dim is torch.export.Dim)"


def normalize_example_inputs(example_inputs: Any) -> tuple[Any, ...]:
    """Accept a tuple/list of inputs, or one tensor; refuse anything else with a clear error."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs
    if example_inputs is None:
        raise InputError("example_inputs is required: a tuple of tensors the model can be called with")
    raise InputError(
        f"example_inputs must be a tuple of tensors (or one tensor), got {type(example_inputs).__name__}"
    )


def split_example_inputs(
    example_inputs: Any, example_kwargs: Mapping[str, Any] | None = None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword example inputs: a mapping (``{"input_ids": ..., ...}``, a
    tokenizer's ``BatchEncoding``) is keyword arguments, anything else goes through
    :func:`normalize_example_inputs`."""
    if isinstance(example_inputs, Mapping):
        kwargs = dict(example_inputs)
        overlap = sorted(set(kwargs) & set(example_kwargs or {}))
        if overlap:
            raise InputError(f"keyword input(s) {overlap} given both in example_inputs and example_kwargs")
        kwargs.update(example_kwargs or {})
        if not kwargs:
            raise InputError("example_inputs is an empty mapping; give the model's inputs by name")
        return (), kwargs
    return normalize_example_inputs(example_inputs), dict(example_kwargs or {})
