"""generate() through torch.compile(lm.forward, backend="fxopt"): lossless decoding is
token-identical to eager, weight-only int8 agrees on teacher-forced tokens, and the number
of compiled graphs stays bounded (prefill and decode, static then dynamic)."""

from __future__ import annotations

import warnings

import pytest
import torch

from fxopt.frontends.dynamo import CompileLog

transformers = pytest.importorskip("transformers")

# Teacher-forced top-1 agreement of int8 weight-only (bfloat16 activations) with eager fp32 on
# this random model: measured 1.00 (18 of 18 positions, seed 0); random weights give flat logits,
# so a trained model agrees more, not less.
MIN_INT8_AGREEMENT = 0.9
MAX_GRAPHS = 4  # prefill and decode, each static first and dynamic after one recompile


def small_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).eval()


def compiled(passes: list[str], log: CompileLog) -> torch.nn.Module:
    lm = small_llama()
    lm.forward = torch.compile(lm.forward, backend="fxopt", options={"passes": passes, "log": log})
    return lm


def generate(lm: torch.nn.Module, ids: torch.Tensor, tokens: int = 8) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                           pad_token_id=0)


@pytest.mark.slow
def test_generate_lossless_is_token_identical_and_int8_weight_only_agrees_teacher_forced() -> None:
    torch._dynamo.reset()
    eager = small_llama()
    prompts = [torch.randint(0, 256, (2, 12)), torch.randint(0, 256, (2, 17))]
    expected = [generate(eager, ids) for ids in prompts]

    lossless_log = CompileLog()
    lossless = compiled(["remove-dropout"], lossless_log)
    for ids, want in zip(prompts, expected):
        assert torch.equal(generate(lossless, ids), want)
    assert all(r.fallback is None for r in lossless_log.records), str(lossless_log)
    assert lossless_log.compiles <= MAX_GRAPHS, str(lossless_log)

    int8_log = CompileLog()
    int8 = compiled(["remove-dropout", "quantize-weights"], int8_log)
    generated = generate(int8, prompts[0])
    assert generated.shape == expected[0].shape
    with torch.no_grad():
        teacher = expected[0]
        want = eager(teacher).logits.argmax(-1)[:, prompts[0].shape[1] - 1:]
        got = int8(teacher).logits.argmax(-1)[:, prompts[0].shape[1] - 1:]
    agreement = float((got == want).float().mean())
    assert agreement >= MIN_INT8_AGREEMENT, agreement
    assert int8_log.compiles <= MAX_GRAPHS, str(int8_log)
    quantized = [r.report for r in int8_log.records if r.fallback is None]
    assert quantized and all(any(p.name == "quantize-weights" and p.applied == 15 for p in report.passes)
                             for report in quantized), str(int8_log)
    torch._dynamo.reset()


def test_dynamic_true_specializes_the_python_int_logits_to_keep_and_guards_it() -> None:
    # transformers passes ``logits_to_keep`` as a plain int; with dynamic=True dynamo makes it a
    # graph input that no tensor size explains. fxopt takes it as a constant of the piece.
    torch._dynamo.reset()
    eager = small_llama()
    ids = torch.randint(0, 256, (2, 12))
    expected = generate(eager, ids, tokens=4)
    log = CompileLog()
    lm = small_llama()
    lm.forward = torch.compile(lm.forward, backend="fxopt", dynamic=True, options={"passes": ["remove-dropout"],
                                                                                "log": log})
    assert torch.equal(generate(lm, ids, tokens=4), expected)
    assert log.records and all(r.fallback is None for r in log.records), str(log)
    # Another value of the int reaches the same dynamo graph: the piece is optimized again for it.
    with torch.no_grad():
        for keep in (2, 3):
            want = eager(ids, logits_to_keep=keep).logits
            got = lm(ids, logits_to_keep=keep).logits
            assert got.shape == want.shape == (2, keep, 256)
            torch.testing.assert_close(got, want)
    direct = log.records[-1]
    assert direct.fallback is None and direct.reoptimized == 1, str(log)
    assert any("logits_to_keep' changed from 2 to 3" in note for note in direct.report.notes), str(log)
    torch._dynamo.reset()


# ---------------------------------------------------------------- fxopt.compile(lm, ids)


def _storages(module: torch.nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in module.buffers()}


@pytest.mark.slow
def test_fxopt_compile_of_a_generating_model_keeps_generate_with_few_graphs_and_shared_weights() -> None:
    import fxopt
    from fxopt.generation import GenerativeModule

    torch._dynamo.reset()
    eager = small_llama()
    before = {k: v.clone() for k, v in eager.state_dict().items()}
    prompt = torch.randint(0, 256, (1, 8))
    opt = fxopt.compile(eager, prompt)
    assert isinstance(opt, GenerativeModule)
    assert "forward" not in eager.__dict__  # the user's model is untouched
    # Prompts of 8 to 512 tokens, up to 256 new: at most 2 prefill and 2 decode graphs.
    for length, new in ((8, 256), (100, 16), (512, 8)):
        ids = torch.randint(0, 256, (1, length))
        assert torch.equal(generate(opt, ids, tokens=new), generate(eager, ids, tokens=new)), length
    assert opt.log.compiles <= MAX_GRAPHS and all(r.fallback is None for r in opt.log.records), str(opt.log)
    assert all(torch.equal(before[k], v) for k, v in eager.state_dict().items())
    # The graphs run on the model's own weights: the norms (no pass rewrites them) are its storage.
    model_storages = {p.untyped_storage().data_ptr() for p in eager.parameters()}
    for record in opt.log.records:
        graph = record.module().graph_module
        norms = [t for name, t in graph.named_buffers() if "norm" in name]
        assert norms and all(t.untyped_storage().data_ptr() in model_storages for t in norms), str(opt.log)
    torch._dynamo.reset()


@pytest.mark.slow
def test_the_prefill_and_decode_graphs_share_one_quantized_copy_of_each_weight(monkeypatch) -> None:
    import fxopt

    torch._dynamo.reset()
    eager = small_llama()
    # Measuring is on by default here; measure=False must reach the kernel choices of every graph.
    monkeypatch.setenv("FXOPT_MEASURE", "1")
    from fxopt.pipeline.timings import KernelTimings

    choose, sources = KernelTimings.choose, []
    monkeypatch.setattr(KernelTimings, "choose", lambda self, *a, **k: sources.append(
        (choice := choose(self, *a, **k)).source) or choice)
    opt = fxopt.compile(eager, torch.randint(0, 256, (1, 8)), passes=["remove-dropout", "merge-siblings",
                                                                      "quantize-weights"], measure=False)
    assert sources and "measured" not in sources, sources
    graphs = [record.module().graph_module for record in opt.log.records]
    assert len(graphs) >= 2, str(opt.log)
    packed = [{t.untyped_storage().data_ptr() for t in g.buffers() if t.dtype in (torch.int8, torch.uint8)}
              for g in graphs]
    assert packed[0] and all(p == packed[0] for p in packed[1:]), str(opt.log)
    torch._dynamo.reset()


def test_fxopt_compile_of_a_generating_model_refuses_what_it_cannot_do_and_says_why() -> None:
    import fxopt

    eager = small_llama()
    with pytest.raises(fxopt.InputError, match="preset: not supported when compiling a model that generates"):
        fxopt.compile(eager, torch.randint(0, 256, (1, 8)), preset="int8")
    with pytest.raises(fxopt.InputError, match="backend='openvino'"):
        fxopt.compile(eager, torch.randint(0, 256, (1, 8)), backend="openvino")


def test_derived_tensors_are_made_once_per_unchanged_source_and_live_with_their_users() -> None:
    import gc

    from fxopt.ir import derived
    from fxopt.ir.derived import entry_count

    weight = torch.randn(8, 4)
    made = []

    def quantize() -> tuple[torch.Tensor, torch.Tensor]:
        made.append(1)
        return (weight * 2).round().to(torch.int8), weight.abs().amax(1)

    def memory(tensors: tuple[torch.Tensor, ...]) -> list[int]:
        return [t.untyped_storage().data_ptr() for t in tensors]

    first = derived([weight], ("q", 8), quantize)
    held = first[0].detach()  # what a graph registers: another tensor object on the same memory
    again = derived([weight.detach()], ("q", 8), quantize)  # a detached view is the same source
    assert len(made) == 1 and memory(again) == memory(first) and torch.equal(again[0], first[0])
    assert memory(derived([weight], ("q", 4), quantize)) != memory(first) and len(made) == 2  # another key
    assert memory(derived([weight[:4]], ("q", 8), quantize)) != memory(first)  # another view
    with torch.no_grad():
        weight.mul_(2)  # an in-place write misses
    assert memory(derived([weight], ("q", 8), quantize)) != memory(first) and len(made) == 4
    del first, again, held
    kept = [t.detach() for t in derived([weight], ("q", 8), quantize)]  # as a graph holds them
    gc.collect()
    count = entry_count()
    assert count >= 1 and len(made) == 5  # the last one was dropped with its tensors: made again
    del kept
    gc.collect()
    assert entry_count() < count  # nothing kept alive that no graph holds


def test_what_is_derived_from_a_derived_tensor_outlives_it() -> None:
    """A graph merges weights, quantizes the merged one and drops the float copy; the next graph
    merges again (a new copy) and must find the first graph's quantized one, not make another."""
    import gc

    from fxopt.ir import derived

    q_proj, k_proj = torch.randn(8, 4), torch.randn(8, 4)
    made = []

    def merged() -> torch.Tensor:
        return torch.cat([q_proj, k_proj])

    def quantized(weight: torch.Tensor):  # noqa: ANN202
        return lambda: made.append(1) or (weight * 4).round().to(torch.int8)

    first_merge = derived([q_proj, k_proj], ("cat",), merged)
    held = derived([first_merge], ("q", 8), quantized(first_merge)).detach()  # what the first graph keeps
    del first_merge
    gc.collect()
    second_merge = derived([q_proj, k_proj], ("cat",), merged)  # the float copy is gone: merged again
    again = derived([second_merge], ("q", 8), quantized(second_merge))
    assert len(made) == 1 and again.untyped_storage().data_ptr() == held.untyped_storage().data_ptr()
    assert torch.equal(again, held)
    with torch.no_grad():
        k_proj.add_(1)  # a write to a root misses at every level
    third = derived([derived([q_proj, k_proj], ("cat",), merged)], ("q", 8), quantized(merged()))
    assert len(made) == 2 and third.untyped_storage().data_ptr() != held.untyped_storage().data_ptr()


def test_deriving_from_a_large_source_returns_the_freed_temporaries(monkeypatch) -> None:
    import importlib

    derived_module = importlib.import_module("fxopt.ir.derived")  # fxopt.ir.derived is also the function

    released = []
    monkeypatch.setattr(derived_module, "release_freed_memory", lambda: released.append(1))
    small, large = torch.randn(64, 64), torch.randn(derived_module.RELEASE_BYTES // 4 // 512 + 1, 512)
    derived_module.derived([small], ("x2",), lambda: small * 2)
    assert released == []
    derived_module.derived([large], ("x2",), lambda: large * 2)
    assert released == [1]
    monkeypatch.undo()
    derived_module.release_freed_memory()  # the real one runs anywhere (a no-op without glibc)


def test_a_source_returned_as_it_is_keeps_what_it_was_derived_from() -> None:
    """Packing an int8 weight may hand the int8 tensor back as the packed one: that must not
    change what the int8 tensor is keyed as, or the next graph's packing misses and copies."""
    from fxopt.ir import derived

    weight = torch.randn(8, 4)
    made = []
    quantized = derived([weight], ("q",), lambda: (weight * 4).round().to(torch.int8))

    def pack():  # noqa: ANN202
        made.append(1)
        return quantized, weight.abs().amax(1)  # the int8 values as they are, and new scales

    first = derived([quantized], ("pack",), pack)
    again = derived([derived([weight], ("q",), lambda: None)], ("pack",), pack)  # the next graph
    assert len(made) == 1 and again[1].untyped_storage().data_ptr() == first[1].untyped_storage().data_ptr()


@pytest.mark.slow
def test_generate_on_the_onnx_backend_exports_the_decode_graph_and_is_token_identical() -> None:
    """The decode graph's grouped-query attention has symbolic head counts (the cache's sizes
    are all dynamic); it exports with its key/value heads repeated instead of falling back."""
    pytest.importorskip("onnxruntime")
    import fxopt

    torch._dynamo.reset()
    eager = small_llama()
    prompt = torch.randint(0, 256, (1, 8))
    opt = fxopt.compile(eager, prompt, backend="onnx")
    ids = torch.randint(0, 256, (1, 12))
    assert torch.equal(generate(opt, ids, tokens=12), generate(eager, ids, tokens=12))
    assert opt.log.compiles <= MAX_GRAPHS and all(r.fallback is None for r in opt.log.records), str(opt.log)
    notes = [note for record in opt.log.records for note in record.report.notes]
    assert any(note.startswith("onnx-repeat-kv: 2 grouped-query attention(s)") for note in notes), notes
    assert all(record.report.backend == "onnx" for record in opt.log.records)
    torch._dynamo.reset()
