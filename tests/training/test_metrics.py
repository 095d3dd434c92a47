"""TensorBoard scalars written by `metrics.EventWriter` read back from the event file."""

import os
import struct

from tensorboardX.proto import event_pb2

from deepseek_jax.training import metrics


def _events(path):
    """The Event protos of a TFRecord file: [u64 length][u32 crc][payload][u32 crc] per record."""
    raw, events, offset = path.read_bytes(), [], 0
    while offset < len(raw):
        (length,) = struct.unpack("<Q", raw[offset:offset + 8])
        events.append(event_pb2.Event.FromString(raw[offset + 12:offset + 12 + length]))
        offset += 16 + length
    assert offset == len(raw)
    return events


def test_scalars_read_back(tmp_path):
    writer = metrics.EventWriter(str(tmp_path))
    writer.scalars(7, {"loss": 1.5, "grad_norm": 0.25})
    writer.scalars(8, {"loss": 1.25, "grad_norm": 0.125})
    # Flushed at each call: readable before close (a killed run keeps what it logged).
    (name,) = os.listdir(tmp_path)
    assert name.startswith("events.out.tfevents.")
    writer.close()
    events = _events(tmp_path / name)
    assert events[0].file_version == "brain.Event:2"
    got = {(e.step, v.tag): v.simple_value for e in events[1:] for v in e.summary.value}
    assert got == {(7, "loss"): 1.5, (7, "grad_norm"): 0.25, (8, "loss"): 1.25, (8, "grad_norm"): 0.125}
