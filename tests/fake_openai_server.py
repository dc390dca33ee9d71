"""A local OpenAI-compatible server for tests and benchmarks (stdlib only, 127.0.0.1, a free port).

It answers ``POST /v1/chat/completions`` and ``GET /v1/models`` the way OpenAI, vLLM and llama.cpp
do, so the real ``openai`` client talks to it over real HTTP. Behaviour is scriptable:

- ``server.script([...])`` queues :class:`Scripted` actions consumed one per completion request, in
  order (an HTTP status with an error body, a raw malformed body, a delay longer than the client's
  timeout, or a given reply text);
- otherwise ``responder(request_json) -> str`` makes the reply text (default: ``"ok"``);
- ``latency_s`` delays every completion (simulated model latency, for benchmarks).

``server.completion_requests`` counts completion requests received (including ones that were
answered with an error); ``server.model_requests`` counts ``GET /models``; ``server.bodies`` keeps
the parsed request bodies; ``server.max_in_flight`` is the most completion requests handled at once.

Use as a context manager::

    with FakeOpenAIServer() as server:
        base_url = server.base_url          # "http://127.0.0.1:<port>/v1"
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass
class Scripted:
    """One scripted answer to a completion request.

    Attributes:
        status: HTTP status to send (200 = a normal completion built from ``text``).
        text: the reply content for status 200 (``None``: use the responder).
        raw_body: bytes sent as-is instead of a JSON completion (for malformed answers).
        delay_s: seconds to wait before answering (longer than the client timeout = a timeout).
        headers: extra response headers (e.g. ``{"Retry-After": "0"}``).
        echo_auth: put the request's Authorization header in the error message (to test that clients scrub keys).
    """

    status: int = 200
    text: str | None = None
    raw_body: bytes | None = None
    delay_s: float = 0.0
    headers: dict[str, str] | None = None
    echo_auth: bool = False


def completion_body(text: str, model: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """A ``chat.completion`` object as OpenAI returns it."""
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
    }


def word_count(text: str) -> int:
    """The fake server's token count: whitespace-separated words (at least 1)."""
    return max(1, len(text.split()))


class FakeOpenAIServer:
    """See the module docstring. ``model_names`` is what ``GET /models`` lists."""

    def __init__(self, responder: Callable[[dict[str, Any]], str] | None = None, latency_s: float = 0.0, model_names: tuple[str, ...] = ("fake-judge",)):
        self.responder = responder or (lambda request: "ok")
        self.latency_s = latency_s
        self.model_names = model_names
        self.completion_requests = 0
        self.model_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict[str, Any]] = []
        self._scripted: deque[Scripted] = deque()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def script(self, actions: list[Scripted]) -> None:
        """Queue actions for the next completion requests (one each, in order)."""
        with self._lock:
            self._scripted.extend(actions)

    def start(self) -> "FakeOpenAIServer":
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def _next_action(self, body: dict[str, Any]) -> Scripted:
        with self._lock:
            self.completion_requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.bodies.append(body)
            if self._scripted:
                return self._scripted.popleft()
        return Scripted(delay_s=self.latency_s)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # Headers and body go out in separate writes; without this, Nagle's algorithm and delayed ACKs add ~40 ms per reply.
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, format: str, *args: Any) -> None:  # silence per-request logging
                return

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    with server._lock:
                        server.model_requests += 1
                    data = [{"id": name, "object": "model", "created": 0, "owned_by": "fake"} for name in server.model_names]
                    self._send(200, json.dumps({"object": "list", "data": data}).encode())
                else:
                    self._send(404, json.dumps({"error": {"message": f"no route {self.path}", "type": "not_found"}}).encode())

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, json.dumps({"error": {"message": f"no route {self.path}"}}).encode())
                    return
                body = json.loads(raw)
                action = server._next_action(body)
                try:
                    self._complete(body, action)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _complete(self, body: dict[str, Any], action: Scripted) -> None:
                if action.delay_s:
                    time.sleep(action.delay_s)
                if action.raw_body is not None:
                    self._send(action.status, action.raw_body, action.headers)
                    return
                if action.status != 200:
                    message = f"scripted HTTP {action.status}"
                    if action.echo_auth:
                        message += f" for {self.headers.get('Authorization', '')}"
                    error = {"error": {"message": message, "type": "scripted", "code": action.status}}
                    self._send(action.status, json.dumps(error).encode(), action.headers)
                    return
                text = action.text if action.text is not None else server.responder(body)
                prompt_tokens = sum(word_count(str(message.get("content", ""))) for message in body.get("messages", []))
                reply = completion_body(text, body.get("model", "fake-judge"), prompt_tokens, word_count(text))
                self._send(200, json.dumps(reply).encode(), action.headers)

        return Handler


def autointerp_responder(request: dict[str, Any]) -> str:
    """Well-formed answers to :mod:`sae_pipeline.stages.autointerp` prompts: an explanation, or all-ones lists.

    Answering every excerpt with 1 gives a balanced accuracy of exactly 0.5, a number tests can check.
    """
    messages = request.get("messages", [])
    system = str(messages[0].get("content", "")) if messages else ""
    user = str(messages[-1].get("content", "")) if messages else ""
    if "EXPLANATION:" in system:
        return "The marked tokens look alike.\nEXPLANATION: a planted test concept"
    match = re.search(r"Answer with a list of (\d+) numbers", user)
    count = int(match.group(1)) if match else 1
    return "[" + ", ".join(["1"] * count) + "]"
