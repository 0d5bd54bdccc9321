"""Every zoo architecture compiled for a backend, saved with fxopt.save, loaded in a fresh
process with fxopt.load, its outputs compared with the compiled module's (bit for bit).

    python tests/zoo_roundtrip.py BACKEND [PASSES]     # e.g. inductor, or openvino remove-dropout,quantize-int8

A script, not a test: each architecture takes 5-20 s (a fresh interpreter, and a backend that
compiles again at load). docs/shapes-and-saving.md records its results.
"""
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.utils._pytree
from zoo import ARCHITECTURES

import fxopt

backend = sys.argv[1]
passes = sys.argv[2].split(",") if len(sys.argv) > 2 and sys.argv[2] else None
LOADER = r'''
import sys, torch, fxopt
import torch.utils._pytree as pytree
opt = fxopt.load(sys.argv[1])
args, kwargs, want = torch.load(sys.argv[2], weights_only=True)
got = pytree.tree_leaves(opt(*args, **kwargs))
same = all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(got, want)) and len(got) == len(want)
print("identical" if same else "DIFFERENT", type(opt(*args, **kwargs)).__name__)
'''
ok = bad = 0
for arch in ARCHITECTURES:
    torch.manual_seed(0)
    start = time.perf_counter()
    try:
        model, args, kwargs = arch.build()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = fxopt.compile(model, args, passes=passes, backend=backend, example_kwargs=kwargs)
        expected = opt(*args, **kwargs)
        with tempfile.TemporaryDirectory() as tmp:
            path = fxopt.save(opt, f"{tmp}/m.fxopt")
            torch.save((args, kwargs, torch.utils._pytree.tree_leaves(expected)), f"{tmp}/io.pt")
            done = subprocess.run([sys.executable, "-c", LOADER, path, f"{tmp}/io.pt"], capture_output=True, text=True, timeout=600)
        line = (done.stdout.strip() or done.stderr.strip().splitlines()[-1])[:150]
    except Exception as exc:
        line = f"FAILED to compile/save: {type(exc).__name__}: {str(exc)[:120]}"
    good = line.startswith("identical")
    ok += good
    bad += not good
    print(f"{arch.name:28s} {backend:9s} {time.perf_counter()-start:6.1f}s {line}", flush=True)
print(f"{ok} identical, {bad} not")
