"""Binary wire format for frames, factor blocks and partial attention outputs.

Every message is one versioned envelope followed by a kind-specific payload. All integers and
floats are little-endian, and all strings are UTF-8 with a length prefix.

Envelope::

    magic        4s   b"SDRM"
    version      u8   WIRE_VERSION (1)
    kind         u8   1 FRAME, 2 BLOCKS, 3 PARTIALS
    dtype        u8   0 none (FRAME), 1 float16, 2 float32 (array element type of the payload)
    reserved     u8   0
    frame        u64  per-camera frame sequence number
    capture_ms   u64  capture time, epoch milliseconds UTC
    epoch        u32  assignment epoch the sender worked under
    width        u16  frame width in pixels, 0 if unknown
    height       u16  frame height in pixels, 0 if unknown
    line         u16 length + UTF-8, 1..MAX_ID_BYTES bytes
    camera       u16 length + UTF-8, 1..MAX_ID_BYTES bytes
    device       u16 length + UTF-8, 0..MAX_ID_BYTES bytes
    timings      u8 count, then per entry: u8 length + UTF-8 name (1..32 bytes), f32 milliseconds
    payload_len  u32  payload length in bytes
    crc32        u32  zlib.crc32 of the payload only, so a hop can rewrite the header cheaply
    payload      payload_len bytes

FRAME payload: content type u8 (1 JPEG, 2 PNG), then the encoded image bytes.

BLOCKS payload: head count u16, then per head a block record::

    head u16, batch u32, tokens u32, head_dim u16, rank u16, dense u8, energy f32,
    U (batch*tokens, rank), S (rank,), V (head_dim, rank)   raw row-major arrays in dtype

A dense block (FactorBlock.dense) stores rank = head_dim and only U (batch*tokens, head_dim). The
decoder rebuilds S = ones and V = identity.

PARTIALS payload: head count u16, then per head the block record exactly as in BLOCKS followed by
the partial attention output Z (batch, tokens, head_dim) in dtype.

Decoded arrays are writable float32 CPU tensors. The arrays of one message are views of a single
buffer copied from the message bytes, so they stay valid after the bytes are released and writing
one array leaves the others unchanged.
"""

from __future__ import annotations

import math
import struct
import sys
import zlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Sequence

import numpy as np
import torch

from sdrm.factors import FactorBlock

MAGIC = b"SDRM"
WIRE_VERSION = 1
MAX_ID_BYTES = 256  # 64 characters (the topic id limit) of up to 4 UTF-8 bytes each
MAX_TIMING_NAME_BYTES = 32
MAX_TIMINGS = 255


class Kind(IntEnum):
    FRAME = 1
    BLOCKS = 2
    PARTIALS = 3


class WireError(ValueError):
    """Raised when bytes are not a valid SDRM message or values cannot be encoded."""


# dtype code -> (name, numpy little-endian dtype, torch dtype used before serialising)
_DTYPES: dict[int, tuple[str, np.dtype, torch.dtype]] = {
    1: ("float16", np.dtype("<f2"), torch.float16),
    2: ("float32", np.dtype("<f4"), torch.float32),
}
_KIND_CODES = {kind.value for kind in Kind}
_DTYPE_CODES = {name: code for code, (name, _, _) in _DTYPES.items()}
_NO_DTYPE = 0

_CONTENT_TYPES = {1: "jpeg", 2: "png"}
_CONTENT_TYPE_CODES = {"jpeg": 1, "jpg": 1, "image/jpeg": 1, "png": 2, "image/png": 2}
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_FIXED = struct.Struct("<4sBBBBQQIHH")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_F32 = struct.Struct("<f")
_TRAILER = struct.Struct("<II")  # payload length, crc32
_BLOCK = struct.Struct("<HIIHHBf")  # head, batch, tokens, head_dim, rank, dense, energy

_F32_MAX = float(np.finfo(np.float32).max)
# Smallest magnitude that rounds to Inf when converted to each dtype code (float16: 65520).
_OVERFLOW = {1: 65520.0, 2: math.inf}
_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFF_FFFF
_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
# Energy is a fraction of ||Y||_F^2, but float rounding in the SVD can push it slightly above 1.
_ENERGY_SLACK = 1e-3


@dataclass
class Envelope:
    """Routing and timing header shared by all message kinds.

    The encode_* functions ignore `kind` and write their own. `timings` lists (stage name,
    milliseconds) in hop order, and each hop appends its own stage before it encodes.
    """

    kind: Kind | int
    line: str
    camera: str
    device: str = ""
    frame: int = 0
    capture_ms: int = 0
    epoch: int = 0
    width: int = 0
    height: int = 0
    timings: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class FrameMessage:
    envelope: Envelope
    image_bytes: bytes
    content_type: str  # "jpeg" or "png"


@dataclass
class BlocksMessage:
    envelope: Envelope
    blocks: list[FactorBlock]


@dataclass
class PartialsMessage:
    """Factor blocks with the partial attention output Z_i (batch, tokens, head_dim) of each head.

    `partials[k]` belongs to `blocks[k]`.
    """

    envelope: Envelope
    blocks: list[FactorBlock]
    partials: list[torch.Tensor]


Message = FrameMessage | BlocksMessage | PartialsMessage


def is_plain_image(data: bytes) -> str | None:
    """Return "jpeg" or "png" when data starts with that format's signature, else None.

    Smart cameras publish such images straight to the frame topic, without the SDRM envelope.
    """
    if data[:3] == _JPEG_SIGNATURE:
        return "jpeg"
    if data[:8] == _PNG_SIGNATURE:
        return "png"
    return None


# ---------------------------------------------------------------------------------------------
# Encoding


def encode_frame(env: Envelope, image_bytes: bytes, content_type: str) -> bytes:
    """Wrap an encoded JPEG or PNG image in a FRAME message.

    content_type is "jpeg" or "png" ("jpg", "image/jpeg" and "image/png" are accepted too) and
    must match the image's signature. Raises WireError for invalid envelope fields or images.
    """
    code = _CONTENT_TYPE_CODES.get(content_type.lower()) if isinstance(content_type, str) else None
    if code is None:
        raise WireError(f"invalid content type {content_type!r}: use 'jpeg' or 'png'")
    image = bytes(image_bytes)
    detected = is_plain_image(image)
    if detected != _CONTENT_TYPES[code]:
        raise WireError(
            f"image bytes do not match content type {content_type!r}: they start with {image[:8].hex()} "
            f"(detected {detected or 'neither JPEG nor PNG'}); pass the content type of the encoder that made them"
        )
    payload = _U8.pack(code) + image
    return _pack_envelope(env, Kind.FRAME, _NO_DTYPE, payload)


def encode_blocks(env: Envelope, blocks: Sequence[FactorBlock], dtype: str = "float16") -> bytes:
    """Encode factor blocks as a BLOCKS message with arrays in dtype ("float16" or "float32").

    Raises WireError for inconsistent shapes, values out of the field ranges, duplicate heads, or
    NaN/Inf after conversion (float16 overflows above 65504).
    """
    code = _dtype_code(dtype)
    payload = _pack_heads(blocks, None, code)
    return _pack_envelope(env, Kind.BLOCKS, code, payload)


def encode_partials(
    env: Envelope,
    blocks: Sequence[FactorBlock],
    partials: Sequence[torch.Tensor],
    dtype: str = "float16",
) -> bytes:
    """Encode blocks with their partial outputs Z_i (batch, tokens, head_dim) as a PARTIALS message.

    partials[k] belongs to blocks[k]. Raises WireError like encode_blocks, and when the counts or
    a Z shape do not match the blocks.
    """
    if len(partials) != len(blocks):
        raise WireError(f"got {len(partials)} partial outputs for {len(blocks)} blocks: pass one per block")
    code = _dtype_code(dtype)
    payload = _pack_heads(blocks, partials, code)
    return _pack_envelope(env, Kind.PARTIALS, code, payload)


def _dtype_code(dtype: str) -> int:
    code = _DTYPE_CODES.get(dtype)
    if code is None:
        raise WireError(f"unsupported dtype {dtype!r}: use 'float16' or 'float32'")
    return code


def _pack_envelope(env: Envelope, kind: Kind, dtype_code: int, payload: bytes) -> bytes:
    _check_range("frame", env.frame, _U64_MAX)
    _check_range("capture_ms", env.capture_ms, _U64_MAX)
    _check_range("epoch", env.epoch, _U32_MAX)
    _check_range("width", env.width, _U16_MAX)
    _check_range("height", env.height, _U16_MAX)
    if len(payload) > _U32_MAX:
        raise WireError(f"payload of {len(payload)} bytes exceeds the 4 GiB limit: send fewer heads per message")

    parts = [
        _FIXED.pack(
            MAGIC, WIRE_VERSION, int(kind), dtype_code, 0, env.frame, env.capture_ms, env.epoch, env.width, env.height
        ),
        _pack_string("line", env.line, required=True),
        _pack_string("camera", env.camera, required=True),
        _pack_string("device", env.device, required=False),
        _pack_timings(env.timings),
        _TRAILER.pack(len(payload), zlib.crc32(payload)),
        payload,
    ]
    return b"".join(parts)


def _check_range(name: str, value: int, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise WireError(f"invalid envelope {name} {value!r}: it must be an integer in 0..{maximum}")


def _pack_string(name: str, value: str, required: bool) -> bytes:
    if not isinstance(value, str):
        raise WireError(f"invalid envelope {name} {value!r}: it must be a str")
    raw = value.encode("utf-8")
    if required and not raw:
        raise WireError(f"missing envelope {name}: set a non-empty {name} id")
    if len(raw) > MAX_ID_BYTES:
        raise WireError(
            f"envelope {name} {value[:40]!r}... is {len(raw)} bytes in UTF-8, above {MAX_ID_BYTES}: shorten it"
        )
    return _U16.pack(len(raw)) + raw


def _pack_timings(timings: Sequence[tuple[str, float]]) -> bytes:
    if len(timings) > MAX_TIMINGS:
        raise WireError(f"envelope has {len(timings)} stage timings, above {MAX_TIMINGS}: drop old entries")
    parts = [_U8.pack(len(timings))]
    for name, ms in timings:
        raw = name.encode("utf-8") if isinstance(name, str) else b""
        if not raw or len(raw) > MAX_TIMING_NAME_BYTES:
            raise WireError(
                f"invalid stage timing name {name!r}: it must be a str of 1..{MAX_TIMING_NAME_BYTES} bytes in UTF-8"
            )
        value = float(ms)
        if not (math.isfinite(value) and abs(value) <= _F32_MAX):
            raise WireError(f"invalid duration {ms!r} ms for stage {name!r}: it must be a finite float32")
        parts.append(_U8.pack(len(raw)) + raw + _F32.pack(value))
    return b"".join(parts)


def _block_arrays(block: FactorBlock) -> tuple[int, list[torch.Tensor]]:
    """Check a block's shapes against its header fields and return (rank field, arrays to send)."""
    head, batch, tokens = block.head, block.batch, block.tokens
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head <= _U16_MAX:
        raise WireError(f"invalid head id {head!r}: it must be an integer in 0..{_U16_MAX}")
    for name, value in (("batch", batch), ("tokens", tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _U32_MAX:
            raise WireError(f"head {head}: invalid {name} {value!r}: it must be an integer in 1..{_U32_MAX}")

    rows = batch * tokens
    U, S, V = block.U, block.S, block.V
    if V.ndim != 2 or not 1 <= V.shape[0] <= _U16_MAX:
        raise WireError(f"head {head}: V has shape {tuple(V.shape)}, expected (head_dim, rank) with head_dim >= 1")
    head_dim = int(V.shape[0])

    if block.dense:
        if tuple(U.shape) != (rows, head_dim):
            raise WireError(
                f"head {head}: dense block U has shape {tuple(U.shape)}, expected ({rows}, {head_dim}) "
                f"for batch {batch} x tokens {tokens} and head_dim {head_dim}"
            )
        return head_dim, [U]

    rank = int(S.shape[0]) if S.ndim == 1 else -1
    if S.ndim != 1 or rank > head_dim:
        raise WireError(
            f"head {head}: S has shape {tuple(S.shape)}, expected (rank,) with rank <= head_dim {head_dim}"
        )
    if tuple(U.shape) != (rows, rank):
        raise WireError(
            f"head {head}: U has shape {tuple(U.shape)}, expected ({rows}, {rank}) for batch {batch} x tokens {tokens}"
        )
    if tuple(V.shape) != (head_dim, rank):
        raise WireError(f"head {head}: V has shape {tuple(V.shape)}, expected ({head_dim}, {rank})")
    return rank, [U, S, V]


def _pack_heads(blocks: Sequence[FactorBlock], partials: Sequence[torch.Tensor] | None, code: int) -> bytes:
    """Pack the head count, block records and (for PARTIALS) Z arrays into one payload.

    All arrays go through a single torch.cat and one dtype conversion, because per-array
    conversion calls dominate the cost for a dozen small heads.
    """
    if len(blocks) > _U16_MAX:
        raise WireError(f"got {len(blocks)} blocks, above the limit of {_U16_MAX} per message: split them")
    name, np_dtype, torch_dtype = _DTYPES[code]

    records: list[bytes] = []
    sizes: list[list[int]] = []  # element count of each array, per head
    arrays: list[torch.Tensor] = []
    seen: set[int] = set()
    for index, block in enumerate(blocks):
        rank, block_arrays = _block_arrays(block)
        if block.head in seen:
            raise WireError(f"head {block.head} appears twice in one message: send each head once")
        seen.add(block.head)

        energy = float(block.energy)
        if not 0.0 <= energy <= 1.0 + _ENERGY_SLACK:
            raise WireError(f"head {block.head}: invalid energy {energy!r}: it must be a fraction in 0..1")
        head_dim = int(block.V.shape[0])
        records.append(
            _BLOCK.pack(block.head, block.batch, block.tokens, head_dim, rank, int(bool(block.dense)), energy)
        )

        if partials is not None:
            z = partials[index]
            expected = (block.batch, block.tokens, head_dim)
            if tuple(z.shape) != expected:
                raise WireError(f"head {block.head}: partial output Z has shape {tuple(z.shape)}, expected {expected}")
            block_arrays.append(z)
        sizes.append([array.numel() for array in block_arrays])
        arrays.extend(block_arrays)

    source = _concatenate_float32(arrays)
    # One max pass catches NaN (max propagates it), Inf, and values that round to Inf in float16.
    peak = float(np.abs(source.numpy()).max()) if source.numel() else 0.0
    if not peak < _OVERFLOW[code]:
        _raise_first_non_finite(blocks, sizes, source.numpy(), name)
    flat = source.to(torch_dtype).numpy().astype(np_dtype, copy=False)

    raw = memoryview(flat).cast("B")
    itemsize = np_dtype.itemsize
    parts: list[bytes | memoryview] = [_U16.pack(len(blocks))]
    offset = 0
    for record, head_sizes in zip(records, sizes):
        parts.append(record)
        for size in head_sizes:
            parts.append(raw[offset : offset + size * itemsize])
            offset += size * itemsize
    return b"".join(parts)


def _concatenate_float32(arrays: list[torch.Tensor]) -> torch.Tensor:
    """Flatten and concatenate tensors into one float32 CPU tensor, with a single device copy."""
    if not arrays:
        return torch.empty(0)
    with torch.no_grad():
        if len({array.device for array in arrays}) > 1:
            arrays = [array.cpu() for array in arrays]
        flat = torch.cat([array.ravel() for array in arrays])
        return flat.to(device="cpu", dtype=torch.float32).contiguous()


def _raise_first_non_finite(
    blocks: Sequence[FactorBlock], sizes: list[list[int]], source: np.ndarray, dtype: str
) -> None:
    limit = _OVERFLOW[_DTYPE_CODES[dtype]]
    offset = 0
    for block, head_sizes in zip(blocks, sizes):
        names = ["U", "Z"] if block.dense else ["U", "S", "V", "Z"]
        for array_name, size in zip(names, head_sizes):
            values = source[offset : offset + size]
            if not np.isfinite(values).all():
                raise WireError(f"head {block.head}: {array_name} contains NaN or Inf: fix the producer of the block")
            if size and not np.abs(values).max() < limit:
                raise WireError(
                    f"head {block.head}: {array_name} has values of magnitude {np.abs(values).max():.6g}, "
                    f"which overflow {dtype} (max 65504): send float32 or rescale the tokens"
                )
            offset += size
    raise WireError(f"arrays contain NaN, Inf or values that overflow {dtype}: fix the producer of the blocks")


# ---------------------------------------------------------------------------------------------
# Decoding


@dataclass
class _Header:
    envelope: Envelope
    dtype_code: int
    payload_start: int
    payload_len: int
    crc: int


class _Reader:
    """Cursor over message bytes that raises WireError instead of reading past the end."""

    def __init__(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = start
        self.end = len(data) if end is None else end

    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, size: int, what: str) -> int:
        """Reserve size bytes for `what` and return their start offset."""
        if size > self.end - self.pos:
            raise WireError(
                f"truncated message: {what} needs {size} bytes at offset {self.pos} but only "
                f"{self.end - self.pos} remain; the sender or transport cut the message short"
            )
        start = self.pos
        self.pos += size
        return start

    def unpack(self, fmt: struct.Struct, what: str) -> tuple:
        return fmt.unpack_from(self.data, self.take(fmt.size, what))

    def string(self, length_fmt: struct.Struct, what: str) -> str:
        (length,) = self.unpack(length_fmt, f"{what} length")
        start = self.take(length, what)
        try:
            return bytes(self.data[start : start + length]).decode("utf-8")
        except UnicodeDecodeError as error:
            raise WireError(f"invalid {what}: not valid UTF-8 ({error})") from None


def peek_envelope(data: bytes) -> Envelope:
    """Decode only the envelope, without checking the payload's checksum or contents.

    Raises WireError for an invalid envelope or when the payload length does not match.
    """
    return _read_header(data).envelope


def decode(data: bytes) -> Message:
    """Decode and validate a whole message.

    Raises WireError for truncated or trailing bytes, wrong magic, an unsupported version, an
    unknown kind or dtype, a payload length or checksum mismatch, inconsistent shapes, rank above
    head_dim, or NaN/Inf in arrays.
    """
    header = _read_header(data)
    start, end = header.payload_start, header.payload_start + header.payload_len
    view = memoryview(data)[start:end]
    crc = zlib.crc32(view)
    if crc != header.crc:
        raise WireError(
            f"checksum mismatch: payload CRC32 is {crc:#010x} but the envelope declares {header.crc:#010x}, "
            f"so the message was corrupted in transit or by the sender"
        )

    kind = header.envelope.kind
    if kind == Kind.FRAME:
        return _decode_frame(header, data, start, end)
    blocks, partials = _decode_heads(data, start, end, header.dtype_code, with_partials=kind == Kind.PARTIALS)
    if kind == Kind.BLOCKS:
        return BlocksMessage(envelope=header.envelope, blocks=blocks)
    return PartialsMessage(envelope=header.envelope, blocks=blocks, partials=partials)


def _read_header(data: bytes) -> _Header:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    if bytes(data[:4]) != MAGIC:
        _raise_bad_magic(data)
    reader = _Reader(data)
    _magic, version, kind_code, dtype_code, reserved, frame, capture_ms, epoch, width, height = reader.unpack(
        _FIXED, "envelope"
    )
    if version != WIRE_VERSION:
        raise WireError(
            f"unsupported wire format version {version}: this build reads version {WIRE_VERSION}; "
            f"run the same sdrm version on sender and receiver"
        )
    if kind_code not in _KIND_CODES:
        raise WireError(f"unknown message kind {kind_code}: expected 1 (FRAME), 2 (BLOCKS) or 3 (PARTIALS)")
    kind = Kind(kind_code)
    if kind == Kind.FRAME:
        if dtype_code != _NO_DTYPE:
            raise WireError(f"unknown dtype code {dtype_code} for a FRAME message: expected 0 (no arrays)")
    elif dtype_code not in _DTYPES:
        raise WireError(f"unknown dtype code {dtype_code}: expected 1 (float16) or 2 (float32)")
    if reserved != 0:
        raise WireError(f"reserved envelope byte is {reserved}, expected 0: the sender uses a newer format")

    line = reader.string(_U16, "line")
    camera = reader.string(_U16, "camera")
    device = reader.string(_U16, "device")
    for name, value in (("line", line), ("camera", camera)):
        if not value:
            raise WireError(f"missing envelope {name}: the sender must set a non-empty {name} id")
    for name, value in (("line", line), ("camera", camera), ("device", device)):
        if len(value.encode("utf-8")) > MAX_ID_BYTES:
            raise WireError(f"envelope {name} is longer than {MAX_ID_BYTES} bytes")

    (count,) = reader.unpack(_U8, "timing count")
    timings: list[tuple[str, float]] = []
    for _ in range(count):
        name = reader.string(_U8, "stage timing name")
        if not name or len(name.encode("utf-8")) > MAX_TIMING_NAME_BYTES:
            raise WireError(f"invalid stage timing name {name!r}: it must be 1..{MAX_TIMING_NAME_BYTES} bytes")
        (ms,) = reader.unpack(_F32, "stage timing")
        if not math.isfinite(ms):
            raise WireError(f"invalid duration {ms} ms for stage {name!r}: it must be finite")
        timings.append((name, ms))

    payload_len, crc = reader.unpack(_TRAILER, "payload length and checksum")
    if payload_len != reader.remaining():
        problem = "truncated message" if payload_len > reader.remaining() else "trailing bytes after the payload"
        raise WireError(
            f"{problem}: the envelope declares a {payload_len}-byte payload but {reader.remaining()} bytes follow"
        )

    envelope = Envelope(
        kind=kind,
        line=line,
        camera=camera,
        device=device,
        frame=frame,
        capture_ms=capture_ms,
        epoch=epoch,
        width=width,
        height=height,
        timings=timings,
    )
    return _Header(envelope=envelope, dtype_code=dtype_code, payload_start=reader.pos, payload_len=payload_len, crc=crc)


def _raise_bad_magic(data: bytes) -> None:
    plain = is_plain_image(bytes(data[:8]))
    if plain is not None:
        raise WireError(
            f"data is a plain {plain.upper()} image without the SDRM envelope: check is_plain_image() before decode()"
        )
    if len(data) < len(MAGIC) and MAGIC.startswith(bytes(data)):
        raise WireError(f"truncated message: {len(data)} bytes, shorter than the envelope")
    raise WireError(f"wrong magic {bytes(data[:4])!r}, expected {MAGIC!r}: the data is not an SDRM message")


def _decode_frame(header: _Header, data: bytes, start: int, end: int) -> FrameMessage:
    reader = _Reader(data, start, end)
    (code,) = reader.unpack(_U8, "content type")
    content_type = _CONTENT_TYPES.get(code)
    if content_type is None:
        raise WireError(f"unknown content type code {code}: expected 1 (jpeg) or 2 (png)")
    image = bytes(data[reader.pos : end])
    if is_plain_image(image) != content_type:
        raise WireError(
            f"FRAME image does not match its content type {content_type!r}: it starts with {image[:8].hex()}"
        )
    return FrameMessage(envelope=header.envelope, image_bytes=image, content_type=content_type)


@dataclass
class _BlockRecord:
    head: int
    batch: int
    tokens: int
    head_dim: int
    rank: int
    dense: bool
    energy: float
    shapes: list[tuple[int, ...]]


def _decode_heads(
    data: bytes, start: int, end: int, dtype_code: int, with_partials: bool
) -> tuple[list[FactorBlock], list[torch.Tensor]]:
    """Parse block records, then convert every array with one frombuffer/convert/isfinite pass.

    Array bytes are gathered into one buffer first, because per-array numpy and torch calls
    dominate the cost for a dozen small heads.
    """
    itemsize = _DTYPES[dtype_code][1].itemsize
    reader = _Reader(data, start, end)
    view = memoryview(data)

    (count,) = reader.unpack(_U16, "head count")
    records: list[_BlockRecord] = []
    chunks: list[memoryview] = []
    seen: set[int] = set()
    for _ in range(count):
        record = _read_block_record(reader, seen, with_partials)
        for shape in record.shapes:
            elements = _product(shape)
            offset = reader.take(elements * itemsize, f"head {record.head} array of shape {shape}")
            chunks.append(view[offset : offset + elements * itemsize])
        records.append(record)
    if reader.remaining():
        raise WireError(f"trailing bytes: {reader.remaining()} bytes follow the last of {count} heads in the payload")

    tensor = _to_float32(bytearray().join(chunks), dtype_code)
    flat = tensor.numpy()
    if not np.isfinite(flat).all():
        _raise_non_finite_record(records, flat)

    # numpy slicing and torch.from_numpy cost less per array than torch split and view.
    arrays: list[torch.Tensor] = []
    offset = 0
    for record in records:
        for shape in record.shapes:
            size = _product(shape)
            arrays.append(torch.from_numpy(flat[offset : offset + size].reshape(shape)))
            offset += size

    blocks: list[FactorBlock] = []
    partials: list[torch.Tensor] = []
    position = 0
    for record in records:
        U = arrays[position]
        if record.dense:
            S = torch.ones(record.head_dim)
            V = torch.eye(record.head_dim)
            position += 1
        else:
            S = arrays[position + 1]
            V = arrays[position + 2]
            position += 3
        blocks.append(
            FactorBlock(
                head=record.head,
                U=U,
                S=S,
                V=V,
                batch=record.batch,
                tokens=record.tokens,
                energy=record.energy,
                dense=record.dense,
            )
        )
        if with_partials:
            partials.append(arrays[position])
            position += 1
    return blocks, partials


def _to_float32(buffer: bytearray, dtype_code: int) -> torch.Tensor:
    """Convert little-endian array bytes to a float32 tensor, which shares `buffer` for float32 data."""
    _, np_dtype, torch_dtype = _DTYPES[dtype_code]
    if not buffer:
        return torch.empty(0)
    if sys.byteorder == "little":
        return torch.frombuffer(buffer, dtype=torch_dtype).to(torch.float32)
    return torch.from_numpy(np.frombuffer(buffer, dtype=np_dtype).astype(np.float32))


def _read_block_record(reader: _Reader, seen: set[int], with_partials: bool) -> _BlockRecord:
    head, batch, tokens, head_dim, rank, dense, energy = reader.unpack(_BLOCK, "block record")
    if head in seen:
        raise WireError(f"head {head} appears twice in one message: the sender must send each head once")
    seen.add(head)
    if batch == 0 or tokens == 0 or head_dim == 0:
        raise WireError(
            f"head {head}: invalid shape batch {batch} x tokens {tokens} x head_dim {head_dim}: all must be >= 1"
        )
    if rank > head_dim:
        raise WireError(f"head {head}: rank {rank} exceeds head_dim {head_dim}: the sender built an invalid block")
    if dense not in (0, 1):
        raise WireError(f"head {head}: invalid dense flag {dense}, expected 0 or 1")
    if dense and rank != head_dim:
        raise WireError(f"head {head}: dense block has rank {rank}, expected head_dim {head_dim}")
    if not 0.0 <= energy <= 1.0 + _ENERGY_SLACK:
        raise WireError(f"head {head}: invalid energy {energy}: it must be a fraction in 0..1")

    rows = batch * tokens
    shapes: list[tuple[int, ...]] = [(rows, head_dim)] if dense else [(rows, rank), (rank,), (head_dim, rank)]
    if with_partials:
        shapes.append((batch, tokens, head_dim))
    return _BlockRecord(head, batch, tokens, head_dim, rank, bool(dense), float(energy), shapes)


def _raise_non_finite_record(records: list[_BlockRecord], flat: np.ndarray) -> None:
    offset = 0
    for record in records:
        names = ["U", "Z"] if record.dense else ["U", "S", "V", "Z"]
        for array_name, shape in zip(names, record.shapes):
            size = _product(shape)
            if not np.isfinite(flat[offset : offset + size]).all():
                raise WireError(
                    f"head {record.head}: {array_name} contains NaN or Inf: the sender produced invalid values"
                )
            offset += size


def _product(shape: tuple[int, ...]) -> int:
    result = 1
    for size in shape:
        result *= size
    return result
