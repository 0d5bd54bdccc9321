"""Tensors derived from frozen constants (quantized, packed), made once per source.

Several graphs of one model hold the same weight tensors when they share the model's weights:
torch.compile hands a causal LM's prefill and its decode steps to fxopt as separate graphs, and
each one quantizes and packs every Linear. A pass or lowering that derives tensors from a
constant asks :func:`derived` first, so those graphs share one derived copy instead of each
holding its own (an int8 Llama's resident weights would otherwise grow by a copy per graph).

An entry is found only while its sources are the very tensors it was made from, unchanged: it
is keyed by the first source's storage (held weakly, so a freed weight drops its entries), the
view of each source (storage, offset, shape, stride, dtype: a detached view of a weight finds
what the weight made) and each source's version counter (an in-place write misses), plus the
caller's ``key`` (what was derived, and how). It lives as long as the derived tensors' memory does
(weak references to their storages; an opaque result such as oneDNN's packed weight, which has
no storage, or a quantized engine's packed weight, by a weak reference to itself): nothing here keeps memory alive that no graph holds.

A source that was itself derived here stands for what it was derived from: quantizing a merged
weight is keyed by the weights merged and both derivations, not by the merged tensor. So once a
graph dropped its float merged copy (quantized, it needs it no more), the next graph merges again
and still finds the quantized copy the first one holds, instead of making a second.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")

_ENTRIES: weakref.WeakKeyDictionary[torch.UntypedStorage, dict[Hashable, _Entry]] = weakref.WeakKeyDictionary()


# A derived tensor's storage (memory made here, not a source returned as is) -> (its roots'
# storages, the full key it was made under, its place in the result): a derivation from it is
# keyed by those, which outlive it.
_ORIGIN: weakref.WeakKeyDictionary[torch.UntypedStorage, tuple[list[weakref.ref], Hashable, int]] = \
    weakref.WeakKeyDictionary()


class _Entry:
    __slots__ = ("single", "storages", "values")

    def __init__(self, storages: list[weakref.ref], values: list[tuple | None], single: bool) -> None:
        self.storages = storages  # the sources' storages, to tell a reused address from the source
        # Each derived tensor as a weak reference to its storage and its view: a graph registers a
        # detached view of it (another tensor object), so it is the storage that lives on.
        self.values = values
        self.single = single  # make() gave one tensor, not a tuple

    def alive(self) -> bool:
        return all(value is None or value[0]() is not None for value in self.values)

    def tensors(self) -> list[torch.Tensor | None] | None:
        parts = []
        for value in self.values:
            if value is None:
                parts.append(None)
                continue
            storage = value[0]()
            if storage is None:
                return None
            if len(value) == 1:  # an opaque tensor, held as itself
                parts.append(storage)
                continue
            offset, shape, stride, dtype = value[1:]
            parts.append(torch.empty(0, dtype=dtype, device=storage.device).set_(storage, offset, shape, stride))
        return parts


def derived(sources: Sequence[torch.Tensor | None], key: Hashable,
            make: Callable[[], T]) -> T:
    """``make()`` (a tensor, an opaque packed weight, or a tuple of those and Nones) computed
    once for ``sources``.

    ``key`` names the derivation and its options (``("int8-weights", 8, None)``); the same
    sources and key give tensors on the same memory while it lives. Under a fake or functional
    mode, or when the result is not made of plain tensors, ``make()`` runs every time.
    """
    tensors = [s for s in sources if s is not None]
    if not tensors or any(_untracked(t) for t in tensors):
        return make()
    roots, described = [], []
    for source in sources:
        origin = None if source is None else _ORIGIN.get(source.untyped_storage())
        origin_roots = None if origin is None else [ref() for ref in origin[0]]
        if origin is None or any(root is None for root in origin_roots):
            described.append(None if source is None else _view(source))
            origin_roots = [] if source is None else [source.untyped_storage()]
        else:  # derived here: what it was made from, how, and which view of it
            described.append(("derived", origin[1], origin[2], _view(source)[1:5]))
        roots.extend(root for root in origin_roots if all(root is not r for r in roots))
    full_key = (key, tuple(described))
    per_storage = _ENTRIES.setdefault(roots[0], {})
    entry = per_storage.get(full_key)
    if entry is not None and len(entry.storages) == len(roots) and all(
            ref() is root for ref, root in zip(entry.storages, roots)):
        parts = entry.tensors()
        if parts is not None:
            return parts[0] if entry.single else tuple(parts)  # type: ignore[return-value]
    for stale in [k for k, e in per_storage.items() if not e.alive()]:
        del per_storage[stale]
    value = make()
    if sum(t.untyped_storage().nbytes() for t in tensors) >= RELEASE_BYTES:
        release_freed_memory()
    parts = list(value) if isinstance(value, tuple) else [value]
    if not all(p is None or isinstance(p, torch.ScriptObject) or (isinstance(p, torch.Tensor) and not _untracked(p))
               for p in parts):
        return value
    sources_memory = {t.untyped_storage().data_ptr() for t in tensors}  # make() may return a source as is
    root_refs = [weakref.ref(root) for root in roots]
    for index, part in enumerate(parts):
        if isinstance(part, torch.Tensor) and not part.is_mkldnn \
                and part.untyped_storage().data_ptr() not in sources_memory:
            _ORIGIN[part.untyped_storage()] = (root_refs, full_key, index)
    per_storage[full_key] = _Entry(root_refs, [None if p is None else _held(p) for p in parts],
                                   single=not isinstance(value, tuple))
    return value


def share_as(made: torch.Tensor, instead: torch.Tensor) -> None:
    """From now on the derivation that made ``made`` gives ``instead``: the same values, held
    elsewhere (a sibling's int8 weight as its rows of the merged weight), so that deriving them
    again finds what is held instead of making a copy ``made``'s holders have let go of. A
    tensor not made here, or of another shape or dtype, is left as it is."""
    origin = _ORIGIN.get(made.untyped_storage())
    if origin is None or made.shape != instead.shape or made.dtype != instead.dtype:
        return
    roots = [ref() for ref in origin[0]]
    entry = None if any(r is None for r in roots) else _ENTRIES.get(roots[0], {}).get(origin[1])
    if entry is None or origin[2] >= len(entry.values) or entry.values[origin[2]] is None:
        return
    # Only the derived tensor itself is re-pointed: ``made`` may be some rows of it (siblings
    # quantized into one tensor), which do not stand for the whole.
    if len(entry.values[origin[2]]) > 1 and entry.values[origin[2]][1:] != _held(made)[1:]:
        return
    entry.values[origin[2]] = _held(instead)


def stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(tensors)`` along dim 0, without a copy where they are consecutive rows of one
    memory (a merged weight's rows, each shared as a sibling's: :func:`share_as`)."""
    first = tensors[0]
    storage, offset = first.untyped_storage(), first.storage_offset()
    for tensor in tensors:
        if (tensor.untyped_storage().data_ptr() != storage.data_ptr() or tensor.storage_offset() != offset
                or not tensor.is_contiguous() or tensor.dtype != first.dtype or tensor.shape[1:] != first.shape[1:]):
            return torch.cat(list(tensors), 0)
        offset += tensor.numel()
    rows = sum(int(t.shape[0]) for t in tensors)
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(
        storage, first.storage_offset(), (rows, *first.shape[1:]))


# Deriving from a source this large frees temporaries of about its size (float32 copies of a
# block, rounding, clipping): returned to the system at once, not kept by the C allocator.
RELEASE_BYTES = 8 << 20


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: its allocator decides
        return None


def release_freed_memory() -> None:
    """Give the memory freed so far back to the system (glibc's ``malloc_trim``; elsewhere a
    no-op). glibc keeps freed blocks of up to 32 MB for reuse, and between the int8 copies a
    large model's quantization leaves, they add up: a 1.1B Llama's int8 compile kept 1.1 GB so."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def collect_let_go() -> None:
    """Collect what was let go and give its memory back to the system: a graph module and its
    graph refer to each other, so the weights of one that was dropped wait for a collection, and
    glibc keeps what is freed for reuse (:func:`release_freed_memory`)."""
    gc.collect()
    release_freed_memory()


def _held(part: torch.Tensor | torch.ScriptObject) -> tuple:
    """How an entry holds a derived tensor: its storage (weakly) and its view, or for an opaque
    one (oneDNN's packed layout has no storage to view; a quantized engine's packed weight is
    no tensor) the object itself, weakly."""
    if not isinstance(part, torch.Tensor) or part.is_mkldnn:
        return (weakref.ref(part),)
    return (weakref.ref(part.untyped_storage()), part.storage_offset(), tuple(part.shape), tuple(part.stride()),
            part.dtype)


def version_of(tensor: torch.Tensor) -> int | None:
    """``tensor._version``, or None for a derived tensor: one is never written (a pass never
    writes a constant in place) and comes back as a new tensor object with a version counter
    of its own, so its version says nothing."""
    return None if tensor.untyped_storage() in _ORIGIN else tensor._version


def _view(tensor: torch.Tensor) -> tuple:
    storage = tensor.untyped_storage()
    version = version_of(tensor)
    return (storage.data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()),
            tensor.dtype, tensor.device, version)


def _untracked(tensor: torch.Tensor) -> bool:
    """Fake, functional and other tensor subclasses have no storage worth keying on."""
    return type(tensor) is not torch.Tensor and not isinstance(tensor, torch.nn.Parameter)


def entry_count() -> int:
    """Entries whose derived tensors are still alive."""
    return sum(e.alive() for entries in _ENTRIES.values() for e in entries.values())
