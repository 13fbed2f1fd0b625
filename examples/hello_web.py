"""A small HTTP service for the hello-web example job, on the standard library only.

It listens on the port corral assigns (the PORT variable), answers `GET /`
with the greeting that corral rendered from the KV key
config/hello-web/greeting into GREETING, and `GET /healthz` with 200 for
the health check.
"""

import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GREETING = os.environ.get("GREETING", "hello")
TASK_ID = os.environ.get("CORRAL_TASK_ID", "")


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._send(200, "text/plain", b"ok\n")
        elif self.path == "/":
            self._send(200, "text/plain", f"{GREETING}\n".encode())
        elif self.path == "/info":
            body = json.dumps({"greeting": GREETING, "task": TASK_ID, "pid": os.getpid()})
            self._send(200, "application/json", body.encode())
        else:
            self._send(404, "text/plain", b"not found\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


def main() -> None:
    port = int(os.environ["PORT"])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"hello-web task {TASK_ID} listening on 127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
