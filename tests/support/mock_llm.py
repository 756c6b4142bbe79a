"""An OpenAI-compatible model server on loopback TLS: enough of the chat completions API
(streaming and not) for OpenCode's ``@ai-sdk/openai-compatible`` provider."""

from __future__ import annotations

import http.server
import json
import ssl
import threading
import time
from typing import Any

ANSWER = "MOCK-ANSWER-42"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def _json(self, obj: Any, status: int = 200) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.server.record("GET", self.path, None)
        self._json(
            {"object": "list", "data": [{"id": m, "object": "model"} for m in self.server.models]}
        )

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        req = json.loads(self.rfile.read(length) or b"{}")
        self.server.record("POST", self.path, req.get("model"))
        base = {"id": "chatcmpl-1", "created": int(time.time()), "model": req.get("model", "")}
        if not req.get("stream"):
            self._json(
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": ANSWER},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
                }
            )
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = {**base, "object": "chat.completion.chunk"}
        events: list[Any] = [
            {
                **chunk,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ANSWER},
                        "finish_reason": None,
                    }
                ],
            },
            {
                **chunk,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
            },
            "[DONE]",
        ]
        for ev in events:
            data = (
                b"data: "
                + (ev.encode() if isinstance(ev, str) else json.dumps(ev).encode())
                + b"\n\n"
            )
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    models: list[str]
    calls: list[tuple[str, str, str | None]]
    lock: threading.Lock

    def record(self, method: str, path: str, model: str | None) -> None:
        with self.lock:
            self.calls.append((method, path, model))


class MockLLM:
    def __init__(self, tls: ssl.SSLContext, models: list[str]) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.models = models
        self._server.calls = []
        self._server.lock = threading.Lock()
        self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def calls(self) -> list[tuple[str, str, str | None]]:
        with self._server.lock:
            return list(self._server.calls)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
