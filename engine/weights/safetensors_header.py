"""Read a safetensors file's header (names, dtypes, shapes, offsets) without touching tensor data.

File layout: 8-byte little-endian header length n, n bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data;
offsets are relative to the start of the data (byte 8 + n).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

# safetensors dtype names -> torch dtypes
ST_DTYPES: dict[str, torch.dtype] = {
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors itself refuses larger headers


@dataclass(frozen=True)
class TensorEntry:
    name: str  # as stored in the file
    dtype: str  # safetensors dtype name, e.g. "F8_E4M3"
    shape: tuple[int, ...]
    file: Path
    begin: int  # data offsets, relative to the data section
    end: int


@dataclass
class ShardHeader:
    file: Path
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # unreadable header, truncated data, bad offsets


def read_header(path: str | Path) -> ShardHeader:
    """Parse `path`'s header and check it against the file size; problems are collected, not raised."""
    path = Path(path)
    out = ShardHeader(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                out.problems.append(f"shard {path.name}: not a safetensors file ({size} bytes, no header)")
                return out
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                out.problems.append(f"shard {path.name}: truncated or not safetensors (header of {n} bytes "
                                    f"declared, file has {size} bytes)")
                return out
            header = json.loads(f.read(n))
    except OSError as e:
        out.problems.append(f"shard {path.name}: cannot read: {e}")
        return out
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        out.problems.append(f"shard {path.name}: header is not valid JSON: {e}")
        return out
    if not isinstance(header, dict):
        out.problems.append(f"shard {path.name}: header is not a JSON object")
        return out
    out.metadata = header.pop("__metadata__", None) or {}
    data_bytes = size - 8 - n
    truncated: list[str] = []
    for name, info in header.items():
        try:
            dtype, shape = str(info["dtype"]), tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            out.problems.append(f"{name}: malformed header entry in shard {path.name}: {info!r}")
            continue
        if dtype in ST_DTYPES and end - begin != math.prod(shape) * ST_DTYPES[dtype].itemsize:
            out.problems.append(f"{name}: header offsets [{begin}, {end}] do not match {dtype} {list(shape)} "
                                f"in shard {path.name}")
        if end > data_bytes:
            truncated.append(name)
        out.tensors[name] = TensorEntry(name, dtype, shape, path, begin, end)
    if truncated:
        need = 8 + n + max(out.tensors[t].end for t in truncated)
        out.problems.append(f"shard {path.name}: truncated: header declares {need} bytes, file has {size}")
        out.problems += [f"{t}: data truncated (shard {path.name})" for t in truncated]
    return out
