"""An HTTP server with OpenAI's completion endpoints over one engine (`megakernel serve`).

    megakernel serve --model ./llama-1b --port 8000
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user",
         "content": "Hi"}], "max_tokens": 64, "stream": true}'

POST /v1/completions and /v1/chat/completions take OpenAI's request fields that mean
something at batch 1 (prompt or messages, max_tokens, temperature, top_p, stop, seed,
stream) and top_k and ignore_eos besides; fields that ask for what the engine does not do
(n > 1, logprobs, penalties, tools) are refused with 400 rather than ignored. Other
fields (user, model) are accepted and ignored: one server serves one model. GET
/v1/models and /health report it.

The engine holds one sequence, so requests run one at a time, in the order they take the
lock. A prompt that shares a long prefix with the last generation's tokens keeps its K/V
in the cache (reuse_prefix), so a conversation's next turn prefills only its new
message. A client that goes away mid-stream ends its generation there (what it generated
stays in the cache), and the next request goes on.
"""
from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .errors import DeviceHungError, InvalidRequestError, MegakernelError, first_line

MAX_BODY_BYTES = 16 << 20
COMPLETIONS_DEFAULT_MAX_TOKENS = 16     # OpenAI's default for /v1/completions
# A prompt keeps what the last generation left in the KV cache when that is at least this
# many tokens. Below it the whole prompt from its graph is as fast (1B on an H100: 2.0-2.3
# ms for prompts of 88-152 tokens, against 2.3-2.7 for a kept prefix's new tokens;
# benchmarks/RESULTS.md, entry 94) and gives the bits a fresh engine would.
REUSE_MIN_TOKENS = 128
# Request fields that would change what is generated in ways the engine does not offer,
# with the value that means "off" (a request may send that one).
UNSUPPORTED_FIELDS = {"n": 1, "best_of": 1, "logprobs": None, "top_logprobs": None,
                      "echo": False, "suffix": None, "presence_penalty": 0,
                      "frequency_penalty": 0, "logit_bias": None, "tools": None,
                      "functions": None, "response_format": None}


class RequestError(Exception):
    """A request the server answers with an HTTP error status and a one-line message."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class CompletionServer(ThreadingHTTPServer):
    """Serves `engine` at `address` ((host, port); port 0 picks a free one) under
    `model_name`. serve_forever() runs it (with an engine: one may be set once the socket
    is bound); each request has a thread, generations take turns on the engine."""

    daemon_threads = True

    def __init__(self, engine, address: tuple[str, int], model_name: str,
                 log=sys.stderr):
        super().__init__(address, CompletionHandler)
        self.engine = engine
        self.model_name = model_name
        self.engine_lock = threading.Lock()
        self.log_file = log
        self.created = int(time.time())

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def log(self, line: str) -> None:
        if self.log_file is not None:
            print(line, file=self.log_file, flush=True)


class CompletionHandler(BaseHTTPRequestHandler):
    server: CompletionServer
    server_version = "megakernel"
    # Each streamed piece is a small write: sent at once, not held back by Nagle's
    # algorithm until the client acknowledges the one before.
    disable_nagle_algorithm = True

    # Routing --------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def _get(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            hung = getattr(self.server.engine, "hung", False)
            status = HTTPStatus.SERVICE_UNAVAILABLE if hung else HTTPStatus.OK
            self._send_json({"status": "hung" if hung else "ok"}, status)
        elif path == "/v1/models":
            self._send_json({"object": "list", "data": [
                {"id": self.server.model_name, "object": "model",
                 "created": self.server.created, "owned_by": "megakernel"}]})
        else:
            raise RequestError(HTTPStatus.NOT_FOUND, f"no such path: GET {path}")

    def _post(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path not in ("/v1/completions", "/v1/chat/completions"):
            raise RequestError(HTTPStatus.NOT_FOUND, f"no such path: POST {path}")
        body = self._read_json()
        chat = path == "/v1/chat/completions"
        engine = self.server.engine
        prompt, options, stream = parse_request(body, chat, engine)
        with self.server.engine_lock:
            options["reuse_prefix"] = engine.reusable_prefix(prompt) >= REUSE_MIN_TOKENS
            if stream:
                self._stream(prompt, options, chat)
            else:
                result = engine.generate(prompt, **options)
                self._log_result(path, result)     # before the client can see the answer
                self._send_json(completion_record(result, chat, self.server.model_name))

    def _answer(self, handle) -> None:
        """Run a route; errors become an OpenAI-style error object with their status."""
        try:
            handle()
        except RequestError as e:
            self._send_error_json(e.status, str(e))
        except InvalidRequestError as e:
            self._send_error_json(HTTPStatus.BAD_REQUEST, str(e))
        except DeviceHungError as e:
            self._send_error_json(HTTPStatus.SERVICE_UNAVAILABLE, str(e))
        except (BrokenPipeError, ConnectionResetError):
            pass                # the client went away; its generation has ended
        except Exception as e:  # the engine's faults, or anything else: one line to the
            # client and the log; the engine recovers from its own errors and goes on
            self._send_error_json(HTTPStatus.INTERNAL_SERVER_ERROR, one_line_error(e))

    # Streaming ------------------------------------------------------------------------
    def _stream(self, prompt, options: dict, chat: bool) -> None:
        """Server-sent events, one chunk per text piece, then a chunk with the finish
        reason and usage, then [DONE]. Headers go out once the request has been checked
        (a bad one still gets its 400); an engine error later is sent as an error event."""
        engine, name = self.server.engine, self.server.model_name
        kind = "chat.completion.chunk" if chat else "text_completion"
        ident = new_id(chat)
        generation = engine.generate_stream(prompt, **options)
        with generation:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            if chat:
                self._event(chunk(ident, kind, name, {"role": "assistant", "content": ""},
                                  None, chat))
            try:
                for piece in generation:
                    if piece:
                        content = {"content": piece} if chat else piece
                        self._event(chunk(ident, kind, name, content, None, chat))
            except (BrokenPipeError, ConnectionResetError):
                raise
            except Exception as e:      # after the headers: the error as the last event
                message = one_line_error(e)
                self.server.log(f"POST {self.path}: 500 {message}")
                self._event({"error": error_object(message, HTTPStatus.INTERNAL_SERVER_ERROR)})
                return
        result = generation.result
        self._log_result(self.path, result)
        last = chunk(ident, kind, name, {} if chat else "", result.finish_reason, chat)
        last["usage"] = usage(result)
        last["stats"] = stats_record(result)
        self._event(last)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    # Plumbing -------------------------------------------------------------------------
    def _read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "the request needs a Content-Length")
        if int(length) > MAX_BODY_BYTES:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"the request body is over {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(HTTPStatus.BAD_REQUEST,
                               f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object")
        return body

    def _send_json(self, payload: dict, status: HTTPStatus = HTTPStatus.OK) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error_json(self, status: HTTPStatus, message: str) -> None:
        self.server.log(f"{self.command} {self.path}: {status.value} {message}")
        try:
            self._send_json({"error": error_object(message, status)}, status)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _log_result(self, path: str, result) -> None:
        self.server.log(f"POST {path}: {result.finish_reason}, {result.stats.line()}")

    def log_message(self, format, *args) -> None:
        pass     # one line per generation or error instead (CompletionServer.log)


def parse_request(body: dict, chat: bool, engine) -> tuple[list[int], dict, bool]:
    """(prompt token ids, generate()'s options, stream) from a request body, or
    InvalidRequestError naming the field at fault."""
    for name, off in UNSUPPORTED_FIELDS.items():
        value = body.get(name, off)
        if (bool(value) if off is None else value != off):
            raise InvalidRequestError(f"'{name}' is not supported (only {off!r})")
    if chat:
        ids = chat_prompt(body.get("messages"), engine)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]       # a batch of one
        if not isinstance(prompt, (str, list)) or isinstance(prompt, list) and any(
                isinstance(t, bool) or not isinstance(t, int) for t in prompt):
            raise InvalidRequestError("'prompt' must be a string or a list of token ids "
                                      "(one prompt per request)")
        ids = engine.encode_prompt(prompt)
    room = engine.max_seq_len - len(ids)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:       # chat: the rest of the context, as OpenAI's API does
        max_tokens = max(1, room if chat else min(COMPLETIONS_DEFAULT_MAX_TOKENS, room))
    options = dict(max_new_tokens=integer(max_tokens, "max_tokens"),
                   temperature=number(body.get("temperature", 1.0), "temperature"),
                   top_p=number(body.get("top_p", 1.0), "top_p"),
                   top_k=integer(body.get("top_k", 0), "top_k"),
                   seed=body.get("seed"), stop=body.get("stop") or None,
                   ignore_eos=bool(body.get("ignore_eos", False)))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequestError(f"'stream' must be true or false, got {stream!r}")
    return ids, options, stream


def chat_prompt(messages, engine) -> list[int]:
    """The conversation rendered by the model's chat template, with the assistant's turn
    opened."""
    from .tokenizer import chat_messages

    tokenizer = engine.tokenizer
    if tokenizer is None or not tokenizer.has_chat_template:
        raise InvalidRequestError("this model's tokenizer has no chat template: use "
                                  "/v1/completions")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty list of messages")
    return tokenizer.apply_chat_template(chat_messages(messages))


def integer(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"'{name}' must be an integer, got {value!r}")
    return value


def number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"'{name}' must be a number, got {value!r}")
    return float(value)


def one_line_error(e: Exception) -> str:
    """The engine's own errors as they read; anything else with its type's name."""
    return str(e) if isinstance(e, MegakernelError) else f"{type(e).__name__}: {first_line(e)}"


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def error_object(message: str, status: HTTPStatus) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"message": message, "type": kind, "code": status.value}


def usage(result) -> dict:
    prompt, new = len(result.prompt_token_ids), len(result.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}


STATS_FIELDS = ("ttft_ms", "ms_per_token", "tokens_per_s", "reused_tokens")


def stats_record(result) -> dict:
    """The generation's timing, as JSON (GenerationStats.as_json)."""
    stats = result.stats.as_json()
    return {name: stats[name] for name in STATS_FIELDS}


def chunk(ident: str, kind: str, model: str, content, finish_reason, chat: bool) -> dict:
    choice = {"index": 0, "finish_reason": finish_reason}
    choice.update({"delta": content} if chat else {"text": content, "logprobs": None})
    return {"id": ident, "object": kind, "created": int(time.time()), "model": model,
            "choices": [choice]}


def completion_record(result, chat: bool, model: str) -> dict:
    choice = {"index": 0, "finish_reason": result.finish_reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": result.text}
    else:
        choice.update(text=result.text, logprobs=None)
    return {"id": new_id(chat), "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage(result), "stats": stats_record(result)}
