"""The file: a zip archive of JSON documents, a safetensors file of constants, and raw files.

Every member is stored uncompressed, so the constants can be memory-mapped where they lie
in the archive: :func:`read_constants` maps the safetensors member copy-on-write (pages are
read from the file on first use and shared with the page cache; nothing is copied up front).
Its header is parsed here as the data it is (JSON offsets and shapes, checked against the
member's size); the member itself is written by the ``safetensors`` package, so
``unzip model.fxopt constants.safetensors`` gives a file any safetensors reader opens.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from fxopt.saving.values import UnsafeFileError

CONSTANTS = "constants.safetensors"
ALIGNMENT = 64  # the constants member starts on a 64-byte boundary, so every tensor can be mapped

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attribute in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                          ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attribute):  # newer dtypes: guarded for older torch
        _DTYPES[_name] = getattr(torch, _attribute)


def write_archive(target: Path, documents: dict[str, Any], tensors: dict[str, torch.Tensor],
                  blobs: dict[str, bytes]) -> None:
    """Write the archive to ``target``: ``documents`` as JSON members, ``tensors`` as one
    safetensors member, ``blobs`` as raw members."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="fxopt-save-", dir=target.parent) as scratch:
        constants = Path(scratch) / CONSTANTS
        save_file(tensors, str(constants))
        with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, document in documents.items():
                archive.writestr(name, json.dumps(document, indent=1, allow_nan=False))
            for name, data in blobs.items():
                archive.writestr(name, data)
            _write_aligned(archive, CONSTANTS, constants)


def _write_aligned(archive: zipfile.ZipFile, name: str, source: Path) -> None:
    """Add ``source`` as member ``name`` with its data on an ALIGNMENT boundary (a padding
    extra field in its local header, as torch.save pads its own members)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = source.stat().st_size
    zip64 = info.file_size * 1.05 > zipfile.ZIP64_LIMIT
    header = archive.fp.tell() + 30 + len(name.encode()) + (20 if zip64 else 0)
    padding = (-(header + 4)) % ALIGNMENT
    info.extra = struct.pack("<HH", 0x4246, padding) + b"\0" * padding  # "FB", as torch.save writes
    with open(source, "rb") as data, archive.open(info, "w", force_zip64=zip64) as member:
        shutil.copyfileobj(data, member, 16 << 20)


def is_archive(path: Path) -> bool:
    return zipfile.is_zipfile(path)


class Archive:
    """An fxopt file opened for reading: JSON members, raw members, mapped constants."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.zip = zipfile.ZipFile(path)
        self.names = set(self.zip.namelist())

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.zip.close()

    def has(self, name: str) -> bool:
        return name in self.names

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.zip.read(name))
        except KeyError:
            raise UnsafeFileError(f"{self.path}: the file has no {name}") from None
        except ValueError as exc:
            raise UnsafeFileError(f"{self.path}: {name} is not valid JSON: {exc}") from exc

    def blob(self, name: str) -> bytes:
        if name not in self.names:
            raise UnsafeFileError(f"{self.path}: the file has no member {name!r}")
        return self.zip.read(name)

    def constants_header(self) -> dict[str, Any]:
        """The safetensors header of the constants (names, dtypes, shapes, offsets), checked."""
        _, header, _ = self._constants_layout()
        return header

    def read_constants(self) -> dict[str, torch.Tensor]:
        """Every stored constant, memory-mapped from the file (copy-on-write)."""
        offset, header, _ = self._constants_layout()
        if not header:
            return {}
        with open(self.path, "rb") as file:
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        tensors = {}
        for name, entry in header.items():
            dtype, shape = _DTYPES[entry["dtype"]], entry["shape"]
            begin, end = entry["data_offsets"]
            start = offset + begin
            if end == begin:
                tensors[name] = torch.empty(shape, dtype=dtype)
            elif start % dtype.itemsize:
                tensors[name] = torch.frombuffer(bytearray(mapped[start:offset + end]), dtype=dtype).reshape(shape)
            else:
                tensors[name] = torch.frombuffer(mapped, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                                 offset=start).reshape(shape)
        return tensors

    def _constants_layout(self) -> tuple[int, dict[str, Any], int]:
        """Where the tensors' bytes start in the file, the checked header, the member size."""
        try:
            info = self.zip.getinfo(CONSTANTS)
        except KeyError:
            raise UnsafeFileError(f"{self.path}: the file has no {CONSTANTS}") from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise UnsafeFileError(f"{self.path}: {CONSTANTS} is compressed; fxopt files store it as is")
        with open(self.path, "rb") as file:
            file.seek(info.header_offset)
            local = file.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise UnsafeFileError(f"{self.path}: damaged zip entry for {CONSTANTS}")
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_length + extra_length
            file.seek(start)
            (header_length,) = struct.unpack("<Q", file.read(8))
            if header_length > info.file_size - 8:
                raise UnsafeFileError(f"{self.path}: {CONSTANTS} has a header longer than itself")
            try:
                header = json.loads(file.read(header_length))
            except ValueError as exc:
                raise UnsafeFileError(f"{self.path}: {CONSTANTS} has no valid header: {exc}") from exc
        header.pop("__metadata__", None)
        data_size = info.file_size - 8 - header_length
        for name, entry in header.items():
            _check_entry(name, entry, data_size)
        return start + 8 + header_length, header, info.file_size


def _check_entry(name: str, entry: Any, data_size: int) -> None:
    try:
        dtype = _DTYPES[entry["dtype"]]
        shape = [int(d) for d in entry["shape"]]
        begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise UnsafeFileError(f"constant {name!r}: malformed safetensors entry {entry!r}") from None
    count = 1
    for dim in shape:
        if dim < 0:
            raise UnsafeFileError(f"constant {name!r}: negative size in {shape}")
        count *= dim
    if not 0 <= begin <= end <= data_size or end - begin != count * dtype.itemsize:
        raise UnsafeFileError(f"constant {name!r}: its bytes [{begin}, {end}) do not fit its shape {shape} "
                              f"and dtype {dtype} inside the file")


def replace_atomically(target: Path, write: Any) -> None:
    """Call ``write(partial_path)`` and move the result onto ``target`` when it is complete,
    so a failure leaves no partial file behind (and an existing file untouched)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(handle)
    try:
        write(Path(partial))
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
