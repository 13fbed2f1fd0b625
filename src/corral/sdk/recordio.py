"""RecordIO framing, as Mesos's HTTP APIs use it for event streams.

Each record is its length in bytes, written as ASCII decimal digits, then a
newline, then that many bytes of payload (for the scheduler API, one JSON
object): `12\\n{"type":"A"}`. A stream carries records back to back with
nothing between them, and HTTP chunk boundaries fall anywhere: inside the
length, between the length and its newline, or inside a payload.
"""

from __future__ import annotations

# The length of one record may have at most this many digits, so that a stream
# of digits without a newline is rejected instead of being buffered forever.
MAX_LENGTH_DIGITS = 19

# The largest payload the decoder accepts by default, in bytes. A master's
# OFFERS event for thousands of agents stays well below it.
DEFAULT_MAX_RECORD_SIZE = 64 * 1024 * 1024


class RecordIOError(ValueError):
    """The stream is not valid RecordIO: a bad length, an oversized record or a truncated end."""


def encode(payload: bytes) -> bytes:
    """Return `payload` framed as one RecordIO record."""
    return b"%d\n%s" % (len(payload), payload)


class RecordIODecoder:
    """Incremental decoder: feed it chunks as they arrive, get back whole records.

    When a chunk contains whole records followed by invalid bytes, `feed` returns
    those records and keeps the error in `error`. After an error every call
    raises it, because the position of the next record can no longer be known.
    """

    def __init__(self, max_record_size: int = DEFAULT_MAX_RECORD_SIZE):
        if max_record_size < 0:
            raise ValueError(f"max_record_size must be 0 or more bytes, got {max_record_size}")
        self.max_record_size = max_record_size
        self._buffer = bytearray()
        # The payload length of the record being read, once its header is complete.
        self._length: int | None = None
        self._error: RecordIOError | None = None

    @property
    def error(self) -> RecordIOError | None:
        """The error that made the stream undecodable, or None."""
        return self._error

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole record."""
        return len(self._buffer)

    def feed(self, chunk: bytes) -> list[bytes]:
        """Add `chunk` to the stream and return the records it completes, in order."""
        if self._error is not None:
            raise self._error
        self._buffer += chunk
        records: list[bytes] = []
        position = 0
        try:
            while True:
                if self._length is None:
                    newline = self._buffer.find(b"\n", position)
                    if newline < 0:
                        self._check_partial_header(position)
                        break
                    self._length = self._parse_length(self._buffer[position:newline])
                    position = newline + 1
                end = position + self._length
                if end > len(self._buffer):
                    break
                records.append(bytes(self._buffer[position:end]))
                position = end
                self._length = None
        except RecordIOError as error:
            self._error = error
            if not records:
                raise
        finally:
            # Drop the consumed bytes once per chunk, not once per record, so
            # that a chunk holding many records costs linear time.
            del self._buffer[:position]
        return records

    def close(self) -> None:
        """Check that the stream ended on a record boundary; raise RecordIOError if it did not."""
        if self._error is not None:
            raise self._error
        if self._buffer or self._length is not None:
            if self._length is None:
                detail = f"a length header without its newline ({bytes(self._buffer[:40])!r})"
            else:
                detail = f"{len(self._buffer)} of {self._length} payload bytes"
            self._error = RecordIOError(f"RecordIO stream ended inside a record: {detail}")
            raise self._error

    def _check_partial_header(self, start: int) -> None:
        header = self._buffer[start:]
        if len(header) > MAX_LENGTH_DIGITS or (header and not header.isdigit()):
            raise RecordIOError(
                f"invalid RecordIO length {bytes(header[:40])!r}: expected up to "
                f"{MAX_LENGTH_DIGITS} decimal digits and a newline"
            )

    def _parse_length(self, header: bytearray) -> int:
        if not header or len(header) > MAX_LENGTH_DIGITS or not header.isdigit():
            raise RecordIOError(
                f"invalid RecordIO length {bytes(header[:40])!r}: expected up to "
                f"{MAX_LENGTH_DIGITS} decimal digits before the newline"
            )
        length = int(header)
        if length > self.max_record_size:
            raise RecordIOError(
                f"RecordIO record of {length} bytes is larger than the limit of {self.max_record_size} bytes"
            )
        return length
