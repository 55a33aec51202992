"""The wire format for encoded features: a small self-describing header, then the (optionally zstd) payload.

    magic "MKC1" | version u8 | flags u8 (bit 0: zstd) | name_len u16 | codec name (utf-8)
    | n_tensors u8 | per tensor: name_len u8, name, dtype u8, ndim u8, dims u32 * ndim
    | raw_len u64 | crc32(raw) u32 | stored_len u64 | payload (stored_len bytes)
All integers little-endian; tensors are C-order little-endian, concatenated in the codec's output order.

Decoding trusts nothing: every header field is checked against the codec the receiver expects (name, tensor
names, dtypes, per-image shapes) and against the bytes actually present before anything is allocated; the
decompressed size is bounded by the checked header, and a CRC catches corruption. Any failure is one CodecError.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np

from mist_kit.errors import CodecError
from mist_kit.runtime.codec.codec import Codec

MAGIC = b"MKC1"
VERSION = 1
FLAG_ZSTD = 1
DTYPES = {1: "float32", 2: "float16", 3: "int8", 4: "uint8"}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
MAX_DECODED_BYTES = 256 << 20  # default cap on one payload's decoded size (a batch of ~650 fp32 ViT-S gathers)


def encode_payload(codec: Codec, tensors: dict[str, np.ndarray], zstd_level: int | None = None) -> bytes:
    """Serialise a codec's encoded tensors (see `Codec.encode`); zstd at `zstd_level` (default: the spec's)."""
    codec.check_encoded(tensors)
    first = next(iter(tensors.values()))
    specs = codec.outputs(first.shape[1], first.shape[2]) if codec.dim is None else codec.outputs()
    level = codec.zstd if zstd_level is None else zstd_level
    name = codec.name.encode("utf-8")
    head = [MAGIC, struct.pack("<BBH", VERSION, FLAG_ZSTD if level else 0, len(name)), name,
            struct.pack("<B", len(specs))]
    chunks = []
    for s in specs:
        arr = np.ascontiguousarray(tensors[s.name], dtype=np.dtype(s.dtype).newbyteorder("<"))
        tname = s.name.encode("utf-8")
        head.append(struct.pack("<B", len(tname)) + tname + struct.pack("<BB", DTYPE_CODES[s.dtype], arr.ndim))
        head.append(struct.pack(f"<{arr.ndim}I", *arr.shape))
        chunks.append(arr.tobytes())
    raw = b"".join(chunks)
    stored = raw
    if level:
        import zstandard

        stored = zstandard.ZstdCompressor(level=level).compress(raw)
    head.append(struct.pack("<QIQ", len(raw), zlib.crc32(raw), len(stored)))
    return b"".join(head) + stored


class _Reader:
    """Bounds-checked reads over the payload bytes."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = memoryview(data), 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise CodecError(f"codec payload truncated: {what} needs {n} bytes at offset {self.pos}, "
                             f"{len(self.data) - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple[int, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))


def decode_payload(codec: Codec, data: bytes, max_bytes: int = MAX_DECODED_BYTES) -> dict[str, np.ndarray]:
    """Parse and validate bytes from `encode_payload` for the expected `codec`; return its named tensors."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"codec payload: expected bytes, got {type(data).__name__}")
    r = _Reader(bytes(data))
    if bytes(r.take(4, "magic")) != MAGIC:
        raise CodecError("codec payload: bad magic (not a mist-kit feature payload)")
    version, flags, name_len = r.unpack("<BBH", "header")
    if version != VERSION or flags & ~FLAG_ZSTD:
        raise CodecError(f"codec payload: unsupported version {version} / flags {flags:#x}")
    try:
        name = bytes(r.take(name_len, "codec name")).decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError("codec payload: codec name is not utf-8") from None
    if name != codec.name:
        raise CodecError(f"codec payload: encoded with codec {name!r}, expected {codec.name!r}")
    (count,) = r.unpack("<B", "tensor count")
    expected = codec.outputs() if codec.dim is not None else None
    if expected is not None and count != len(expected):
        raise CodecError(f"codec payload: {count} tensors, codec {name!r} sends {len(expected)}")
    layout: list[tuple[str, str, tuple[int, ...]]] = []
    for i in range(count):
        (tlen,) = r.unpack("<B", "tensor name length")
        tname = bytes(r.take(tlen, "tensor name")).decode("utf-8", errors="replace")
        code, ndim = r.unpack("<BB", "tensor dtype")
        if code not in DTYPES or not 1 <= ndim <= 4:
            raise CodecError(f"codec payload: tensor '{tname}' has dtype code {code} / {ndim} dims")
        dims = r.unpack(f"<{ndim}I", "tensor shape")
        if expected is not None:
            want = expected[i]
            if (tname, DTYPES[code], dims[1:]) != (want.name, want.dtype, want.shape):
                raise CodecError(f"codec payload: tensor {i} is '{tname}' {DTYPES[code]} {list(dims)}, expected "
                                 f"'{want.name}' {want.dtype} [B, {', '.join(map(str, want.shape))}]")
        if layout and dims[0] != layout[0][2][0]:
            raise CodecError("codec payload: tensors disagree on the batch size")
        layout.append((tname, DTYPES[code], dims))
    raw_len, crc, stored_len = r.unpack("<QIQ", "payload lengths")
    need = sum(np.dtype(dt).itemsize * math.prod(dims) for _, dt, dims in layout)
    if raw_len != need:
        raise CodecError(f"codec payload: header says {raw_len} bytes of tensors, the shapes need {need}")
    if raw_len > max_bytes:
        raise CodecError(f"codec payload: {raw_len} decoded bytes exceed the {max_bytes}-byte limit")
    if stored_len != len(r.data) - r.pos:
        raise CodecError(f"codec payload: {len(r.data) - r.pos} payload bytes present, header says {stored_len}")
    stored = r.take(stored_len, "payload")
    raw = bytes(stored)
    if flags & FLAG_ZSTD:
        raw = _bounded_unzstd(raw, raw_len)
    if len(raw) != raw_len or zlib.crc32(raw) != crc:
        raise CodecError("codec payload: corrupt (length or CRC mismatch)")
    out, pos = {}, 0
    for tname, dt, dims in layout:
        size = np.dtype(dt).itemsize * math.prod(dims)
        out[tname] = np.frombuffer(raw, dtype=np.dtype(dt).newbyteorder("<"), count=math.prod(dims),
                                   offset=pos).reshape(dims).astype(dt)
        pos += size
    if expected is not None:
        codec.check_encoded(out)
    return out


def _bounded_unzstd(stored: bytes, raw_len: int, chunk: int = 256) -> bytes:
    """Decompress in small input chunks, stopping past raw_len: a frame claiming more can never make us allocate
    more than raw_len plus one chunk's worth (a zstd block expands to at most 128 KiB). Trailing bytes after the
    frame are corruption too."""
    import zstandard

    obj = zstandard.ZstdDecompressor().decompressobj()
    out, got = [], 0
    try:
        for i in range(0, len(stored), chunk):
            piece = obj.decompress(stored[i:i + chunk])
            out.append(piece)
            got += len(piece)
            if got > raw_len:
                break
            if obj.eof and i + chunk < len(stored):
                raise CodecError("codec payload: bytes after the end of the zstd frame")
    except zstandard.ZstdError as exc:
        raise CodecError(f"codec payload: corrupt zstd stream ({exc})") from None
    if not obj.eof or obj.unused_data:
        raise CodecError("codec payload: incomplete zstd frame or trailing bytes")
    return b"".join(out)
