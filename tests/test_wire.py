"""Round trips and validation of the binary wire format."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdrm import wire
from sdrm.factors import FactorBlock, dense_block
from sdrm.wire import BlocksMessage, Envelope, FrameMessage, Kind, PartialsMessage, WireError

JPEG = b"\xff\xd8\xff\xe0" + bytes(range(64)) + b"\xff\xd9"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(32)

# float16 keeps 11 significant bits, so values of order 1 round within about 1e-3 relative.
HALF_TOLERANCE = {"rtol": 2e-3, "atol": 2e-3}


def make_envelope(**changes) -> Envelope:
    fields = {
        "kind": Kind.BLOCKS,
        "line": "line-1",
        "camera": "cam-7",
        "device": "jetson-2",
        "frame": 123456789012,
        "capture_ms": 1_733_000_000_123,
        "epoch": 42,
        "width": 1920,
        "height": 1080,
        "timings": [("ingest", 1.25), ("compress", 3.5)],
    }
    fields.update(changes)
    return Envelope(**fields)


def make_block(
    head: int, batch: int = 2, tokens: int = 5, head_dim: int = 8, rank: int = 3, seed: int = 0
) -> FactorBlock:
    generator = torch.Generator().manual_seed(seed * 1000 + head)
    return FactorBlock(
        head=head,
        U=torch.randn(batch * tokens, rank, generator=generator),
        S=torch.rand(rank, generator=generator) + 0.5,
        V=torch.randn(head_dim, rank, generator=generator),
        batch=batch,
        tokens=tokens,
        energy=0.875,
    )


def header_length(env: Envelope) -> int:
    """Length of the envelope bytes before the payload, found from an empty BLOCKS message."""
    return len(wire.encode_blocks(env, [])) - 2  # an empty BLOCKS payload is its u16 head count


def with_payload(data: bytes, header_len: int, payload: bytes) -> bytes:
    """Replace the payload and rewrite the length and CRC32 before it, so only the payload is wrong."""
    trailer = struct.pack("<II", len(payload), zlib.crc32(payload))
    return data[: header_len - 8] + trailer + payload


def assert_blocks_close(decoded: list[FactorBlock], original: list[FactorBlock], tolerance: dict) -> None:
    assert len(decoded) == len(original)
    for got, expected in zip(decoded, original):
        assert got.head == expected.head
        assert got.batch == expected.batch
        assert got.tokens == expected.tokens
        assert got.dense == expected.dense
        assert got.energy == pytest.approx(expected.energy, rel=1e-6)
        assert got.U.dtype == torch.float32
        torch.testing.assert_close(got.U, expected.U.float(), **tolerance)
        torch.testing.assert_close(got.S, expected.S.float(), **tolerance)
        torch.testing.assert_close(got.V, expected.V.float(), **tolerance)


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("image, content_type", [(JPEG, "jpeg"), (PNG, "png")])
def test_frame_round_trip(image, content_type):
    env = make_envelope(kind=Kind.FRAME, device="")
    message = wire.decode(wire.encode_frame(env, image, content_type))

    assert isinstance(message, FrameMessage)
    assert message.image_bytes == image
    assert message.content_type == content_type
    assert message.envelope.kind == Kind.FRAME
    assert message.envelope.device == ""


def test_frame_content_type_aliases():
    assert wire.decode(wire.encode_frame(make_envelope(), JPEG, "image/jpeg")).content_type == "jpeg"
    assert wire.decode(wire.encode_frame(make_envelope(), PNG, "image/png")).content_type == "png"


def test_envelope_round_trip():
    env = make_envelope(line="línea-ü", camera="カメラ", timings=[("ingest", 0.5), ("x" * 32, 1e6)])
    decoded = wire.decode(wire.encode_blocks(env, [make_block(0)])).envelope

    assert decoded.kind == Kind.BLOCKS
    assert decoded.line == env.line
    assert decoded.camera == env.camera
    assert decoded.device == env.device
    assert decoded.frame == env.frame
    assert decoded.capture_ms == env.capture_ms
    assert decoded.epoch == env.epoch
    assert decoded.width == env.width
    assert decoded.height == env.height
    assert [name for name, _ in decoded.timings] == ["ingest", "x" * 32]
    assert [ms for _, ms in decoded.timings] == pytest.approx([0.5, 1e6])


def test_envelope_kind_set_by_encoder():
    env = make_envelope(kind=Kind.FRAME)
    assert wire.decode(wire.encode_blocks(env, [make_block(0)])).envelope.kind == Kind.BLOCKS


def test_envelope_field_maximums():
    env = make_envelope(frame=2**64 - 1, capture_ms=2**64 - 1, epoch=2**32 - 1, width=65535, height=65535)
    decoded = wire.decode(wire.encode_frame(env, JPEG, "jpeg")).envelope

    assert decoded.frame == 2**64 - 1
    assert decoded.capture_ms == 2**64 - 1
    assert decoded.epoch == 2**32 - 1
    assert (decoded.width, decoded.height) == (65535, 65535)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_blocks_round_trip(dtype):
    blocks = [make_block(head, rank=head + 1) for head in range(4)]
    message = wire.decode(wire.encode_blocks(make_envelope(), blocks, dtype=dtype))

    assert isinstance(message, BlocksMessage)
    tolerance = HALF_TOLERANCE if dtype == "float16" else {"rtol": 0.0, "atol": 0.0}
    assert_blocks_close(message.blocks, blocks, tolerance)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_blocks_dense_round_trip(dtype):
    slice_ = torch.randn(2, 6, 8)
    block = dense_block(3, slice_)
    decoded = wire.decode(wire.encode_blocks(make_envelope(), [block], dtype=dtype)).blocks[0]

    assert decoded.dense
    assert decoded.rank == 8
    assert torch.equal(decoded.S, torch.ones(8))
    assert torch.equal(decoded.V, torch.eye(8))
    tolerance = HALF_TOLERANCE if dtype == "float16" else {"rtol": 0.0, "atol": 0.0}
    torch.testing.assert_close(decoded.reconstruct(), slice_, **tolerance)


def test_blocks_dense_smaller_than_rank_form():
    block = dense_block(0, torch.randn(1, 10, 16))
    dense_size = len(wire.encode_blocks(make_envelope(), [block], dtype="float32"))
    rank_form = FactorBlock(head=0, U=block.U, S=block.S, V=block.V, batch=1, tokens=10)
    rank_size = len(wire.encode_blocks(make_envelope(), [rank_form], dtype="float32"))

    assert rank_size - dense_size == (16 + 16 * 16) * 4


def test_blocks_many_heads():
    blocks = [make_block(head, batch=1, tokens=9, head_dim=16, rank=1 + head % 16) for head in range(64)]
    blocks[10] = dense_block(10, torch.randn(1, 9, 16))
    message = wire.decode(wire.encode_blocks(make_envelope(), blocks, dtype="float32"))

    assert [block.head for block in message.blocks] == list(range(64))
    assert_blocks_close(message.blocks, blocks, {"rtol": 0.0, "atol": 0.0})


def test_blocks_empty_list():
    message = wire.decode(wire.encode_blocks(make_envelope(), []))
    assert message.blocks == []


def test_blocks_rank_zero():
    block = FactorBlock(head=0, U=torch.zeros(4, 0), S=torch.zeros(0), V=torch.zeros(8, 0), batch=1, tokens=4)
    decoded = wire.decode(wire.encode_blocks(make_envelope(), [block])).blocks[0]

    assert decoded.rank == 0
    assert torch.equal(decoded.reconstruct(), torch.zeros(1, 4, 8))


def test_blocks_accept_grad_and_float64():
    block = make_block(0)
    tracked = FactorBlock(
        head=0,
        U=block.U.double().requires_grad_(),
        S=block.S.double(),
        V=block.V.t().contiguous().t(),  # non-contiguous view
        batch=block.batch,
        tokens=block.tokens,
        energy=block.energy,
    )
    decoded = wire.decode(wire.encode_blocks(make_envelope(), [tracked], dtype="float32")).blocks[0]
    assert_blocks_close([decoded], [block], {"rtol": 1e-6, "atol": 1e-6})


def test_decoded_tensors_writable_copies():
    data = wire.encode_blocks(make_envelope(), [make_block(0), make_block(1)], dtype="float32")
    first, second = wire.decode(data).blocks
    second_before = second.U.clone()

    first.U.add_(1.0)
    first.S.zero_()

    assert torch.equal(second.U, second_before)
    assert torch.equal(wire.decode(data).blocks[0].U, make_block(0).U)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_partials_round_trip(dtype):
    blocks = [make_block(head, batch=3, tokens=4, head_dim=8, rank=2) for head in (5, 1, 9)]
    blocks.append(dense_block(2, torch.randn(3, 4, 8)))
    partials = [torch.randn(3, 4, 8) for _ in blocks]
    message = wire.decode(wire.encode_partials(make_envelope(), blocks, partials, dtype=dtype))

    assert isinstance(message, PartialsMessage)
    assert message.envelope.kind == Kind.PARTIALS
    tolerance = HALF_TOLERANCE if dtype == "float16" else {"rtol": 0.0, "atol": 0.0}
    assert_blocks_close(message.blocks, blocks, tolerance)
    assert len(message.partials) == len(partials)
    for got, expected in zip(message.partials, partials):
        assert got.shape == (3, 4, 8)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, **tolerance)


def test_peek_envelope_matches_decode():
    data = wire.encode_partials(make_envelope(), [make_block(0)], [torch.randn(2, 5, 8)])
    assert wire.peek_envelope(data) == wire.decode(data).envelope


def test_peek_envelope_skips_checksum():
    data = bytearray(wire.encode_blocks(make_envelope(), [make_block(0)]))
    data[-1] ^= 0xFF
    assert wire.peek_envelope(bytes(data)).camera == "cam-7"
    with pytest.raises(WireError, match="checksum"):
        wire.decode(bytes(data))


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(
        st.tuples(
            st.integers(1, 3),  # batch
            st.integers(1, 6),  # tokens
            st.integers(1, 9),  # head_dim
            st.integers(0, 9),  # rank, clipped to head_dim
            st.booleans(),  # dense
        ),
        max_size=5,
    ),
    dtype=st.sampled_from(["float16", "float32"]),
    with_partials=st.booleans(),
)
def test_blocks_round_trip_random_shapes(shapes, dtype, with_partials):
    blocks = []
    for head, (batch, tokens, head_dim, rank, dense) in enumerate(shapes):
        if dense:
            blocks.append(dense_block(head, torch.randn(batch, tokens, head_dim)))
        else:
            blocks.append(make_block(head, batch, tokens, head_dim, min(rank, head_dim), seed=7))
    tolerance = HALF_TOLERANCE if dtype == "float16" else {"rtol": 0.0, "atol": 0.0}

    if with_partials:
        partials = [torch.randn(block.batch, block.tokens, block.head_dim) for block in blocks]
        message = wire.decode(wire.encode_partials(make_envelope(), blocks, partials, dtype=dtype))
        for got, expected in zip(message.partials, partials):
            torch.testing.assert_close(got, expected, **tolerance)
    else:
        message = wire.decode(wire.encode_blocks(make_envelope(), blocks, dtype=dtype))

    assert_blocks_close(message.blocks, blocks, tolerance)


# ---------------------------------------------------------------------------------------------
# Plain images


def test_plain_image_detection():
    assert wire.is_plain_image(JPEG) == "jpeg"
    assert wire.is_plain_image(PNG) == "png"
    assert wire.is_plain_image(b"\xff\xd8") is None
    assert wire.is_plain_image(b"") is None
    assert wire.is_plain_image(wire.encode_frame(make_envelope(), JPEG, "jpeg")) is None


def test_decode_plain_jpeg_hint():
    with pytest.raises(WireError, match="plain JPEG image.*is_plain_image"):
        wire.decode(JPEG)


# ---------------------------------------------------------------------------------------------
# Malformed bytes


def small_messages() -> list[bytes]:
    env = make_envelope(timings=[("ingest", 1.0)])
    block = make_block(0, batch=1, tokens=2, head_dim=3, rank=2)
    return [
        wire.encode_frame(env, JPEG[:8], "jpeg"),
        wire.encode_blocks(env, [block]),
        wire.encode_partials(env, [block], [torch.randn(1, 2, 3)]),
    ]


@pytest.mark.parametrize("data", small_messages(), ids=["frame", "blocks", "partials"])
def test_decode_truncated_every_prefix(data):
    for length in range(len(data)):
        with pytest.raises(WireError):
            wire.decode(data[:length])


@pytest.mark.parametrize("data", small_messages(), ids=["frame", "blocks", "partials"])
def test_decode_flipped_payload_byte(data):
    header_len = header_length(make_envelope(timings=[("ingest", 1.0)]))
    for position in range(header_len, len(data)):
        corrupted = bytearray(data)
        corrupted[position] ^= 0x01
        with pytest.raises(WireError, match="checksum mismatch"):
            wire.decode(bytes(corrupted))


def test_decode_trailing_bytes():
    data = wire.encode_blocks(make_envelope(), [make_block(0)])
    with pytest.raises(WireError, match="trailing bytes"):
        wire.decode(data + b"\x00")


def test_decode_trailing_bytes_in_payload():
    env = make_envelope()
    data = wire.encode_blocks(env, [make_block(0)])
    header_len = header_length(env)
    with pytest.raises(WireError, match="trailing bytes"):
        wire.decode(with_payload(data, header_len, data[header_len:] + b"\x00\x00"))


def test_decode_wrong_magic():
    data = wire.encode_blocks(make_envelope(), [make_block(0)])
    with pytest.raises(WireError, match="wrong magic"):
        wire.decode(b"SDRX" + data[4:])


def test_decode_unsupported_version():
    data = bytearray(wire.encode_blocks(make_envelope(), [make_block(0)]))
    data[4] = 2
    with pytest.raises(WireError, match="unsupported wire format version 2"):
        wire.decode(bytes(data))


@pytest.mark.parametrize("kind", [0, 4, 255])
def test_decode_unknown_kind(kind):
    data = bytearray(wire.encode_blocks(make_envelope(), [make_block(0)]))
    data[5] = kind
    with pytest.raises(WireError, match=f"unknown message kind {kind}"):
        wire.decode(bytes(data))


@pytest.mark.parametrize("dtype_code", [0, 3, 200])
def test_decode_unknown_dtype(dtype_code):
    data = bytearray(wire.encode_blocks(make_envelope(), [make_block(0)]))
    data[6] = dtype_code
    with pytest.raises(WireError, match=f"unknown dtype code {dtype_code}"):
        wire.decode(bytes(data))


def test_decode_frame_with_dtype():
    data = bytearray(wire.encode_frame(make_envelope(), JPEG, "jpeg"))
    data[6] = 1
    with pytest.raises(WireError, match="unknown dtype code 1 for a FRAME"):
        wire.decode(bytes(data))


def test_decode_payload_length_mismatch():
    env = make_envelope()
    data = bytearray(wire.encode_blocks(env, [make_block(0)]))
    header_len = header_length(env)
    declared = len(data) - header_len
    struct.pack_into("<I", data, header_len - 8, declared + 1)
    with pytest.raises(WireError, match="truncated message.*declares"):
        wire.decode(bytes(data))
    struct.pack_into("<I", data, header_len - 8, declared - 1)
    with pytest.raises(WireError, match="trailing bytes.*declares"):
        wire.decode(bytes(data))


def block_payload(head=0, batch=1, tokens=2, head_dim=3, rank=2, dense=0, energy=0.5, arrays=None) -> bytes:
    """One-head BLOCKS payload with float32 arrays; arrays default to zeros of the declared shapes."""
    record = struct.pack("<HHIIHHBf", 1, head, batch, tokens, head_dim, rank, dense, energy)
    if arrays is None:
        count = batch * tokens * head_dim if dense else batch * tokens * rank + rank + head_dim * rank
        arrays = np.zeros(count, dtype="<f4")
    return record + np.asarray(arrays, dtype="<f4").tobytes()


def crafted_blocks(payload: bytes) -> bytes:
    env = make_envelope()
    template = wire.encode_blocks(env, [make_block(0)], dtype="float32")
    return with_payload(template, header_length(env), payload)


def test_decode_crafted_payload_valid():
    message = wire.decode(crafted_blocks(block_payload()))
    assert message.blocks[0].U.shape == (2, 2)


def test_decode_nan_in_array():
    arrays = np.zeros(2 * 2 + 2 + 3 * 2, dtype="<f4")
    arrays[5] = np.nan
    with pytest.raises(WireError, match="head 0: S contains NaN or Inf"):
        wire.decode(crafted_blocks(block_payload(arrays=arrays)))


def test_decode_inf_in_array():
    arrays = np.zeros(2 * 2 + 2 + 3 * 2, dtype="<f4")
    arrays[-1] = np.inf
    with pytest.raises(WireError, match="head 0: V contains NaN or Inf"):
        wire.decode(crafted_blocks(block_payload(arrays=arrays)))


def test_decode_rank_above_head_dim():
    with pytest.raises(WireError, match="rank 4 exceeds head_dim 3"):
        wire.decode(crafted_blocks(block_payload(rank=4)))


def test_decode_dense_rank_mismatch():
    with pytest.raises(WireError, match="dense block has rank 2, expected head_dim 3"):
        wire.decode(crafted_blocks(block_payload(dense=1, rank=2, arrays=np.zeros(6))))


def test_decode_invalid_dense_flag():
    with pytest.raises(WireError, match="invalid dense flag 2"):
        wire.decode(crafted_blocks(block_payload(dense=2)))


def test_decode_zero_batch():
    with pytest.raises(WireError, match="invalid shape batch 0"):
        wire.decode(crafted_blocks(block_payload(batch=0, arrays=np.zeros(3 * 2 + 2))))


def test_decode_invalid_energy():
    with pytest.raises(WireError, match="invalid energy"):
        wire.decode(crafted_blocks(block_payload(energy=float("nan"))))


def test_decode_huge_shape_without_data():
    payload = block_payload(batch=2**32 - 1, tokens=2**32 - 1, head_dim=65535, rank=65535, arrays=np.zeros(4))
    with pytest.raises(WireError, match="truncated message"):
        wire.decode(crafted_blocks(payload))


def test_decode_duplicate_head():
    single = block_payload()
    payload = b"\x02\x00" + single[2:] + single[2:]
    with pytest.raises(WireError, match="head 0 appears twice"):
        wire.decode(crafted_blocks(payload))


def test_decode_frame_unknown_content_type():
    env = make_envelope()
    data = wire.encode_frame(env, JPEG, "jpeg")
    with pytest.raises(WireError, match="unknown content type code 9"):
        wire.decode(with_payload(data, header_length(env), b"\x09" + JPEG))


def test_decode_frame_content_mismatch():
    env = make_envelope()
    data = wire.encode_frame(env, JPEG, "jpeg")
    with pytest.raises(WireError, match="does not match its content type 'png'"):
        wire.decode(with_payload(data, header_length(env), b"\x02" + JPEG))


def test_decode_invalid_utf8_line():
    data = bytearray(wire.encode_frame(make_envelope(line="ab"), JPEG, "jpeg"))
    line_start = 32 + 2  # fixed header, then the u16 length of line
    data[line_start] = 0xFF
    with pytest.raises(WireError, match="invalid line: not valid UTF-8"):
        wire.decode(bytes(data))


def test_decode_rejects_non_bytes():
    with pytest.raises(WireError, match="expected bytes"):
        wire.decode("SDRM")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Encoding errors


def test_encode_nan_rejected():
    block = make_block(0)
    block.U[1, 1] = float("nan")
    with pytest.raises(WireError, match="head 0: U contains NaN or Inf"):
        wire.encode_blocks(make_envelope(), [block])


def test_encode_float16_overflow():
    block = make_block(0)
    block.V[0, 0] = 70000.0
    with pytest.raises(WireError, match="head 0: V has values of magnitude 70000.*overflow float16"):
        wire.encode_blocks(make_envelope(), [block], dtype="float16")
    assert wire.decode(wire.encode_blocks(make_envelope(), [block], dtype="float32")).blocks[0].V[0, 0] == 70000.0


def test_encode_partial_nan_rejected():
    z = torch.zeros(2, 5, 8)
    z[0, 0, 0] = float("inf")
    with pytest.raises(WireError, match="head 0: Z contains NaN or Inf"):
        wire.encode_partials(make_envelope(), [make_block(0)], [z])


def test_encode_duplicate_head():
    with pytest.raises(WireError, match="head 1 appears twice"):
        wire.encode_blocks(make_envelope(), [make_block(1), make_block(1)])


def test_encode_rank_above_head_dim():
    block = FactorBlock(head=0, U=torch.zeros(4, 5), S=torch.ones(5), V=torch.zeros(3, 5), batch=1, tokens=4)
    with pytest.raises(WireError, match="rank <= head_dim 3"):
        wire.encode_blocks(make_envelope(), [block])


def test_encode_shape_mismatch():
    block = make_block(0)
    bad = FactorBlock(head=0, U=block.U[:-1], S=block.S, V=block.V, batch=block.batch, tokens=block.tokens)
    with pytest.raises(WireError, match=r"head 0: U has shape \(9, 3\), expected \(10, 3\)"):
        wire.encode_blocks(make_envelope(), [bad])


def test_encode_partials_count_mismatch():
    with pytest.raises(WireError, match="2 partial outputs for 1 blocks"):
        wire.encode_partials(make_envelope(), [make_block(0)], [torch.zeros(2, 5, 8)] * 2)


def test_encode_partial_shape_mismatch():
    with pytest.raises(WireError, match=r"partial output Z has shape \(2, 5, 7\), expected \(2, 5, 8\)"):
        wire.encode_partials(make_envelope(), [make_block(0)], [torch.zeros(2, 5, 7)])


def test_encode_unsupported_dtype():
    with pytest.raises(WireError, match="unsupported dtype 'bfloat16'"):
        wire.encode_blocks(make_envelope(), [make_block(0)], dtype="bfloat16")


def test_encode_frame_content_type_errors():
    with pytest.raises(WireError, match="invalid content type 'gif'"):
        wire.encode_frame(make_envelope(), JPEG, "gif")
    with pytest.raises(WireError, match="do not match content type 'png'"):
        wire.encode_frame(make_envelope(), JPEG, "png")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"camera": ""}, "missing envelope camera"),
        ({"line": ""}, "missing envelope line"),
        ({"frame": -1}, "invalid envelope frame"),
        ({"epoch": 2**32}, "invalid envelope epoch"),
        ({"width": 70000}, "invalid envelope width"),
        ({"capture_ms": 1.5}, "invalid envelope capture_ms"),
        ({"device": "d" * 257}, "above 256"),
        ({"timings": [("", 1.0)]}, "invalid stage timing name ''"),
        ({"timings": [("y" * 33, 1.0)]}, "invalid stage timing name"),
        ({"timings": [("ingest", float("nan"))]}, "invalid duration nan ms"),
        ({"timings": [("ingest", 1e39)]}, "invalid duration"),
        ({"timings": [("s", 1.0)] * 256}, "256 stage timings"),
    ],
)
def test_encode_invalid_envelope(changes, message):
    with pytest.raises(WireError, match=message):
        wire.encode_frame(make_envelope(**changes), JPEG, "jpeg")


def test_wire_error_is_value_error():
    assert issubclass(WireError, ValueError)
