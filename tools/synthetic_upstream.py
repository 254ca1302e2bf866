"""A synthetic llama-server for benchmarks: speaks its HTTP API closely enough for our worker, as fast as it can.

A benchmark tool only (it isolates the proxy's own cost); never used to prove a feature.

Started with llama-server's own argv (``-m FILE --host 127.0.0.1[,PATH.sock] --port 0 --alias NAME -t N ...``):
unknown flags are ignored. With ``--port 0`` it prints ``main: server is listening on http://HOST:PORT`` on
stderr, as llama-server does (the worker parses that line).

- ``GET /health``: 200 ``{"status":"ok"}``; ``GET /v1/models``: the alias.
- ``POST /v1/chat/completions`` and ``/v1/completions``: ``max_tokens`` tokens (else ``--tokens`` /
  ``SYNTHETIC_TOKENS``, default 128). Streaming: one SSE chunk per token, each in its own write (llama-server
  sends each token as it is decoded), yielding to the event loop between tokens so that concurrent streams
  interleave; a final chunk with ``finish_reason`` and ``timings`` (plus a usage chunk with
  ``stream_options.include_usage``), then ``data: [DONE]``. Non-streaming: one JSON answer with ``usage``.
- As fast as possible by default: each token is its own write (its own ``send``, as llama-server does), and the
  writer yields to the event loop only on back-pressure, so the kernel coalesces what the reader has not read
  yet. ``SYNTHETIC_YIELD_EVERY`` (``--yield-every N``): yield one loop tick every N tokens instead (1: concurrent
  streams interleave token by token, and a fast reader wakes once per token). ``SYNTHETIC_DELAY_US``
  (``--delay-us``): a pause between tokens.

Raw asyncio (uvloop where installed), HTTP/1.1 keep-alive, chunked transfer encoding like llama-server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid

WORDS = [" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", ".", " And", " then"]
FINGERPRINT = "b0-synthetic"
MAX_HEADER = 64 * 1024
HIGH_WATER = 256 * 1024


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("-m", "--model", default="synthetic.gguf")
    p.add_argument("-a", "--alias", default="")
    p.add_argument("--tokens", type=int, default=int(os.environ.get("SYNTHETIC_TOKENS", "128")))
    p.add_argument("--delay-us", type=float, default=float(os.environ.get("SYNTHETIC_DELAY_US", "0")))
    p.add_argument("--yield-every", type=int, default=int(os.environ.get("SYNTHETIC_YIELD_EVERY", "0")))
    args, _unknown = p.parse_known_args(argv)  # llama-server's other flags (-t, -c, -np, ...) are ignored
    return args


def _chunk(payload: bytes) -> bytes:
    """One chunk of chunked transfer encoding."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _sse(doc: object) -> bytes:
    return _chunk(b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n")


def _timings(prompt_n: int, n: int, t0: float, t1: float) -> dict[str, float]:
    prompt_ms, predicted_ms = 0.01, max((time.perf_counter() - t1) * 1000, 1e-3)
    return {
        "cache_n": 0,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / max(prompt_n, 1),
        "prompt_per_second": prompt_n / prompt_ms * 1000,
        "predicted_n": n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / max(n, 1),
        "predicted_per_second": n / predicted_ms * 1000,
    }


class Upstream:
    def __init__(self, args: argparse.Namespace) -> None:
        self.alias = args.alias or os.path.basename(args.model)
        self.tokens = args.tokens
        self.delay = args.delay_us / 1e6
        self.yield_every = args.yield_every

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = (lines[0].split(" ", 2) + ["", ""])[:3]
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                await self.route(method, path.split("?", 1)[0], body, writer)
                if headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    @staticmethod
    def _json(writer: asyncio.StreamWriter, status: int, doc: object) -> None:
        body = json.dumps(doc, separators=(",", ":")).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "Error")
        writer.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\n"
            b"Keep-Alive: timeout=5, max=100000\r\n\r\n%s" % (status, reason.encode(), len(body), body)
        )

    async def route(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> None:
        if path == "/health":
            self._json(writer, 200, {"status": "ok"})
        elif path in ("/v1/models", "/models"):
            self._json(
                writer,
                200,
                {
                    "object": "list",
                    "data": [
                        {
                            "id": self.alias,
                            "object": "model",
                            "created": int(time.time()),
                            "owned_by": "llamacpp",
                        }
                    ],
                },
            )
        elif path == "/props":
            self._json(writer, 200, {"model_alias": self.alias, "total_slots": 1, "build_info": FINGERPRINT})
        elif method == "POST" and path in (
            "/v1/chat/completions",
            "/chat/completions",
            "/v1/completions",
            "/completions",
        ):
            try:
                req = json.loads(body or b"{}")
                assert isinstance(req, dict)
            except (ValueError, AssertionError):
                self._json(
                    writer,
                    400,
                    {"error": {"code": 400, "message": "invalid JSON", "type": "invalid_request_error"}},
                )
                return
            await self.complete(req, "chat" in path, writer)
        else:
            self._json(
                writer, 404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}
            )
        if writer.transport.get_write_buffer_size() > HIGH_WATER:
            await writer.drain()

    async def complete(self, req: dict[str, object], chat: bool, writer: asyncio.StreamWriter) -> None:
        t0 = time.perf_counter()
        max_tokens = req.get("max_tokens", req.get("n_predict"))
        n = max_tokens if isinstance(max_tokens, int) and max_tokens >= 0 else self.tokens
        prompt = json.dumps(req.get("messages") if chat else req.get("prompt"))
        prompt_n = max(1, len(prompt) // 4)
        rid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
        model = req.get("model") if isinstance(req.get("model"), str) else self.alias
        obj = "chat.completion" if chat else "text_completion"
        common = {"created": created, "id": rid, "model": model, "system_fingerprint": FINGERPRINT}
        usage = {"completion_tokens": n, "prompt_tokens": prompt_n, "total_tokens": n + prompt_n}
        if not req.get("stream"):
            text = "".join(WORDS[i % len(WORDS)] for i in range(n))
            choice: dict[str, object] = {"finish_reason": "length", "index": 0}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice.update(text=text, logprobs=None)
            self._json(
                writer,
                200,
                {
                    "choices": [choice],
                    **common,
                    "object": obj,
                    "usage": usage,
                    "timings": _timings(prompt_n, n, t0, t0),
                },
            )
            return
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
            b"Keep-Alive: timeout=5, max=100000\r\n\r\n"
        )
        chunk_obj = obj + ".chunk" if chat else obj
        if chat:
            writer.write(
                _sse(
                    {
                        "choices": [
                            {
                                "finish_reason": None,
                                "index": 0,
                                "delta": {"role": "assistant", "content": None},
                            }
                        ],
                        **common,
                        "object": chunk_obj,
                    }
                )
            )
        frames = []
        for word in WORDS:  # per request: the id and model are in every chunk
            choice = (
                {"finish_reason": None, "index": 0, "delta": {"content": word}}
                if chat
                else {"text": word, "index": 0, "logprobs": None, "finish_reason": None}
            )
            frames.append(_sse({"choices": [choice], **common, "object": chunk_obj}))
        t1 = time.perf_counter()
        transport = writer.transport
        write, delay, k, every = writer.write, self.delay, len(frames), self.yield_every
        for i in range(n):
            write(frames[i % k])
            if transport.get_write_buffer_size() > HIGH_WATER:
                await writer.drain()
            if transport.is_closing():
                return  # the client went away: stop generating, as llama-server does
            if delay:
                await asyncio.sleep(delay)
            elif every and (i + 1) % every == 0:
                await asyncio.sleep(0)  # let other streams (and a fast reader) in
        last = (
            {"finish_reason": "length", "index": 0, "delta": {}}
            if chat
            else {"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}
        )
        timings = _timings(prompt_n, n, t0, t1)
        stream_options = req.get("stream_options")
        if isinstance(stream_options, dict) and stream_options.get("include_usage"):
            write(_sse({"choices": [last], **common, "object": chunk_obj}))
            write(_sse({"choices": [], **common, "object": chunk_obj, "usage": usage, "timings": timings}))
        else:
            write(_sse({"choices": [last], **common, "object": chunk_obj, "timings": timings}))
        write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


async def serve(args: argparse.Namespace) -> None:
    upstream = Upstream(args)
    servers = []
    for host in args.host.split(","):  # as llama-server: addresses, and unix socket paths ending in .sock
        if host.endswith(".sock"):
            server = await asyncio.start_unix_server(upstream.handle, host, limit=MAX_HEADER, backlog=1024)
            where = f"unix://{host}"
        else:
            server = await asyncio.start_server(upstream.handle, host, args.port, limit=MAX_HEADER, backlog=1024)
            where = f"http://{host}:{server.sockets[0].getsockname()[1]}"
        servers.append(server)
        print(f"main: server is listening on {where} - starting the main loop", file=sys.stderr, flush=True)
    await asyncio.gather(*(server.serve_forever() for server in servers))


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.exit(main())
