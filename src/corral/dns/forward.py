"""Forwarding of names outside the DNS domains to upstream servers (recursors)."""

from __future__ import annotations

import asyncio
import logging
import secrets

from dnslib import RCODE, DNSError, DNSRecord

log = logging.getLogger(__name__)

_FLAG_QR = 0x80  # in the third byte of a message


class RecursorError(Exception):
    """A recursor gave no usable response: timed out, unreachable, malformed, or a failure RCODE."""


class Forwarder:
    """Sends a request to each recursor in turn and returns the first usable response.

    A response is usable when it matches the request (ID, response flag, question) and
    its RCODE is NOERROR or NXDOMAIN, as in Consul; any other RCODE moves on to the next
    recursor. Each recursor gets ``timeout`` seconds. A UDP request is forwarded over
    UDP, so a truncated response reaches the client, which then retries over TCP; a TCP
    request is forwarded over TCP.
    """

    def __init__(self, recursors: tuple[tuple[str, int], ...], timeout: float):
        self.recursors = recursors
        self.timeout = timeout

    async def forward(self, data: bytes, request: DNSRecord, over_tcp: bool) -> bytes | None:
        """Return the first usable response to ``data``, with the client's ID, or None if none came."""
        for recursor in self.recursors:
            # A fresh ID per attempt makes a forged or late response easy to reject.
            query_id = secrets.token_bytes(2)
            query = query_id + data[2:]
            try:
                async with asyncio.timeout(self.timeout):
                    if over_tcp:
                        response = await _exchange_tcp(query, recursor)
                    else:
                        response = await _exchange_udp(query, query_id, recursor)
                _check_response(response, query_id, request)
            except (OSError, TimeoutError, RecursorError, asyncio.IncompleteReadError) as exc:
                reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
                log.debug(
                    "dns recursor failed recursor=%s:%d qname=%s transport=%s error=%s",
                    *recursor, request.q.qname, "tcp" if over_tcp else "udp", reason,
                )
                continue
            return data[:2] + response[2:]
        return None


def _check_response(response: bytes, query_id: bytes, request: DNSRecord) -> None:
    if len(response) < 12 or response[:2] != query_id or not response[2] & _FLAG_QR:
        raise RecursorError("response does not match the request's ID")
    try:
        parsed = DNSRecord.parse(response)
    except DNSError as exc:
        raise RecursorError(f"malformed response: {exc}") from None
    rcode = parsed.header.rcode
    if rcode not in (RCODE.NOERROR, RCODE.NXDOMAIN):
        raise RecursorError(f"response code {RCODE.get(rcode)}")
    if request.questions and parsed.questions:
        expected, got = request.questions[0], parsed.questions[0]
        if str(got.qname).lower() != str(expected.qname).lower() or got.qtype != expected.qtype:
            raise RecursorError(f"response is for another question: {got.qname} {got.qtype}")


class _UpstreamProtocol(asyncio.DatagramProtocol):
    def __init__(self, query_id: bytes) -> None:
        self._query_id = query_id
        self.response: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr) -> None:
        # Datagrams with another ID are ignored: late answers to an earlier query or forgeries.
        if not self.response.done() and data[:2] == self._query_id:
            self.response.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # Usually ICMP port unreachable: nothing listens at the recursor's address.
        if not self.response.done():
            self.response.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.response.done():
            self.response.set_exception(exc or ConnectionError("socket closed"))


async def _exchange_udp(query: bytes, query_id: bytes, recursor: tuple[str, int]) -> bytes:
    loop = asyncio.get_running_loop()
    # A connected socket: the kernel drops datagrams from any address but the recursor's.
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _UpstreamProtocol(query_id), remote_addr=recursor
    )
    try:
        transport.sendto(query)
        return await protocol.response
    finally:
        transport.close()


async def _exchange_tcp(query: bytes, recursor: tuple[str, int]) -> bytes:
    reader, writer = await asyncio.open_connection(*recursor)
    try:
        writer.write(len(query).to_bytes(2, "big") + query)
        length = int.from_bytes(await reader.readexactly(2), "big")
        return await reader.readexactly(length)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
