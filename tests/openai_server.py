"""A small OpenAI-compatible ``/v1/completions`` server over our transformers engine, for tests.

It speaks the same wire format as ``vllm serve`` for the fields magpie_hf sends (prompt as text or
token ids, n, seed, stop, stop_token_ids, max_tokens, temperature, top_p, repetition_penalty) and
reports ``usage``. For retry tests, ``POST /test/fail {"count": N, "status": 503}`` makes the next N
completion requests fail with that status.

Run:  python tests/openai_server.py --port 0     (prints ``LISTENING <port>`` once the model is loaded)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class CompletionsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, engine, api_key: str | None = None):
        super().__init__(address, Handler)
        self.engine = engine
        self.api_key = api_key
        self.lock = threading.Lock()  # the engine decodes one request at a time
        self.fail_count = 0
        self.fail_status = 503
        self.fail_headers: dict = {}
        self.requests_seen = 0


class Handler(BaseHTTPRequestHandler):
    server: CompletionsServer

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _read_json(self) -> dict:
        length = int(self.headers.get("Content-Length", 0))
        return json.loads(self.rfile.read(length) or b"{}")

    def do_GET(self):  # noqa: N802
        if self.path.rstrip("/") == "/v1/models":
            return self._send(200, {"object": "list", "data": [{"id": "embedded", "object": "model"}]})
        if self.path == "/test/stats":
            return self._send(200, {"requests_seen": self.server.requests_seen})
        self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):  # noqa: N802
        server = self.server
        if self.path == "/test/fail":
            body = self._read_json()
            with server.lock:
                server.fail_count = int(body.get("count", 1))
                server.fail_status = int(body.get("status", 503))
                server.fail_headers = {"Retry-After": str(body["retry_after"])} if "retry_after" in body else {}
            return self._send(200, {"ok": True})
        if self.path.rstrip("/") != "/v1/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
            return self._send(401, {"error": {"message": "invalid api key"}})
        body = self._read_json()
        with server.lock:
            server.requests_seen += 1
            if server.fail_count > 0:
                server.fail_count -= 1
                return self._send(server.fail_status, {"error": {"message": "injected failure"}}, server.fail_headers)
        try:
            reply = self._complete(body)
        except (KeyError, TypeError, ValueError) as err:
            return self._send(400, {"error": {"message": f"bad request: {err}"}})
        self._send(200, reply)

    def _complete(self, body: dict) -> dict:
        from magpie_hf.engines import SamplingConfig

        engine = self.server.engine
        prompt = body["prompt"]
        if isinstance(prompt, list):
            if not all(isinstance(t, int) for t in prompt):
                raise ValueError("only one prompt per request is supported")
            prompt_tokens = len(prompt)
            prompt = engine.tokenizer.decode(prompt, skip_special_tokens=False)
        else:
            prompt_tokens = len(engine.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        stop = body.get("stop") or ()
        sampling = SamplingConfig(
            temperature=float(body.get("temperature", 1.0)),
            top_p=float(body.get("top_p", 1.0)),
            max_tokens=int(body.get("max_tokens", 16)),
            n=int(body.get("n", 1)),
            seed=body.get("seed"),
            repetition_penalty=float(body.get("repetition_penalty", 1.0)),
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            stop_token_ids=tuple(body.get("stop_token_ids") or ()),
        )
        with self.server.lock:
            completions = engine.generate([prompt], sampling)[0]
        return {
            "id": "cmpl-test",
            "object": "text_completion",
            "model": body.get("model", "embedded"),
            "choices": [
                {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                for i, c in enumerate(completions)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": sum(c.num_tokens for c in completions),
                "total_tokens": prompt_tokens + sum(c.num_tokens for c in completions),
            },
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key-env", default=None, help="env var holding the key clients must send")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    import torch

    from magpie_hf.engines import EngineConfig, load_engine

    torch.set_num_threads(1)
    engine = load_engine(EngineConfig.embedded(batch_size=args.batch_size))
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    server = CompletionsServer((args.host, args.port), engine, api_key)
    print(f"LISTENING {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
