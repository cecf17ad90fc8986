"""The HTTP server (megakernel/server.py, `megakernel serve`): OpenAI's completion
endpoints against the engine's own generations, streamed and not, its refusals, clients
that go away, requests that arrive together; on the CPU, and once on the GPU."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse

import pytest

import megakernel
from megakernel.server import REUSE_MIN_TOKENS, CompletionServer
from megakernel.tokenizer import ByteTokenizer

CHAT_FORMAT = "User: {user}\nAssistant: "
GREEDY = dict(temperature=0, ignore_eos=True)


def byte_chat_engine(**kwargs):
    """random:tiny with a byte tokenizer that has a chat format."""
    engine = megakernel.Engine.from_pretrained("random:tiny", max_seq_len=512, **kwargs)
    engine.tokenizer = ByteTokenizer(256, 257, vocab_size=engine.config.vocab_size,
                                     chat_format=CHAT_FORMAT)
    return engine


def start(engine):
    server = CompletionServer(engine, ("127.0.0.1", 0), "tiny", log=None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def served():
    """(server, a second engine of the same weights to compare with)."""
    server = start(byte_chat_engine(device="cpu", backend="torch"))
    yield server, byte_chat_engine(device="cpu", backend="torch")
    server.shutdown()
    server.server_close()


def connect(server) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(*server.server_address[:2], timeout=60)


def request(server, method: str, path: str, body=None) -> tuple[int, dict]:
    conn = connect(server)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data)
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    return response.status, payload


def events(response) -> list:
    """A server-sent event stream's payloads, [DONE] included as the string."""
    out = []
    for line in response.read().decode().split("\n"):
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def stream(server, path: str, body: dict) -> list:
    conn = connect(server)
    conn.request("POST", path, body=json.dumps({**body, "stream": True}).encode())
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/event-stream"
    out = events(response)
    conn.close()
    return out


def assert_still_answers(server, engine):
    """A completion after whatever went before is still the engine's own generation."""
    status, body = request(server, "POST", "/v1/completions",
                           {"prompt": "Hello", "max_tokens": 5, **GREEDY})
    assert status == 200
    assert body["choices"][0]["text"] == engine.generate("Hello", max_new_tokens=5,
                                                         **GREEDY).text


def test_a_completion_is_the_engine_s_generation(served):
    server, engine = served
    expected = engine.generate("Hello", max_new_tokens=12, **GREEDY)
    status, body = request(server, "POST", "/v1/completions",
                           {"model": "whatever", "prompt": "Hello", "max_tokens": 12,
                            "user": "someone", **GREEDY})
    assert status == 200
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["choices"][0]["text"] == expected.text
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(expected.prompt_token_ids),
                             "completion_tokens": 12,
                             "total_tokens": len(expected.prompt_token_ids) + 12}
    assert body["stats"]["ttft_ms"] > 0 and body["stats"]["ms_per_token"] > 0
    # Token ids as the prompt, and OpenAI's default of 16 new tokens.
    ids = expected.prompt_token_ids
    status, body = request(server, "POST", "/v1/completions", {"prompt": ids, **GREEDY})
    assert status == 200 and body["usage"]["completion_tokens"] == 16
    assert body["choices"][0]["text"].startswith(expected.text)


def test_a_streamed_completion_is_the_engine_s_generation_piece_by_piece(served):
    server, engine = served
    pieces = []
    expected = engine.generate("Hello", max_new_tokens=10, stop_token_ids=[],
                               stream=lambda _t, piece: pieces.append(piece), **GREEDY)
    got = stream(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 10, **GREEDY})
    assert got[-1] == "[DONE]"
    chunks = got[:-1]
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == [p for p in pieces if p]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 10
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected.text
    assert len({c["id"] for c in chunks}) == 1


def test_chat_completions_render_the_conversation_and_keep_it_in_the_cache(served):
    server, engine = served
    messages = [{"role": "user", "content": "hi there " * 20}]
    ids = engine.tokenizer.apply_chat_template(messages)
    expected = engine.generate(ids, max_new_tokens=8, **GREEDY)
    status, body = request(server, "POST", "/v1/chat/completions",
                           {"messages": messages, "max_tokens": 8, **GREEDY})
    assert status == 200 and body["object"] == "chat.completion"
    reply = body["choices"][0]["message"]
    assert reply == {"role": "assistant", "content": expected.text}
    # The next turn, streamed: the conversation so far (over REUSE_MIN_TOKENS) stays in
    # the cache, and the reply is what a whole prefill gives.
    turn = messages + [reply, {"role": "user", "content": "and?"}]
    ids = engine.tokenizer.apply_chat_template(turn)
    assert len(expected.prompt_token_ids) > REUSE_MIN_TOKENS
    expected = engine.generate(ids, max_new_tokens=8, **GREEDY)
    got = stream(server, "/v1/chat/completions", {"messages": turn, "max_tokens": 8, **GREEDY})
    assert got[0]["object"] == "chat.completion.chunk"
    assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in got[:-1])
    assert text == expected.text
    assert got[-2]["stats"]["reused_tokens"] > REUSE_MIN_TOKENS


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/completions", b"{bad", 400, "not valid JSON"),
    ("/v1/completions", [1, 2], 400, "JSON object"),
    ("/v1/completions", {}, 400, "'prompt' must be"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "one prompt per request"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_new_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "8"}, 400, "'max_tokens' must be"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "'n' is not supported"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 5}, 400, "'logprobs' is not supported"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "'stream' must be"),
    ("/v1/completions", {"prompt": "hi", "seed": "x"}, 400, "seed"),
    ("/v1/completions", {"prompt": [1, 10**9]}, 400, "out of range"),
    ("/v1/completions", {"prompt": "x" * 600}, 400, "longer than max_seq_len"),
    ("/v1/chat/completions", {"messages": []}, 400, "'messages' must be"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("/v1/embeddings", {"input": "x"}, 404, "no such path"),
])
def test_a_bad_request_gets_its_status_and_one_line_and_the_server_goes_on(
        served, path, body, status, message):
    server, engine = served
    got, payload = request(server, "POST", path, body)
    assert got == status
    assert message in payload["error"]["message"]
    assert "\n" not in payload["error"]["message"]
    assert payload["error"]["type"] == "invalid_request_error"
    assert_still_answers(server, engine)


def test_a_bad_request_streamed_gets_its_status_before_any_event(served):
    server, _ = served
    conn = connect(server)
    conn.request("POST", "/v1/completions",
                 body=json.dumps({"prompt": "hi", "max_tokens": -1, "stream": True}).encode())
    response = conn.getresponse()
    assert response.status == 400
    assert "max_new_tokens" in json.loads(response.read())["error"]["message"]


def test_an_unexpected_failure_is_a_500_with_one_line_and_the_server_goes_on(
        served, monkeypatch):
    server, engine = served

    def fail(*_args, **_kwargs):
        raise RuntimeError("something broke\nwith a second line")

    with monkeypatch.context() as m:
        m.setattr(server.engine, "generate", fail)
        status, body = request(server, "POST", "/v1/completions",
                               {"prompt": "Hello", "max_tokens": 3})
    assert status == 500
    assert body["error"] == {"message": "RuntimeError: something broke",
                             "type": "server_error", "code": 500}
    assert_still_answers(server, engine)
    # Streamed, the failure comes after the headers: the stream's last event.
    with monkeypatch.context() as m:
        m.setattr(server.engine.backend, "decode_steps", fail)
        got = stream(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 8,
                                                 **GREEDY})
    assert got[-1] == {"error": {"message": "RuntimeError: something broke",
                                 "type": "server_error", "code": 500}}
    assert "[DONE]" not in got
    assert_still_answers(server, engine)


def test_models_and_health(served):
    server, _ = served
    status, body = request(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["tiny"]
    assert request(server, "GET", "/health") == (200, {"status": "ok"})
    assert request(server, "GET", "/v2/anything")[0] == 404


def test_a_client_gone_mid_stream_ends_its_generation_and_the_next_request_goes_on(served):
    server, engine = served
    whole = engine.generate("Hello", max_new_tokens=400, **GREEDY)
    sequence = whole.prompt_token_ids + whole.token_ids
    body = json.dumps({"prompt": "Hello", "max_tokens": 400, "stream": True, **GREEDY})
    with socket.create_connection(server.server_address[:2], timeout=60) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                     f"{len(body)}\r\n\r\n{body}".encode())
        received = b""
        while b"data: " not in received:
            received += sock.recv(4096)
    # Gone with ~400 tokens to come: the generation ends at the next pieces it sends, and
    # the cache keeps what it had generated (a prefix of the whole generation's tokens).
    assert server.engine_lock.acquire(timeout=60)
    server.engine_lock.release()
    kept = server.engine.reusable_prefix(sequence)
    assert len(whole.prompt_token_ids) < kept < len(sequence) - 100
    assert_still_answers(server, engine)


def test_requests_that_arrive_together_take_turns(served):
    server, engine = served
    prompts = ["Hello", "Good day", "Hi", "Greetings"]
    expected = {p: engine.generate(p, max_new_tokens=6, **GREEDY).text for p in prompts}
    got = {}

    def ask(prompt):
        got[prompt] = request(server, "POST", "/v1/completions",
                              {"prompt": prompt, "max_tokens": 6, **GREEDY})

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert {p: (s, b["choices"][0]["text"]) for p, (s, b) in got.items()} == \
        {p: (200, text) for p, text in expected.items()}


def test_sampled_requests_follow_their_seed(served):
    server, _ = served
    body = {"prompt": "Hello", "max_tokens": 8, "temperature": 0.9, "top_k": 20, "seed": 7}
    first = request(server, "POST", "/v1/completions", body)[1]["choices"][0]["text"]
    again = request(server, "POST", "/v1/completions", body)[1]["choices"][0]["text"]
    other = request(server, "POST", "/v1/completions", {**body, "seed": 8})[1]
    assert first == again and other["choices"][0]["text"] != first


def test_the_serve_command_answers_and_stops_on_ctrl_c():
    proc = subprocess.Popen(
        [sys.executable, "-m", "megakernel", "serve", "--model", "random:tiny", "--device",
         "cpu", "--port", "0", "--max-seq-len", "256"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving random:tiny at http://127.0.0.1:"), line
        url = urllib.parse.urlsplit(line.split()[3])
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps(
            {"prompt": "Hello", "max_tokens": 4, **GREEDY}).encode())
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["usage"]["completion_tokens"] == 4
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "POST /v1/completions: length" in err and "stopped" in err
    assert "Traceback" not in err


def test_the_serve_command_refuses_a_port_in_use():
    server = start(byte_chat_engine(device="cpu", backend="torch"))
    try:
        r = subprocess.run([sys.executable, "-m", "megakernel", "serve", "--device", "cpu",
                            "--port", str(server.server_address[1]), "--quiet"],
                           capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
        server.server_close()
    assert r.returncode == 2
    assert r.stderr.startswith("error: cannot listen on 127.0.0.1:")
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.gpu
def test_the_server_on_the_megakernel():
    """Chained launches behind the server: a streamed completion, greedy and sampled, is
    the engine's own, and a conversation's second turn keeps the first in the cache."""
    server = start(byte_chat_engine(device="cuda", backend="megakernel"))
    engine = byte_chat_engine(device="cuda", backend="megakernel")
    try:
        for sampling in (GREEDY, dict(temperature=0.8, top_k=40, seed=3, ignore_eos=True)):
            expected = engine.generate("Hello", max_new_tokens=40, **sampling)
            got = stream(server, "/v1/completions",
                         {"prompt": "Hello", "max_tokens": 40, **sampling})
            assert "".join(c["choices"][0]["text"] for c in got[:-1]) == expected.text
        messages = [{"role": "user", "content": "hi there " * 20}]
        first = request(server, "POST", "/v1/chat/completions",
                        {"messages": messages, "max_tokens": 20, **GREEDY})[1]
        turn = messages + [first["choices"][0]["message"], {"role": "user", "content": "?"}]
        second = request(server, "POST", "/v1/chat/completions",
                         {"messages": turn, "max_tokens": 20, **GREEDY})[1]
        assert second["stats"]["reused_tokens"] > REUSE_MIN_TOKENS
        assert second["usage"]["completion_tokens"] == 20
    finally:
        server.shutdown()
        server.server_close()
