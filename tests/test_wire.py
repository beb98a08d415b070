"""The checked-in stubs match the protos, and EncodedTensor mirrors the codec header."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tandem import codec
from tandem.protocol import from_message, header_of, to_message
from tandem.wire.v1 import tensor_pb2

ROOT = Path(__file__).resolve().parents[1]


def _generator():  # proto/ is not a package: load the generator by path
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checked_in_stubs_are_current(tmp_path: Path) -> None:
    written = _generator().generate(tmp_path)
    assert len(written) >= 5
    checked_in = ROOT / "tandem" / "wire" / "v1"
    fresh = {p.name: p.read_text() for p in (tmp_path / "v1").iterdir()}
    current = {p.name: p.read_text() for p in checked_in.iterdir() if p.is_file()}
    stale = sorted(n for n in fresh if current.get(n) != fresh[n])
    extra = sorted(set(current) - set(fresh))
    assert not stale and not extra, f"run `make proto`: stale {stale}, unexpected {extra}"


def test_generator_detects_a_changed_proto(tmp_path: Path) -> None:
    gen = _generator()
    src = tmp_path / "proto"
    (src / "tandem" / "v1").mkdir(parents=True)
    for p in gen.proto_files():
        (src / p).write_text((gen.PROTO_DIR / p).read_text())
    (src / "tandem" / "v1" / "tensor.proto").write_text(
        (gen.PROTO_DIR / "tandem/v1/tensor.proto").read_text().replace("bytes payload = 8;", "")
    )
    gen.PROTO_DIR = src
    gen.generate(tmp_path / "out")
    fresh = (tmp_path / "out" / "v1" / "tensor_pb2.py").read_text()
    assert fresh != (ROOT / "tandem" / "wire" / "v1" / "tensor_pb2.py").read_text()


def test_generated_imports_point_at_tandem_wire() -> None:
    text = (ROOT / "tandem" / "wire" / "v1" / "split_inference_pb2.py").read_text()
    assert "from tandem.wire.v1 import tensor_pb2" in text
    assert "from tandem.v1 " not in text


@pytest.mark.parametrize("bits", codec.SUPPORTED_BITS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_message_round_trip_is_byte_exact(bits: int, dtype: type) -> None:
    x = np.random.default_rng(bits).normal(size=(3, 5, 5)).astype(dtype)
    data = codec.encode(x, bits)
    msg = tensor_pb2.EncodedTensor.FromString(to_message(data).SerializeToString())
    assert list(msg.shape) == [3, 5, 5] and msg.bits == bits
    assert from_message(msg) == data
    assert header_of(msg, max_elements=75).shape == (3, 5, 5)


def test_message_fields_mirror_the_header() -> None:
    data = codec.encode(np.zeros((2, 7, 7), np.float32) + np.arange(7), 4)
    msg = to_message(data)
    header = codec.read_header(data)
    assert msg.codec_version == codec.VERSION
    assert msg.zstd == header.compressed
    assert len(msg.params) == 2 * 2 * 2  # two groups, (offset, step) as float16
    assert len(msg.payload) == header.payload_size


@pytest.mark.parametrize(
    "change",
    [
        {"codec_version": 2},
        {"dtype": 7},
        {"bits": 3},
        {"shape": [1] * 7},
        {"shape": [0, 7, 7]},
        {"payload": b"\x00"},
        {"params": b""},
        {"zstd": True},
    ],
)
def test_bad_messages_raise_codec_errors(change: dict) -> None:
    msg = to_message(codec.encode(np.ones((2, 7, 7), np.float32), 8, compress=False))
    for key, value in change.items():
        if key == "shape":
            del msg.shape[:]
            msg.shape.extend(value)
        else:
            setattr(msg, key, value)
    with pytest.raises(codec.CodecError):
        header_of(msg, max_elements=1000)
