"""`python tests/relay.py UPSTREAM PORT`: an HTTP relay that forwards every request to UPSTREAM (a vLLM server) and
its answer back. Killing the relay stands for the server's crash as its clients see it (connections reset, then
refused) while the real server behind it lives on for the next test."""

import http.server
import sys
import urllib.error
import urllib.request

UPSTREAM = sys.argv[1].rstrip("/")


class Relay(http.server.BaseHTTPRequestHandler):
    def _forward(self, body: bytes | None) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
        request = urllib.request.Request(UPSTREAM + self.path, data=body, headers=headers, method=self.command)
        try:
            with urllib.request.urlopen(request, timeout=600) as answer:
                status, payload, kind = answer.status, answer.read(), answer.headers.get("Content-Type", "")
        except urllib.error.HTTPError as error:
            status, payload, kind = error.code, error.read(), error.headers.get("Content-Type", "")
        self.send_response(status)
        self.send_header("Content-Type", kind or "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        self._forward(None)

    def do_POST(self) -> None:
        self._forward(self.rfile.read(int(self.headers.get("Content-Length", 0))))

    def log_message(self, *args) -> None:
        pass


if __name__ == "__main__":
    http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Relay).serve_forever()
