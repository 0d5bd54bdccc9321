"""Numerical verification: run a graph, compare outputs, and lint the pass contract."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fxopt.ir.derived import RELEASE_BYTES, release_freed_memory, version_of
from fxopt.ir.shapes import freeze_arguments, numel_hint

# Relative tolerance (max |a - b| over max |a|) an exact pass must meet, per dtype.
# Exact rewrites reorder float sums (merged weights, folded scales), so fp32 gets a few
# ulps of headroom times the depth of a typical reduction.
EXACT_RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 2e-2,
}


def exact_tolerance(dtype: torch.dtype) -> float:
    return EXACT_RTOL.get(dtype, 0.0)


def compiled_tolerance(gm: fx.GraphModule, output_dtype: torch.dtype) -> float:
    """The parity tolerance of a whole-graph compiler (Inductor, OpenVINO) on ``gm``: that of
    the lowest float precision the graph computes in, where below its outputs'. A compiler that
    fuses the code between two roundings of a bfloat16 graph keeps the value in float32 there,
    so its outputs differ from the graph's by bfloat16's rounding, not float32's."""
    limit = exact_tolerance(output_dtype)
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
            limit = max(limit, exact_tolerance(value.dtype))
    return limit


@dataclass
class Comparison:
    """How far ``actual`` is from ``expected``, over every output tensor."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    mismatch: str | None = None  # structural difference: shapes, dtypes, NaN pattern
    worst_dtype: torch.dtype = torch.float32

    def within(self, rtol: float | None = None) -> bool:
        if self.mismatch:
            return False
        limit = exact_tolerance(self.worst_dtype) if rtol is None else rtol
        return self.max_rel <= limit

    def failure(self, rtol: float | None = None) -> str | None:
        """Why :meth:`within` ``rtol`` fails (the structural mismatch, or the error over the
        limit); None when it holds."""
        if self.within(rtol):
            return None
        limit = exact_tolerance(self.worst_dtype) if rtol is None else rtol
        return self.mismatch or f"max relative error {self.max_rel:.3g} > {limit:g}"

    def merge(self, other: Comparison) -> Comparison:
        if other.max_rel >= self.max_rel:
            self.worst_dtype = other.worst_dtype
        self.max_abs = max(self.max_abs, other.max_abs)
        self.max_rel = max(self.max_rel, other.max_rel)
        self.mismatch = self.mismatch or other.mismatch
        return self


@dataclass(frozen=True)
class Parity:
    """What a backend checks its lowering against, handed to it by the session (computed by
    the verification, see :meth:`fxopt.pipeline.verification.Verification.parity`).

    ``inputs``/``outputs``: the optimized graph's outputs on its smallest verified batch (the
    fresh input, or a row slice when exact passes were verified on slices), or None. Once a
    lossy pass has applied, ``model_batches``/``model_outputs``: the model's outputs on every
    batch the passes were measured on (or those of a graph within ``model_drift``, max abs
    and relative error, of it), for a backend that computes differently from the graph to
    measure its own error against the model.
    """

    inputs: list[Any] | None = None
    outputs: list[Any] | None = None
    model_batches: list[list[Any]] | None = None
    model_outputs: list[list[Any]] | None = None
    model_drift: tuple[float, float] = (0.0, 0.0)

    def known(self) -> tuple[list[Any], list[Any]] | None:
        """The graph's verified (inputs, outputs), if any."""
        return (self.inputs, self.outputs) if self.inputs is not None and self.outputs is not None else None

    def error_against_model(self, run: Any) -> tuple[float, float] | None:
        """Max abs and relative error of ``run`` (a callable on a batch's flat inputs) against
        the model's outputs on every measured batch; None when unknown."""
        if self.model_batches is None or self.model_outputs is None:
            return None
        worst = Comparison()
        for batch, expected in zip(self.model_batches, self.model_outputs):
            worst.merge(compare_outputs(expected, list(run(*batch))))
        if worst.mismatch:
            return math.inf, math.inf
        drift_abs, drift_rel = self.model_drift
        return worst.max_abs + drift_abs, worst.max_rel + drift_rel


def same_inputs(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Whether two input lists are the same values: the same tensors or views of the same
    memory with the same sizes, strides and version (nothing wrote to them since)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if (x.data_ptr(), x.shape, x.stride(), x.dtype, x.device, x._version) != (
                    y.data_ptr(), y.shape, y.stride(), y.dtype, y.device, y._version):
                return False
        elif x is not y:
            return False
    return True


def run_graph(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> list[Any]:
    with torch.no_grad():
        out = gm(*inputs)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def compare_outputs(expected: Sequence[Any], actual: Sequence[Any]) -> Comparison:
    """Compare two flat output lists. Relative error is normalized per output tensor by
    its largest finite magnitude, so near-zero elements do not inflate it."""
    result = Comparison()
    if len(expected) != len(actual):
        result.mismatch = f"{len(actual)} outputs instead of {len(expected)}"
        return result
    for i, (a, b) in enumerate(zip(expected, actual)):
        result.merge(_compare_one(i, a, b))
    return result


def _compare_one(index: int, expected: Any, actual: Any) -> Comparison:
    out = Comparison()
    if not isinstance(expected, torch.Tensor):
        if expected != actual:
            out.mismatch = f"output {index} changed from {expected!r} to {actual!r}"
        return out
    if not isinstance(actual, torch.Tensor):
        out.mismatch = f"output {index} is no longer a tensor"
        return out
    if expected.shape != actual.shape:
        out.mismatch = f"output {index} shape changed from {tuple(expected.shape)} to {tuple(actual.shape)}"
        return out
    if expected.dtype != actual.dtype:
        out.mismatch = f"output {index} dtype changed from {expected.dtype} to {actual.dtype}"
        return out
    out.worst_dtype = expected.dtype
    if not expected.is_floating_point():
        if not torch.equal(expected, actual):
            out.mismatch = f"output {index} ({expected.dtype}) changed"
        return out
    e, a = expected.detach().double().cpu(), actual.detach().double().cpu()
    if bool(torch.isfinite(e).all()) and bool(torch.isfinite(a).all()):
        # The common case, without the masked copies below: the same maxima over the same elements.
        if e.numel():
            diff, scale = (e - a).abs().max().item(), e.abs().max().item()
            out.max_abs = diff
            out.max_rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
        return out
    e_nan, a_nan = torch.isnan(e), torch.isnan(a)
    if not torch.equal(e_nan, a_nan):
        out.mismatch = f"output {index}: NaN pattern changed ({int(e_nan.sum())} NaN before, {int(a_nan.sum())} after)"
        return out
    e_inf, a_inf = torch.isinf(e), torch.isinf(a)
    if not torch.equal(e_inf, a_inf) or not torch.equal(e[e_inf], a[a_inf]):
        out.mismatch = f"output {index}: infinities changed"
        return out
    finite = ~(e_nan | e_inf)
    if finite.any():
        diff = (e[finite] - a[finite]).abs().max().item()
        scale = e[finite].abs().max().item()
        out.max_abs = diff
        out.max_rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    return out


def lint(gm: fx.GraphModule) -> str | None:
    """A reason the graph is malformed, or None: fx lint, dangling attributes, outputs."""
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj: Any = gm
            for atom in str(node.target).split("."):
                obj = getattr(obj, atom, None)
            if obj is None:
                return f"node '{node.name}' reads attribute '{node.target}', which does not exist"
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    if len(outputs) != 1:
        return "graph must have exactly one output node"
    try:
        gm.graph.lint()
    except Exception as exc:
        return f"graph lint failed: {exc}"
    return None



def module_fingerprint(module: torch.nn.Module) -> tuple[Any, ...]:
    """Everything invariant 1 protects: module tree, train/eval flags, tensor versions."""
    tree = tuple((name, type(m).__name__, m.training) for name, m in module.named_modules())
    state = tuple(
        (name, t.data_ptr(), t._version, tuple(t.shape), t.dtype)
        for name, t in module.state_dict(keep_vars=True).items()
    )
    return tree, state


class ReusingRunner:
    """Runs graphs that differ from a graph run before in a few nodes (a lossy search's
    trials), reusing the values of the nodes they share instead of computing them again.

    A node is shared when the earlier graph has a node of the same name with the same op,
    target and arguments (inputs by name; a constant by the very tensor it reads) and all
    its inputs are shared: it then computes the same value from the same inputs, so its
    stored value is what running it again would give. Everything downstream of the first
    node that differs is computed. The runner keeps the values of its pinned graphs (the
    search's starting graph) and of the last ``keep`` graphs it ran, per batch (the last
    trial, and the one before it: the combination a rejected trial did not join), all within
    ``max_bytes`` of computed values (None: no bound). A run whose values would not fit keeps
    none: it frees each value after its last use, as generated code does, so that a trial
    through a large model holds only the values still live. Such a run keeps its outputs
    instead, for a later run of a graph whose live nodes are all the same (a search's final
    trial, then the graph its pass committed: the same function, with the trial's dead nodes
    removed); while the memory of every constant it read is alive, nothing else can be at
    its address.
    """

    def __init__(self, keep: int = 2, max_bytes: int | None = None) -> None:
        self.keep = keep
        self.max_bytes = max_bytes
        self.lean_runs = 0  # runs that kept no values (over max_bytes, or keep=0)
        self._pinned: dict[Any, tuple[dict[str, Any], dict[str, Any]]] = {}
        self._last: dict[Any, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
        # batch -> the last lean run's (live nodes' stamps, its memory, its output node's value)
        self._lean_outputs: dict[Any, tuple[dict[str, Any], list[weakref.ref], Any]] = {}
        self.computed = 0  # nodes computed (tests compare with the nodes reused)
        self.reused = 0

    def pinned(self, key: Any) -> bool:
        return key in self._pinned

    def pinned_bytes(self, key: Any) -> int:
        """Bytes of the computed values pinned for batch ``key`` (constants not counted: the
        graph holds those anyway)."""
        return _record_bytes(self._pinned[key]) if key in self._pinned else 0

    def _allowance(self, key: Any, pin: bool) -> int | None:
        """Bytes a new record for batch ``key`` may take: the bound less every record that
        stays (a new unpinned record pushes out the oldest beyond ``keep``)."""
        if not pin and self.keep <= 0:
            return 0
        if self.max_bytes is None:
            return None
        staying = [record for k, record in self._pinned.items() if not (pin and k == key)]
        for k, records in self._last.items():
            staying += records[: self.keep - 1] if (k == key and not pin) else records
        return self.max_bytes - sum(_record_bytes(record) for record in staying)

    def would_keep(self, gm: fx.GraphModule, key: Any, *, pin: bool = True) -> bool:
        """Whether a run of ``gm`` on batch ``key`` could keep its values: False when the
        values its nodes' recorded shapes add up to (views not counted) exceed what the bound
        leaves, so that a run made only to keep them is not made (True when nothing bounds
        them or a shape is unknown)."""
        allowance = self._allowance(key, pin)
        if allowance is None:
            return True
        estimate = _values_estimate(gm)
        return estimate is None or estimate <= allowance

    def has(self, key: Any) -> bool:
        """Whether any graph's values on batch ``key`` are kept (a run on it may reuse them)."""
        return key in self._pinned or bool(self._last.get(key))

    def carried_over(self, gm: fx.GraphModule) -> ReusingRunner | None:
        """A new runner with ``gm``'s values pinned on each batch this one holds a run of that
        very graph on (the verification's runs of the graph a lossy pass committed, or the
        pinned runs of the graph it started from, if it was rolled back); None when there is
        none. Only those records are carried: the next lossy pass starts from ``gm``."""
        stamps = _stamps(gm)
        carried = ReusingRunner(self.keep, self.max_bytes)
        for key in {*self._pinned, *self._last}:
            for record in (self._pinned.get(key), *self._last.get(key, [])):
                if record is not None and _whole_run_of(gm, stamps, record):
                    carried._pinned[key] = record
                    break
        return carried if carried._pinned else None

    def pinned_for(self, gm: fx.GraphModule, key: Any) -> bool:
        """Whether the graph pinned for batch ``key`` is ``gm`` (every node the same), so its
        values are ``gm``'s."""
        return key in self.pinned_keys_for(gm, [key])

    def pinned_keys_for(self, gm: fx.GraphModule, keys: Sequence[Any]) -> list[Any]:
        """Those of ``keys`` whose pinned graph is ``gm`` (see :meth:`pinned_for`)."""
        stamps = _stamps(gm) if any(key in self._pinned for key in keys) else {}
        return [key for key in keys if key in self._pinned and _whole_run_of(gm, stamps, self._pinned[key])]

    def pinned_values(self, key: Any) -> dict[str, Any]:
        """The value of every node, by name, of the graph pinned for batch ``key``."""
        return self._pinned[key][1]

    def run(self, gm: fx.GraphModule, inputs: Sequence[Any], key: Any = 0, *, pin: bool = False) -> list[Any]:
        """``gm``'s flat outputs on ``inputs`` (the batch called ``key``: the same tensors every call)."""
        stamps = _stamps(gm)
        flat = list(gm.graph._codegen.process_inputs(*inputs))
        # the live nodes, and the inputs' memory (a batch's key promises the same tensors: checked)
        live = {**_live_stamps(gm, stamps), "": tuple(map(_input_identity, flat))}
        known = self._lean_outputs.get(key)
        if known is not None and known[0] == live and all(ref() is not None for ref in known[1]):
            self.reused += sum(stamp[0] not in ("get_attr", "output", "placeholder") for name, stamp in live.items() if name)
            return _flat_outputs(gm, known[2])
        candidates = [c for c in (self._pinned.get(key), *self._last.get(key, [])) if c is not None]
        best: tuple[dict[str, Any], dict[str, Any]] | None = None
        best_clean: set[str] = set()
        for cached_stamps, cached_values in candidates:
            clean = _shared_nodes(gm, stamps, cached_stamps)
            if len(clean) > len(best_clean):
                best, best_clean = (cached_stamps, cached_values), clean
        env: dict[fx.Node, Any] = {}
        allowance = self._allowance(key, pin)
        # None once the run keeps nothing; from the start where the values' recorded shapes
        # alone exceed the allowance (a large model): kept until they did, they would raise
        # the compile's peak by the allowance for nothing
        values: dict[str, Any] | None = None if allowance is not None and _values_exceed(gm, allowance) else {}
        last_use = last_uses(gm) if allowance is not None else {}
        held: set[int] = set()  # storages the record would hold
        held_bytes = 0
        # the memory the outputs of a lean run depend on: the inputs', then each constant's
        constants: list[weakref.ref] | None = [weakref.ref(x.untyped_storage()) for x in flat
                                               if isinstance(x, torch.Tensor)]
        if any(identity[0] == "object" for identity in live[""]):
            constants = None  # an input known by its address alone, which a later one may take
        flat_inputs = iter(flat)
        output: Any = None
        with torch.no_grad():
            for index, node in enumerate(gm.graph.nodes):
                if node.op == "output":
                    output = fx.node.map_arg(node.args[0], env.__getitem__)
                    continue
                if node.op == "placeholder":
                    value = next(flat_inputs)
                elif best is not None and node.name in best_clean:
                    value = best[1][node.name]
                    self.reused += 1
                else:
                    value = run_node(gm, node, env.__getitem__)
                    self.computed += node.op != "get_attr"
                    if values is not None and allowance is not None and isinstance(value, torch.Tensor) \
                            and node.op != "get_attr":
                        storage = value.untyped_storage()
                        if storage.data_ptr() not in held:
                            held.add(storage.data_ptr())
                            held_bytes += storage.nbytes()
                        if held_bytes > allowance:
                            values = None
                env[node] = value
                if node.op == "get_attr" and node.name in live and constants is not None:
                    # its memory's: a trial's constant is a new tensor on memory that lives on
                    held_by = value.untyped_storage() if isinstance(value, torch.Tensor) else value
                    try:
                        constants.append(weakref.ref(held_by))
                    except TypeError:  # nothing can tell later that it is still alive
                        constants = None
                if values is not None:
                    values[node.name] = value
                else:  # keep only what a later node reads
                    drop_dead_values(node, env, [n for n in env if last_use[n] <= index], env.get,
                                     lambda n: n.op == "get_attr")
        if values is None:
            self.lean_runs += 1
            if constants is not None:
                self._lean_outputs[key] = (live, constants, output)
        elif pin:
            self._pinned[key] = (stamps, values)
        else:
            self._last[key] = [(stamps, values), *self._last.get(key, [])][: max(self.keep, 0)]
        return _flat_outputs(gm, output)


def _flat_outputs(gm: fx.GraphModule, output: Any) -> list[Any]:
    """``gm``'s flat outputs from its output node's value."""
    out = gm.graph._codegen.process_outputs(output)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _record_bytes(record: tuple[dict[str, Any], dict[str, Any]]) -> int:
    """Bytes of a record's computed values (constants not counted: the graph holds them)."""
    stamps, values = record
    storages: dict[int, int] = {}
    for name, value in values.items():
        if isinstance(value, torch.Tensor) and stamps.get(name, ("",))[0] != "get_attr":
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _values_estimate(gm: fx.GraphModule) -> int | None:
    """Bytes of the tensors ``gm``'s nodes compute, from their recorded shapes (``meta["val"]``;
    a symbolic size at its hint); a view's output shares its input's memory and is not
    counted. None when a node's value is unknown."""
    sizes = [_value_bytes(node) for node in gm.graph.nodes]
    return None if any(size is None for size in sizes) else sum(sizes)  # type: ignore[arg-type]


def _values_exceed(gm: fx.GraphModule, allowance: int) -> bool:
    """Whether the values of ``gm``'s nodes whose shapes are recorded already exceed ``allowance``."""
    return sum(_value_bytes(node) or 0 for node in gm.graph.nodes) > allowance


def _value_bytes(node: fx.Node) -> int | None:
    """Bytes of the tensors ``node`` computes (0 for a view or a node that computes nothing),
    from its recorded value; None where it is unknown."""
    if node.op not in ("call_function", "call_method", "call_module") or getattr(node.target, "is_view", False):
        return 0
    value = node.meta.get("val")
    if value is None:
        return None
    total = 0
    for item in value if isinstance(value, (tuple, list)) else [value]:
        if isinstance(item, torch.Tensor):
            total += numel_hint(item.shape) * item.element_size()
        elif item is not None and not isinstance(item, (int, float, bool, torch.SymInt)):
            return None
    return total


def last_uses(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """The position of the last node that reads each node (its own position when none does)."""
    last: dict[fx.Node, int] = {}
    for index, node in enumerate(gm.graph.nodes):
        last[node] = index
        for source in node.all_input_nodes:
            last[source] = index
    return last


def _stamps(gm: fx.GraphModule) -> dict[str, Any]:
    return {node.name: _node_stamp(gm, node) for node in gm.graph.nodes}


def _live_stamps(gm: fx.GraphModule, stamps: dict[str, Any]) -> dict[str, Any]:
    """The stamps of the output node and of the nodes it depends on (a dead node changes nothing)."""
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    live: dict[str, Any] = {output.name: stamps[output.name]}
    pending = list(output.all_input_nodes)
    while pending:
        node = pending.pop()
        if node.name not in live:
            live[node.name] = stamps[node.name]
            pending.extend(node.all_input_nodes)
    return live


def _whole_run_of(gm: fx.GraphModule, stamps: dict[str, Any], record: tuple[dict[str, Any], dict[str, Any]]) -> bool:
    """Whether ``record`` (stamps, values) is a run of ``gm`` itself: every node shared."""
    clean = _shared_nodes(gm, stamps, record[0])
    return all(node.name in clean for node in gm.graph.nodes if node.op != "output")


def _node_stamp(gm: fx.GraphModule, node: fx.Node) -> Any:
    if node.op == "get_attr":
        obj: Any = gm
        for atom in str(node.target).split("."):
            obj = getattr(obj, atom, None)
        return ("get_attr", node.target, _tensor_identity(obj))
    return (node.op, node.target, freeze_arguments(node.args, _tensor_identity),
            freeze_arguments(node.kwargs, _tensor_identity))


def _tensor_identity(obj: Any) -> Any:
    """The memory a constant reads (a detached copy of a tensor is the same constant); the
    stored values keep that memory alive, so no other tensor can take its address."""
    if not isinstance(obj, torch.Tensor):
        return ("object", id(obj))
    return ("tensor", obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape), obj.stride(),
            obj.dtype, obj.device, version_of(obj))


def _input_identity(value: Any) -> Any:
    """A graph input's memory (a tensor), its value (a number), else its address."""
    if isinstance(value, (bool, int, float, str, type(None))):
        return ("value", type(value).__name__, value)
    return _tensor_identity(value)


def _shared_nodes(gm: fx.GraphModule, stamps: dict[str, Any], cached: dict[str, Any]) -> set[str]:
    clean: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        if (node.op == "placeholder" or cached.get(node.name) == stamps[node.name]) and all(
                i.name in clean for i in node.all_input_nodes):
            clean.add(node.name)
    return clean


def drop_dead_values(node: fx.Node, env: dict[Any, Any], dead: Sequence[Any], read: Callable[[fx.Node], Any],
                     constant: Callable[[Any], bool]) -> None:
    """After ``node`` ran in a run that keeps only the live values: ``dead`` (the keys of the
    values it read last) leave ``env``, and the memory freed goes back to the system where
    :func:`worth_giving_back` says so (``constant(key)``: a key whose value is a graph constant,
    which dropping does not free; ``read`` gives a node's value)."""
    give_back = worth_giving_back(node, [env[key] for key in dead if not constant(key)], read)
    for key in dead:
        del env[key]
    if give_back:
        release_freed_memory()


def worth_giving_back(node: fx.Node, dropped: Sequence[Any], read: Callable[[fx.Node], Any]) -> bool:
    """In a run that keeps only the live values (a large model's), after ``node`` ran: whether
    the memory freed then is worth giving back to the system (``release_freed_memory``) before
    the next node makes its own. It is where ``dropped``, the values it read last, add up to a
    weight's size (a dequantized copy), or where ``node`` reads an integer weight that its op
    dequantizes inside (a float copy of the weight's size, freed before it returns; ``read``
    gives a node's value): not where its output is that copy (a dequantize node)."""
    if sum(v.untyped_storage().nbytes() for v in dropped if isinstance(v, torch.Tensor)) >= RELEASE_BYTES:
        return True
    weights = [weight.numel() for source in node.all_input_nodes
               if source.op == "get_attr" and isinstance(weight := read(source), torch.Tensor)
               and not weight.is_floating_point() and weight.numel() * 4 >= RELEASE_BYTES]
    out = read(node)
    return bool(weights) and not (isinstance(out, torch.Tensor) and out.numel() >= max(weights))


def run_node(gm: fx.GraphModule, node: fx.Node, value: Callable[[fx.Node], Any]) -> Any:
    """What ``node`` (not a placeholder or the output) of ``gm`` computes, its inputs' values
    given by ``value``."""
    args = fx.node.map_arg(node.args, value)
    kwargs = fx.node.map_arg(node.kwargs, value)
    if node.op == "get_attr":
        obj: Any = gm
        for atom in str(node.target).split("."):
            obj = getattr(obj, atom)
        return obj
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, node.target)(*rest, **kwargs)
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    raise ValueError(f"cannot run node {node.format_node()}")
