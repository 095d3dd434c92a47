"""TensorBoard event files: CRC-32C against its standard check value, record framing."""

import os
import struct

from deepseek_jax.training import metrics


def test_crc32c_check_value():
    # Unmasking the masked CRC recovers CRC-32C("123456789") = 0xE3069283 (the standard check value).
    masked = metrics._masked_crc32c(b"123456789")
    rotated = (masked - 0xA282EAD8) & 0xFFFFFFFF
    assert ((rotated << 15) | (rotated >> 17)) & 0xFFFFFFFF == 0xE3069283


def test_event_file_records(tmp_path):
    writer = metrics.EventWriter(str(tmp_path))
    writer.scalars(7, {"loss": 1.5})
    raw = (tmp_path / os.listdir(tmp_path)[0]).read_bytes()
    records, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack("<Q", raw[offset:offset + 8])
        assert struct.unpack("<I", raw[offset + 8:offset + 12])[0] == metrics._masked_crc32c(raw[offset:offset + 8])
        payload = raw[offset + 12:offset + 12 + length]
        assert struct.unpack("<I", raw[offset + 12 + length:offset + 16 + length])[0] == metrics._masked_crc32c(payload)
        records.append(payload)
        offset += 16 + length
    assert len(records) == 2 and b"brain.Event:2" in records[0]
    assert b"loss" in records[1] and struct.pack("<f", 1.5) in records[1] and b"\x10\x07" in records[1]
