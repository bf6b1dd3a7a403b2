"""Write a safetensors file one tensor at a time.

The header (names, dtypes, shapes, offsets) is written first from a plan, then tensors are appended in
plan order, so a writer never holds more than one tensor in memory.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

DTYPE_TAGS = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def dtype_from_tag(tag: str) -> torch.dtype | None:
    return next((dtype for dtype, t in DTYPE_TAGS.items() if t == tag), None)


class StreamingWriter:
    """``with StreamingWriter(path, [(name, dtype, shape), ...]) as w: w.write(name, tensor)`` in order."""

    def __init__(self, path: Path, plan: list[tuple[str, torch.dtype, list[int]]]):
        self.path = path
        self.plan = list(plan)
        self._next = 0
        meta, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape in self.plan:
            size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            meta[name] = {"dtype": DTYPE_TAGS[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header = json.dumps(meta, separators=(",", ":")).encode()
        self._header = struct.pack("<Q", len(header) + (-len(header) % 8)) + header + b" " * (-len(header) % 8)

    def __enter__(self) -> StreamingWriter:
        self._file = open(self.path, "wb")
        self._file.write(self._header)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, dtype, shape = self.plan[self._next]
        if name != want_name or tensor.dtype != dtype or list(tensor.shape) != list(shape):
            raise ValueError(f"{name} {tensor.dtype} {list(tensor.shape)} does not match the planned "
                             f"{want_name} {dtype} {list(shape)}")
        if tensor.numel():
            self._file.write(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        self._file.close()
        if exc_type is None and self._next != len(self.plan):
            raise ValueError(f"{self.path}: wrote {self._next} of {len(self.plan)} planned tensors")
