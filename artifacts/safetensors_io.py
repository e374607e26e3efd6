"""safetensors files read by memory map and written one tensor at a time.

The `safetensors` library validates files, but it has no bfloat16 for numpy and its writer
needs every tensor in memory at once; weight conversion streams instead, so the header
(which needs only names, dtypes and shapes) is written first and the data after it.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from relaxlm.errors import RelaxlmError

DTYPES = {
    "F64": np.dtype("float64"),
    "F32": np.dtype("float32"),
    "F16": np.dtype("float16"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("int64"),
    "I32": np.dtype("int32"),
    "I16": np.dtype("int16"),
    "I8": np.dtype("int8"),
    "U32": np.dtype("uint32"),
    "U8": np.dtype("uint8"),
    "BOOL": np.dtype("bool"),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int  # byte offset of the data in the file

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def index_file(file: Path) -> dict[str, TensorInfo]:
    """Name -> where each tensor lies; raises RelaxlmError for corrupt or truncated files."""
    try:  # the library checks the header and that every tensor lies inside the file
        with safe_open(file, framework="numpy") as f:
            names = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise RelaxlmError(f"{file}: corrupt or truncated safetensors file ({e})") from e
    with open(file, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    size = file.stat().st_size
    out = {}
    for name in names:
        entry = header[name]
        if entry["dtype"] not in DTYPES:
            raise RelaxlmError(f"{file}: tensor {name} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        if 8 + header_len + end > size:
            raise RelaxlmError(f"{file}: truncated (tensor {name} extends past the end)")
        out[name] = TensorInfo(
            file, tuple(entry["shape"]), DTYPES[entry["dtype"]], 8 + header_len + begin
        )
    return out


def read(info: TensorInfo) -> np.ndarray:
    """The tensor, memory-mapped (no copy until used)."""
    count = int(np.prod(info.shape, dtype=np.int64))
    if count == 0:
        return np.zeros(info.shape, info.dtype)
    data = np.memmap(info.file, dtype=info.dtype, mode="r", offset=info.offset, shape=(count,))
    return data.reshape(info.shape)


class ShardWriter:
    """Writes one safetensors file: the header from the layout, then each tensor in order."""

    def __init__(self, path: Path, layout: list[tuple[str, tuple[int, ...], np.dtype]]):
        self.path = path
        self._expected = list(layout)
        header, offset = {}, 0
        for name, shape, dtype in layout:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            header[name] = {
                "dtype": DTYPE_NAMES[np.dtype(dtype)],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._file: BinaryIO = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, array: np.ndarray) -> None:
        exp_name, shape, dtype = self._expected.pop(0)
        assert (name, tuple(array.shape), np.dtype(dtype)) == (exp_name, shape, array.dtype), (
            name,
            array.shape,
            array.dtype,
        )
        # raw bytes, no copy (a memoryview of bfloat16 itself is refused)
        self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)

    def close(self) -> None:
        assert not self._expected, f"tensors not written: {[n for n, _, _ in self._expected]}"
        self._file.flush()
        self._file.close()
