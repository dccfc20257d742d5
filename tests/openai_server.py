"""A loopback stand-in for an OpenAI-compatible `/v1/chat/completions` server (tests only).

No OpenAI-compatible server installs from PyPI here without a long native build (llama-cpp-python
ships only an sdist), so this implements the documented request/response shape: it checks the
request body and the bearer key, answers `chat.completion` objects, and can be told to fail the next
requests with 429 (with Retry-After), 500, a malformed body, a reply without `choices`, or a delay
longer than the client's timeout. It binds 127.0.0.1 only and shuts itself down after `lifetime_s`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Responder = Callable[[list[dict[str, str]], dict[str, Any]], str]


class FakeOpenAI:
    def __init__(self, responder: Responder, api_key: str | None = None, delay_s: float = 0.0,
                 lifetime_s: float = 120.0) -> None:
        self.responder = responder
        self.api_key = api_key
        self.delay_s = delay_s
        # consumed one per request: "429", "500", "malformed", "no_choices", "slow:<s>", and "echo" (a 400 whose
        # body repeats the request's Authorization header, as careless proxies do)
        self.faults: list[str] = []
        self.requests: list[dict[str, Any]] = []
        self.authorizations: list[str | None] = []  # the Authorization header of every request, in order
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    def _next_fault(self) -> str | None:
        with self._lock:
            return self.faults.pop(0) if self.faults else None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
                body = {"error": {"message": message, "type": "invalid_request_error", "code": status}}
                self._send(status, json.dumps(body).encode(), headers)

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                with server._lock:
                    server.authorizations.append(self.headers.get("Authorization"))
                if self.path != "/v1/chat/completions":
                    return self._error(404, f"no route {self.path}")
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self._error(401, "invalid api key")
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                messages = body.get("messages")
                if not body.get("model") or not isinstance(messages, list) or not all(
                        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                        and isinstance(m.get("content"), str) for m in messages):
                    return self._error(400, "model and messages[{role, content}] are required")
                with server._lock:
                    server.requests.append(body)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._answer(body, messages)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _answer(self, body: dict[str, Any], messages: list[dict[str, str]]) -> None:
                fault = server._next_fault()
                time.sleep(server.delay_s)
                if fault == "echo":
                    return self._error(400, f"bad request; you sent Authorization: {self.headers.get('Authorization')}")
                if fault == "429":
                    return self._error(429, "rate limited", {"Retry-After": "0"})
                if fault == "500":
                    return self._error(500, "internal error")
                if fault == "malformed":
                    return self._send(200, b'{"id": "x", "choices": [')
                if fault == "no_choices":
                    return self._send(200, json.dumps({"id": "x", "object": "chat.completion"}).encode())
                if fault and fault.startswith("slow:"):
                    time.sleep(float(fault.split(":")[1]))
                content = server.responder(messages, body)
                reply = {
                    "id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion", "created": int(time.time()),
                    "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                }
                self._send(200, json.dumps(reply).encode())

        return Handler
