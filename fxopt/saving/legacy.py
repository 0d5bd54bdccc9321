"""The earlier file format: a pickle written by ``torch.save`` (file format 1).

Unpickling runs whatever code the file names, so :func:`fxopt.load` reads such a file only
with ``allow_pickle=True`` (for a file the user trusts, to save it again in the data-only
format). :func:`is_pickle` recognises one without unpickling it.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from fxopt.errors import FxoptError

FORMAT = "fxopt.OptimizedModule"
VERSION = 1


class ConstantsAsAttributes(torch.fx.Tracer):
    """The tracer an earlier file's pickled GraphModule names (it is re-traced from its code
    when unpickled): every buffer is read through ``get_attr``, so the graph stays as saved.
    Kept importable as ``fxopt.saving.ConstantsAsAttributes`` for those files."""

    proxy_buffer_attributes = True


def is_pickle(path: Path) -> bool:
    """Whether ``path`` is a ``torch.save`` file (a zip holding ``data.pkl``) or a bare
    pickle, judged from its bytes alone."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    with open(path, "rb") as file:
        return file.read(1) == b"\x80"  # the PROTO opcode every pickle since protocol 2 starts with


def load_pickled(path: Path) -> dict[str, Any]:
    """The payload of an earlier fxopt file: UNPICKLES, so only for a file the user trusts."""
    try:
        with warnings.catch_warnings():
            # torch 2.13 warns while unpickling its own pytree specs (LeafSpec)
            warnings.simplefilter("ignore", FutureWarning)
            payload = torch.load(path, weights_only=False, map_location=None)
    except Exception as exc:
        raise FxoptError(f"{path} is not a file written by fxopt.save: {type(exc).__name__}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FxoptError(f"{path} is not a file written by fxopt.save")
    if payload["version"] > VERSION:
        raise FxoptError(f"{path} was written by a newer fxopt (file format {payload['version']}, "
                         f"this fxopt reads up to {VERSION} with allow_pickle=True)")
    return payload
