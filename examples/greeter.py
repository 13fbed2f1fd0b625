"""A web service that registers itself with corral and reloads its greeting from the KV store.

It uses only the standard library and corral.client. With a dev cluster running:

    corral kv put config/greeter/greeting "Hello"
    python3 examples/greeter.py --port 8081            # or --check ttl
    curl http://127.0.0.1:8081/                        # Hello
    corral kv put config/greeter/greeting "Hello again"
    curl http://127.0.0.1:8081/                        # Hello again, without a restart

It registers the service `greeter` with the agent, with an HTTP check on
/healthz or a TTL check that it reports to itself. It serves GET / with the
greeting. It watches the KV key with blocking queries, so that a new value
is served as soon as it is written. SIGINT or SIGTERM deregisters the
service and stops. CORRAL_HTTP_ADDR names corral's HTTP API (default
127.0.0.1:8500).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from corral.client import Check, Client, CorralError

log = logging.getLogger("greeter")

DEFAULT_GREETING = "hello"


class Settings:
    """The configuration read from KV, shared by the watch thread and the request threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.greeting = DEFAULT_GREETING
        self.modify_index = 0
        self.loads = 0

    def update(self, greeting: str, modify_index: int) -> None:
        with self._lock:
            self.greeting = greeting
            self.modify_index = modify_index
            self.loads += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"greeting": self.greeting, "modify_index": self.modify_index, "loads": self.loads}


def make_handler(settings: Settings) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/":
                self._send(200, "text/plain", f"{settings.snapshot()['greeting']}\n".encode())
            elif self.path == "/healthz":
                self._send(200, "text/plain", b"ok\n")
            elif self.path == "/config":
                self._send(200, "application/json", json.dumps(settings.snapshot()).encode())
            else:
                self._send(404, "text/plain", b"not found\n")

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:
            log.debug("%s %s", self.address_string(), format % args)

    return Handler


def watch_config(client: Client, key: str, settings: Settings, min_interval: float) -> None:
    """Apply each new value of `key`; a missing key brings back the default greeting."""
    for entry in client.watch_key(key, min_interval=min_interval):
        if entry is None:
            settings.update(DEFAULT_GREETING, 0)
            log.info("configuration key missing, using the default key=%s", key)
            continue
        settings.update(entry.text().strip(), entry.modify_index)
        log.info("configuration reloaded key=%s modify_index=%d", key, entry.modify_index)


def report_ttl(client: Client, check_id: str, interval: float, stop: threading.Event) -> None:
    """Report the TTL check passing every `interval` seconds until `stop` is set."""
    while not stop.is_set():
        try:
            client.update_check(check_id, "passing", "serving requests")
        except CorralError as exc:
            log.warning("reporting the TTL check failed check=%s error=%s", check_id, exc)
        stop.wait(interval)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A greeter service that registers itself with corral.")
    parser.add_argument("--name", default="greeter", help="service name (default: greeter)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks a free one")
    parser.add_argument("--key", default="config/greeter/greeting", help="KV key holding the greeting")
    parser.add_argument("--check", choices=("http", "ttl"), default="http",
                        help="health check: the agent GETs /healthz, or this process reports a TTL")
    parser.add_argument("--check-interval", type=float, default=2.0,
                        help="seconds between HTTP checks, or the TTL of the TTL check (default: 2)")
    parser.add_argument("--min-interval", type=float, default=1.0,
                        help="minimum seconds between two reads of the key when it changes often (default: 1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    client = Client()
    settings = Settings()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(settings))
    port = server.server_address[1]
    service_id = f"{args.name}-{port}"

    if args.check == "http":
        check = Check.http(f"http://127.0.0.1:{port}/healthz", interval=args.check_interval, timeout=1)
    else:
        check = Check.ttl(args.check_interval)
    client.register_service(args.name, service_id=service_id, address="127.0.0.1", port=port,
                            tags=["example"], check=check)
    log.info("registered service=%s id=%s port=%d check=%s corral=%s",
             args.name, service_id, port, args.check, client.base_url)

    stop = threading.Event()
    threading.Thread(target=watch_config, args=(client, args.key, settings, args.min_interval),
                     daemon=True, name="watch-config").start()
    if args.check == "ttl":
        # Three reports per TTL, so that one late report does not turn the check critical.
        threading.Thread(target=report_ttl, args=(client, f"service:{service_id}", args.check_interval / 3, stop),
                         daemon=True, name="report-ttl").start()

    def shut_down(signum: int, frame: object) -> None:
        log.info("signal %s received; stopping", signal.Signals(signum).name)
        stop.set()
        # shutdown() waits for serve_forever() to return, which runs in this thread: call it from another.
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGINT, shut_down)
    signal.signal(signal.SIGTERM, shut_down)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        try:
            client.deregister_service(service_id)
            log.info("deregistered id=%s", service_id)
        except CorralError as exc:
            log.warning("deregistering failed id=%s error=%s", service_id, exc)
    sys.exit(0)


if __name__ == "__main__":
    main()
