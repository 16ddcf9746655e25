"""vLLM server mode on CPU: an unreachable server fails the trainer's construction within `vllm_server_timeout`, with
an error that names the fields to fix and how to start the server.

No vLLM is needed (none is installed on the CPU machines): `AMMTrainer` probes the server's `/health` before it loads
any model and before TRL's own checks run (TRL refuses `use_vllm` without vLLM in `DistillationTrainer.__init__`,
`VLLMGeneration._init_vllm` and `VLLMClient.__init__`, each through its module's `is_vllm_available`). So nothing is
patched here. TRL's own health check (`VLLMClient.check_server`) calls `requests.get` without a timeout: against the
silent server below it would block until the peer closes the connection, i.e. forever.
"""

import http.server
import socket
import threading
import time

import pytest

from amm_trl import AMMTrainer
from amm_trl.trainer import wait_for_vllm_server
from tests.test_trainer import make_config

TIMEOUT = 3


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: connecting is refused at once


@pytest.fixture
def silent_server():
    """Accepts TCP connections and never answers (a hung server, or a proxy in front of a dead one)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.mark.parametrize("where,address", [("refused", "url"), ("silent", "url"), ("refused", "host_port")])
def test_unreachable_server_fails_within_timeout_naming_the_fields(tiny, tiny_dataset, tmp_path, request, where,
                                                                    address):
    port = request.getfixturevalue("silent_server") if where == "silent" else closed_port()
    if address == "url":
        fields = {"vllm_server_base_url": f"http://127.0.0.1:{port}"}
        named = [f"vllm_server_base_url='http://127.0.0.1:{port}'"]
    else:
        fields = {"vllm_server_host": "127.0.0.1", "vllm_server_port": port}
        named = ["vllm_server_host='127.0.0.1'", f"vllm_server_port={port}"]
    args = make_config(tmp_path, use_vllm=True, vllm_mode="server", vllm_server_timeout=TIMEOUT, **fields)
    start = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        AMMTrainer(model=tiny["student"], teacher_model=tiny["teacher"], args=args, train_dataset=tiny_dataset)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert TIMEOUT - 0.5 <= elapsed <= TIMEOUT + 3, elapsed  # retried until the timeout, not (much) past it
    for text in named + [f"http://127.0.0.1:{port}", f"vllm_server_timeout={TIMEOUT}",
                         f"trl vllm-serve --model {tiny['student']} --port {port}"]:
        assert text in message, (text, message)
    assert ("ReadTimeout" if where == "silent" else "ConnectionError") in message


def test_healthy_server_passes_at_once(tmp_path):
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        args = make_config(tmp_path, use_vllm=True, vllm_mode="server", vllm_server_timeout=TIMEOUT,
                           vllm_server_base_url=f"http://127.0.0.1:{server.server_address[1]}/")
        start = time.monotonic()
        wait_for_vllm_server(args, "student")
        assert time.monotonic() - start < 1.0
    finally:
        server.shutdown()
        server.server_close()
