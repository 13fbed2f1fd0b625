"""The RecordIO decoder of the framework SDK: chunk boundaries anywhere, many records per chunk, bad input."""

from __future__ import annotations

import json
import random
import time

import pytest

from corral.sdk.recordio import MAX_LENGTH_DIGITS, RecordIODecoder, RecordIOError, encode

EVENTS = [
    {"type": "SUBSCRIBED", "subscribed": {"framework_id": {"value": "fw-1"}, "heartbeat_interval_seconds": 15}},
    {"type": "HEARTBEAT"},
    {"type": "OFFERS", "offers": {"offers": [{"id": {"value": "o-1"}, "hostname": "h\u00e9te"}]}},
    {"type": "UPDATE", "update": {"status": {"task_id": {"value": "t"}, "state": "TASK_RUNNING", "uuid": "AAE="}}},
]


def _stream(events=EVENTS) -> bytes:
    return b"".join(encode(json.dumps(event).encode()) for event in events)


def _decode_all(decoder: RecordIODecoder, chunks) -> list[dict]:
    records = []
    for chunk in chunks:
        records.extend(decoder.feed(chunk))
    decoder.close()
    return [json.loads(record) for record in records]


def test_encode_frames_length_in_bytes():
    assert encode(b'{"a":1}') == b'7\n{"a":1}'
    # The length counts bytes, not characters: "é" is two bytes in UTF-8.
    assert encode("\u00e9".encode()) == b"2\n\xc3\xa9"


def test_many_records_one_chunk():
    assert _decode_all(RecordIODecoder(), [_stream()]) == EVENTS


def test_every_split_point():
    stream = _stream()
    for split in range(len(stream) + 1):
        decoder = RecordIODecoder()
        assert _decode_all(decoder, [stream[:split], stream[split:]]) == EVENTS, f"split at byte {split}"


def test_one_byte_chunks():
    stream = _stream()
    decoder = RecordIODecoder()
    assert _decode_all(decoder, [stream[i:i + 1] for i in range(len(stream))]) == EVENTS
    assert decoder.pending == 0


def test_random_chunking():
    stream = _stream(EVENTS * 50)
    rng = random.Random(7)
    for _ in range(20):
        chunks, position = [], 0
        while position < len(stream):
            size = rng.randint(0, 64)
            chunks.append(stream[position:position + size])
            position += size
        assert _decode_all(RecordIODecoder(), chunks) == EVENTS * 50


def test_empty_chunk_changes_nothing():
    decoder = RecordIODecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(b"3\nab") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"c") == [b"abc"]


def test_zero_length_record():
    assert RecordIODecoder().feed(b"0\n2\nhi") == [b"", b"hi"]


def test_payload_may_contain_newlines_and_digits():
    payload = b"12\n34\n"
    assert RecordIODecoder().feed(encode(payload) + encode(payload)) == [payload, payload]


def test_pending_counts_partial_record():
    decoder = RecordIODecoder()
    decoder.feed(b"10\nabcd")
    assert decoder.pending == 4


@pytest.mark.parametrize(
    ("stream", "named"),
    [
        (b"abc\n{}", "'abc'"),
        (b"-5\nhello", "'-5'"),
        (b"\n{}", "b''"),
        (b"12\r\n{}", "'12\\r'"),
        (b" 2\n{}", "' 2'"),
        (b"2x", "'2x'"),
    ],
)
def test_bad_length_rejected(stream, named):
    decoder = RecordIODecoder()
    with pytest.raises(RecordIOError, match="invalid RecordIO length") as error:
        decoder.feed(stream)
    assert named in str(error.value)


def test_bad_length_after_good_record():
    decoder = RecordIODecoder()
    # The whole record before the bad bytes is returned, and the error is kept.
    assert decoder.feed(b"2\nhix\n") == [b"hi"]
    assert "'x'" in str(decoder.error)
    with pytest.raises(RecordIOError, match="'x'"):
        decoder.feed(b"")


def test_too_many_digits_rejected_before_newline():
    decoder = RecordIODecoder()
    with pytest.raises(RecordIOError, match="decimal digits"):
        decoder.feed(b"1" * (MAX_LENGTH_DIGITS + 1))


def test_record_over_limit_rejected():
    decoder = RecordIODecoder(max_record_size=10)
    assert decoder.feed(b"10\n0123456789") == [b"0123456789"]
    with pytest.raises(RecordIOError, match="11 bytes is larger than the limit of 10"):
        decoder.feed(b"11\n")


def test_decoder_stays_failed():
    decoder = RecordIODecoder()
    with pytest.raises(RecordIOError):
        decoder.feed(b"x\n")
    with pytest.raises(RecordIOError, match="'x'"):
        decoder.feed(b"2\nok")
    with pytest.raises(RecordIOError):
        decoder.close()


def test_close_inside_payload():
    decoder = RecordIODecoder()
    decoder.feed(b"5\nab")
    with pytest.raises(RecordIOError, match="2 of 5 payload bytes"):
        decoder.close()


def test_close_inside_header():
    decoder = RecordIODecoder()
    decoder.feed(b"2\nhi12")
    with pytest.raises(RecordIOError, match="without its newline"):
        decoder.close()


def test_close_on_boundary():
    decoder = RecordIODecoder()
    decoder.feed(b"2\nhi")
    decoder.close()


def test_negative_limit_rejected():
    with pytest.raises(ValueError, match="-1"):
        RecordIODecoder(max_record_size=-1)


def test_many_records_linear_time():
    # 100,000 small records in one chunk: a decoder that copied the rest of the
    # buffer after every record would take minutes here.
    stream = encode(b"{}") * 100_000
    started = time.perf_counter()
    records = RecordIODecoder().feed(stream)
    elapsed = time.perf_counter() - started
    assert len(records) == 100_000
    assert elapsed < 5.0
