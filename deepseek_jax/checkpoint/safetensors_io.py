"""Reads safetensors files tensor by tensor through a memory map (any dtype, FP8 included).

The header is parsed once; each read maps only that tensor's bytes, copies them out and drops
the map, so resident memory holds one tensor at a time rather than the touched file. A file
shorter than its header promises (a truncated shard) is reported by name.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "I64": np.int64, "I32": np.int32, "I16": np.int16,
    "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(file: str) -> dict[str, TensorInfo]:
    """name -> TensorInfo for every tensor in one safetensors file (no tensor data is read)."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"safetensors: {file}: truncated (no header)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise ValueError(f"safetensors: {file}: truncated (header of {header_len} bytes, file of {size})")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise ValueError(f"safetensors: {file}: unreadable header ({e})") from None
    infos = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        info = TensorInfo(file, meta["dtype"], tuple(meta["shape"]), 8 + header_len + begin, end - begin)
        if info.start + info.nbytes > size:
            raise ValueError(f"safetensors: {file}: truncated: tensor {name} ends at byte "
                             f"{info.start + info.nbytes}, the file has {size}")
        infos[name] = info
    return infos


def read_tensor(info: TensorInfo) -> np.ndarray:
    """A private copy of one tensor, read through a map of just its bytes."""
    if info.dtype not in DTYPES:
        raise ValueError(f"safetensors: {info.file}: unsupported dtype {info.dtype}")
    if info.nbytes == 0:
        return np.zeros(info.shape, DTYPES[info.dtype])
    mapped = np.memmap(info.file, np.uint8, mode="r", offset=info.start, shape=(info.nbytes,))
    out = np.array(mapped.view(DTYPES[info.dtype]).reshape(info.shape))
    del mapped
    return out


_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


def write_file(file: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes a safetensors file (any dtype of DTYPES, FP8 included), atomically via a rename."""
    header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
    arrays = {name: np.ascontiguousarray(t) for name, t in tensors.items()}
    for name, t in arrays.items():
        if t.dtype not in _NAMES:
            raise ValueError(f"safetensors: {name}: unsupported dtype {t.dtype}")
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    tmp = file + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in arrays.values():
            f.write(t.tobytes())
    os.replace(tmp, file)
