"""A small OpenAI-compatible server over our transformers engine, for tests: ``/v1/completions`` and
``/v1/chat/completions``.

It speaks the wire format of ``vllm serve`` for the fields magpie_hf sends: a prompt as text or token ids
(completions) or messages rendered with the tokenizer's chat template (chat), n, seed, stop,
stop_token_ids, max_tokens (chat: or max_completion_tokens), temperature, top_p, repetition_penalty,
response_format (``json_schema``, or llama.cpp's ``json_object`` with a ``schema``), ``structured_outputs``
``{"regex": ...}``, and ``usage``. Sample ``j`` of a request with seed ``s`` is drawn from seed
``s + j`` (vLLM's rule for the children of a request). Values it cannot honour (top_k or min_p that
filter) are refused with 400. ``GET /v1/models`` reports ``max_model_len``.

Test controls:

- ``POST /test/fail {"count": N, "status": 503, "retry_after": 0.2}``: the next N generation requests fail
  with that status (and a ``Retry-After`` header when given).
- ``POST /test/config {...}``: ``ignore_n`` (answer one choice whatever ``n``, like a server that ignores
  it), ``max_n`` (refuse ``n`` above this many slots with 400, like ``llama-server -np``),
  ``max_prompt_tokens`` (refuse longer prompts with vLLM's 400 "maximum context length"), ``html`` (answer
  every request, ``/v1/models`` too, with 200 and an HTML page, like a proxy's login page), ``delay`` (seconds
  to wait before answering any request: a silent server); ``{}`` resets.
- ``GET /test/stats``: ``requests_seen``; ``GET /test/requests``: the bodies of the generation requests
  seen (most recent last); ``POST /test/reset`` clears both.

Run:  python tests/openai_server.py --port 0     (prints ``LISTENING <port>`` once the model is loaded)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


class BadRequest(ValueError):
    """A request the server refuses with 400 and this message."""


class CompletionsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, engine, api_key: str | None = None, max_model_len: int = 8192):
        super().__init__(address, Handler)
        self.engine = engine
        self.api_key = api_key
        self.max_model_len = max_model_len
        self.lock = threading.Lock()  # the engine decodes one request at a time
        self.fail_count = 0
        self.fail_status = 503
        self.fail_headers: dict = {}
        self.requests_seen = 0
        self.bodies: list[dict] = []
        self.settings: dict = {}
        self._templates = None

    def chat_stops(self):
        """The end-of-turn stop strings and ids a chat server applies by itself (derived from the template)."""
        if self._templates is None:
            from magpie_hf.templates import derive_templates

            self._templates = derive_templates(self.engine.tokenizer)
        return self._templates.stop_strings, self._templates.stop_token_ids


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

    def _error(self, status: int, message: str, headers: dict | None = None) -> None:
        # the error envelope of vLLM >= 0.10 and of the OpenAI API
        self._send(status, {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}}, headers)

    def _read_json(self) -> dict:
        length = int(self.headers.get("Content-Length", 0))
        return json.loads(self.rfile.read(length) or b"{}")

    def _misbehave(self) -> bool:
        """Apply the ``delay`` and ``html`` test settings; True when the reply was sent (an HTML page)."""
        settings = dict(self.server.settings)
        if settings.get("delay"):
            time.sleep(float(settings["delay"]))
        if not settings.get("html"):
            return False
        data = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Please sign in</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        return True

    def do_GET(self):  # noqa: N802
        server = self.server
        if self.path.rstrip("/") == "/v1/models":
            if self._misbehave():
                return None
            card = {"id": "embedded", "object": "model", "owned_by": "test", "max_model_len": server.max_model_len}
            return self._send(200, {"object": "list", "data": [card]})
        if self.path == "/test/stats":
            return self._send(200, {"requests_seen": server.requests_seen})
        if self.path == "/test/requests":
            with server.lock:
                return self._send(200, {"requests": list(server.bodies)})
        self._error(404, f"no route {self.path}")

    def do_POST(self):  # noqa: N802
        server = self.server
        if self.path == "/test/fail":
            body = self._read_json()
            with server.lock:
                server.fail_count = int(body.get("count", 1))
                server.fail_status = int(body.get("status", 503))
                server.fail_headers = {"Retry-After": str(body["retry_after"])} if "retry_after" in body else {}
            return self._send(200, {"ok": True})
        if self.path == "/test/config":
            body = self._read_json()
            with server.lock:
                server.settings = dict(body)
            return self._send(200, {"ok": True})
        if self.path == "/test/reset":
            with server.lock:
                server.requests_seen, server.bodies, server.fail_count = 0, [], 0
            return self._send(200, {"ok": True})
        path = self.path.rstrip("/")
        if path not in GENERATION_PATHS:
            return self._error(404, f"no route {self.path}")
        body = self._read_json()
        if self._misbehave():
            return None
        with server.lock:
            server.requests_seen += 1
            if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                return self._error(401, "invalid api key")
            server.bodies.append({"path": path, **body})
            if server.fail_count > 0:
                server.fail_count -= 1
                return self._error(server.fail_status, "injected failure", server.fail_headers)
        try:
            reply = self._complete(body, chat=path.endswith("/chat/completions"))
        except BadRequest as err:
            return self._error(400, str(err))
        except (KeyError, TypeError, ValueError) as err:
            return self._error(400, f"bad request: {err}")
        self._send(200, reply)

    # ------------------------------------------------------------------ generation
    def _complete(self, body: dict, *, chat: bool) -> dict:
        from magpie_hf.engines import SamplingConfig

        server = self.server
        engine = server.engine
        tok = engine.tokenizer
        settings = dict(server.settings)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        stop_ids = list(body.get("stop_token_ids") or [])
        if chat:
            prompt = tok.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
            prompt_tokens = len(tok(prompt, add_special_tokens=False)["input_ids"])
            turn_stops, turn_ids = server.chat_stops()  # a chat server ends the assistant turn by itself
            stop, stop_ids = [*stop, *turn_stops], [*stop_ids, *turn_ids]
            max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        else:
            prompt = body["prompt"]
            if isinstance(prompt, list):
                if not all(isinstance(t, int) for t in prompt):
                    raise BadRequest("only one prompt per request is supported")
                prompt_tokens = len(prompt)
                prompt = tok.decode(prompt, skip_special_tokens=False)
            else:
                prompt_tokens = len(tok(prompt, add_special_tokens=False)["input_ids"])
            max_tokens = body.get("max_tokens") or 16
        n = int(body.get("n") or 1)
        limit = settings.get("max_prompt_tokens")
        if limit is not None and prompt_tokens > limit:
            raise BadRequest(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_tokens + int(max_tokens)} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion."
            )
        if settings.get("max_n") is not None and n > settings["max_n"]:
            raise BadRequest("n_cmpl cannot be greater than the number of slots, please increase -np")
        if body.get("top_k") not in (None, -1, 0) or body.get("min_p") not in (None, 0, 0.0):
            raise BadRequest(f"this test server cannot honour top_k={body.get('top_k')} min_p={body.get('min_p')}")
        if settings.get("ignore_n"):
            n = 1
        schema = None
        response_format = body.get("response_format") or {}
        if response_format.get("type") == "json_schema":
            schema = response_format["json_schema"]["schema"]
        elif response_format.get("type") == "json_object" and "schema" in response_format:  # llama.cpp's form
            schema = response_format["schema"]
        sampling = SamplingConfig(
            temperature=float(body["temperature"] if body.get("temperature") is not None else 1.0),
            top_p=float(body["top_p"] if body.get("top_p") is not None else 1.0),
            max_tokens=int(max_tokens),
            repetition_penalty=float(body.get("repetition_penalty") or 1.0),
            stop=tuple(stop),
            stop_token_ids=tuple(stop_ids),
            json_schema=schema,
            # vLLM's structured outputs (vllm 0.34 entrypoints/openai/completion/protocol.py:133)
            regex=(body.get("structured_outputs") or {}).get("regex"),
        )
        seed = body.get("seed")
        completions = []
        with server.lock:
            for j in range(n):  # child j of the request draws from seed + j, as in vLLM
                completions += engine.generate([prompt], sampling.replace(seed=None if seed is None else seed + j))[0]
        generated = sum(c.num_tokens for c in completions)
        if chat:
            choices = [
                {"index": i, "message": {"role": "assistant", "content": c.text.strip()}, "finish_reason": c.finish_reason, "logprobs": None}
                for i, c in enumerate(completions)
            ]
        else:
            choices = [
                {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                for i, c in enumerate(completions)
            ]
        return {
            "id": "cmpl-test",
            "object": "chat.completion" if chat else "text_completion",
            "model": body.get("model", "embedded"),
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated},
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key-env", default=None, help="env var holding the key clients must send")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=8192, help="reported by /v1/models")
    args = parser.parse_args(argv)

    import torch

    from magpie_hf.engines import EngineConfig, load_engine

    torch.set_num_threads(1)
    engine = load_engine(EngineConfig.embedded(batch_size=args.batch_size))
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    server = CompletionsServer((args.host, args.port), engine, api_key, args.max_model_len)
    print(f"LISTENING {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
