"""The batches a compilation verifies on: the example inputs, calibration batches, and one
fresh input drawn like the examples (other values, another batch size where it is dynamic)."""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx

from fxopt.errors import InputError
from fxopt.pipeline.instruments import user_stacklevel
from fxopt.pipeline.verification import DEFAULT_VERIFY_ROWS, row_slices
from fxopt.report import Report
from fxopt.signature import Signature
from fxopt.verify import run_graph


def check_keywords(model: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    try:
        inspect.signature(model.forward).bind(**kwargs)
    except TypeError as exc:
        raise InputError(
            "example_inputs must be a tuple of tensors (or one tensor), or a dict of the "
            f"model's keyword arguments; {type(model).__name__}.forward cannot take {sorted(kwargs)}: {exc}"
        ) from None
    except ValueError:
        pass  # no inspectable signature: export will say what is wrong


def inference_copy(model: torch.nn.Module, report: Report) -> torch.nn.Module:
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if not training:
        return model
    message = (
        f"model is in training mode ({', '.join(training[:3])}{'...' if len(training) > 3 else ''}); "
        "fxopt optimized an eval() copy and left your model as it was"
    )
    warnings.warn(f"fxopt: {message}", stacklevel=user_stacklevel())
    report.notes.append(message)
    return copy.deepcopy(model).eval()


def calibration_batches(signature: Signature, calibration: Iterable[Any] | None) -> list[list[torch.Tensor]]:
    if calibration is None:
        return []
    if isinstance(calibration, torch.Tensor):
        raise InputError("calibration must be an iterable of input tuples, e.g. [(x1,), (x2,)], not one tensor")
    return signature.flatten_each(calibration, "calibration")


def distinct_calibration(example: list[torch.Tensor], calibration: list[list[torch.Tensor]],
                          report: Report) -> list[list[torch.Tensor]]:
    """The calibration batches less copies of the example inputs or of an earlier batch, unless
    that leaves none: lossy passes fit on every other batch and verify on the rest, so a copy
    of a fitted batch in the held-out half would make the held-out check see no new data
    (``calibration=[example, other]`` is the common way to ask for it)."""
    kept: list[list[torch.Tensor]] = []
    for batch in calibration:
        if not any(_same_batch(batch, seen) for seen in (example, *kept)):
            kept.append(batch)
    if kept and len(kept) < len(calibration):
        dropped = len(calibration) - len(kept)
        report.notes.append(f"{dropped} calibration batch(es) identical to the example inputs or an earlier batch "
                            "left out, so that the held-out check sees other data")
        return kept
    return calibration


def _same_batch(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(
        (x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y))
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x is y or x == y
        for x, y in zip(a, b))


Run = tuple[list[Any], list[Any]]  # (inputs, outputs) of a graph


def fresh_batch(gm: fx.GraphModule, example: list[torch.Tensor],
                report: Report) -> tuple[list[torch.Tensor] | None, list[Run]]:
    """One more input drawn like the examples, to verify passes beyond the values (and the
    batch size) they were captured with, and the captured graph's run on it (the pass
    manager takes it as its reference); None, with a note, when the captured graph does
    not run cleanly on it."""
    try:
        fresh, described = fresh_inputs_like(gm, example)
        # Checked on the rows exact passes are verified on (all of them for a static batch);
        # the pass manager reuses these outputs as its reference on them.
        rows = _verified_rows(gm, fresh, fresh=True)
        try:
            outputs = run_graph(gm, rows)
        except Exception:
            if rows is fresh:
                raise
            rows = fresh  # not on a slice: the pass manager will verify on every row
            outputs = run_graph(gm, rows)
    except Exception as exc:
        report.notes.append(f"no fresh verification input: the captured graph fails on one ({type(exc).__name__})")
        return None, []
    if not _finite(outputs) and _finite(run_graph(gm, example if rows is fresh else _verified_rows(gm, example, False))):
        report.notes.append("no fresh verification input: the captured graph's outputs on one are not finite")
        return None, []
    report.notes.append(f"verified on the example inputs and one fresh input drawn like them ({described})")
    return fresh, [(rows, outputs)]


def _verified_rows(gm: fx.GraphModule, batch: list[torch.Tensor], fresh: bool) -> list[torch.Tensor]:
    cut = row_slices(gm, [batch], int(fresh), DEFAULT_VERIFY_ROWS)
    return cut[0] if cut else batch


def _finite(outputs: list[Any]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in outputs if isinstance(t, torch.Tensor) and t.is_floating_point())


def fresh_inputs_like(gm: fx.GraphModule, example: list[torch.Tensor]) -> tuple[list[torch.Tensor], str]:
    """Inputs like ``example`` with other values, and another batch size where it is dynamic.

    Float rows are random convex mixtures of the example's rows (a random rescaling when
    there is one row); integers are drawn among the example's values; booleans and 0/1
    masks repeat the example's pattern. Every size symbol that dim 0 of some input uses
    takes :func:`fresh_rows` of its example value; other dynamic sizes keep the example's
    value. Returns the inputs and a description for the report.
    """
    values = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    known: dict[Any, int] = {}  # size symbol -> its value in the examples
    grow: set[Any] = set()
    for value, tensor in zip(values, example):
        if not isinstance(value, torch.Tensor):
            continue
        for dim, size in enumerate(value.shape):
            if isinstance(size, int):
                continue
            expr = size.node.expr
            if expr.is_Symbol:
                known[expr] = int(tensor.shape[dim])
            if dim == 0:
                grow.update(expr.free_symbols)
    per_row = _linear_vectors_per_row(gm, known, grow)
    fresh_values = {s: fresh_rows(v, per_row) if s in grow else v for s, v in known.items()}
    shapes = []
    for value, tensor in zip(values, example):
        shape = list(tensor.shape)
        if isinstance(value, torch.Tensor):
            for dim, size in enumerate(value.shape):
                expr = None if isinstance(size, int) else size.node.expr
                if expr is not None and expr.free_symbols <= set(known):
                    shape[dim] = int(expr.subs({s: fresh_values[s] for s in expr.free_symbols}))
        shapes.append(shape)
    generator = torch.Generator().manual_seed(len(example))
    fresh = [_draw_like(tensor, shape, generator) for tensor, shape in zip(example, shapes)]
    sizes = {tuple(t.shape) for t in example} != {tuple(s) for s in map(tuple, shapes)}
    if not sizes:
        return fresh, "other values, same shapes"
    rows = {int(t.shape[0]) for t, shape in zip(example, shapes) if t.dim() and t.shape[0] != shape[0]}
    fresh_sizes = {shape[0] for t, shape in zip(example, shapes) if t.dim() and t.shape[0] != shape[0]}
    return fresh, f"other values, batch {'/'.join(map(str, sorted(fresh_sizes)))} instead of {'/'.join(map(str, sorted(rows)))}"


# A fresh input gives the median Linear at least this many input vectors (rows of the matrix
# it multiplies), so a lossy pass's error on it is a max over that many samples; see fresh_rows.
FRESH_VECTORS = 256


def fresh_rows(example_rows: int, vectors_per_row: int | None) -> int:
    """The fresh input's batch size where the batch is dynamic: one row more than the example,
    or fewer rows when each row gives the Linears many vectors (a sequence of tokens): as few
    as give the median Linear ``FRESH_VECTORS`` input vectors, at least ``DEFAULT_VERIFY_ROWS + 1``
    (the fresh input is then its own row slice, verified once for exact and lossy passes alike).
    Never the example's own size, so the fresh input exercises another batch size; a fresh
    run costs a fraction of an example run on sequence models (BERT-4L, 8 x 128: 3 rows)."""
    more = example_rows + 1
    if not vectors_per_row:
        return more
    rows = max(DEFAULT_VERIFY_ROWS + 1, -(-FRESH_VECTORS // vectors_per_row))
    if rows >= more:
        return more
    return rows if rows != example_rows else more


def _linear_vectors_per_row(gm: fx.GraphModule, known: dict[Any, int], batch: set[Any]) -> int | None:
    """How many input vectors one row of the dynamic batch gives the median Linear (its
    input's size over every dim but the last, per batch row); None without Linears."""
    from fxopt.ir.ops import call_nodes, ops

    counts = []
    for node in call_nodes(gm, ops.linear):
        value = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        if not isinstance(value, torch.Tensor) or value.dim() < 1:
            continue
        vectors = 1
        for size in value.shape[:-1]:
            if not isinstance(size, int):
                expr = size.node.expr
                if not expr.free_symbols <= set(known):
                    break
                size = expr.subs({s: 1 if s in batch else known[s] for s in expr.free_symbols})
                if not size.is_Integer:
                    break
            vectors *= int(size)
        else:
            counts.append(vectors)
    if not counts:
        return None
    return sorted(counts)[len(counts) // 2]


def _draw_like(example: torch.Tensor, shape: list[int], generator: torch.Generator) -> torch.Tensor:
    source = example.detach().cpu()
    if source.numel() == 0 or source.dim() == 0 or list(source.shape[1:]) != shape[1:]:
        return example.clone() if list(example.shape) == shape else torch.zeros(shape, dtype=example.dtype, device=example.device)
    rows = source.shape[0]
    if source.dtype == torch.bool or source.is_complex() or bool(((source == 0) | (source == 1)).all()):
        drawn = source.index_select(0, torch.arange(shape[0]) % rows)  # masks keep their pattern
    elif source.is_floating_point():
        if rows == 1:
            scale = torch.empty(shape[0], *[1] * (source.dim() - 1), dtype=torch.float64).uniform_(0.5, 1.5, generator=generator)
            drawn = (source.double() * scale).to(source.dtype)
        else:
            # Convex mixtures of the example rows: other values, each inside the examples'
            # range and span, so data confined to a subspace stays there (a lossy pass's
            # error on it is the error on data like the examples).
            weights = torch.empty(shape[0], rows, dtype=torch.float64).exponential_(generator=generator)
            weights = weights / weights.sum(1, keepdim=True)
            drawn = (weights @ source.double().reshape(rows, -1)).reshape(shape).to(source.dtype)
    else:
        pool = source.reshape(-1)  # integers (token ids, indices) are drawn among the examples' values
        picks = torch.randint(0, pool.numel(), (int(torch.Size(shape).numel()),), generator=generator)
        drawn = pool[picks].reshape(shape)
    return drawn.to(example.device)


def device_of(inputs: list[torch.Tensor]) -> torch.device:
    return inputs[0].device if inputs else torch.device("cpu")
