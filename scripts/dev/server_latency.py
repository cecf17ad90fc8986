"""What the HTTP server (megakernel serve) adds to a generation's latency: the same prompt
through Engine.generate() and through POST /v1/completions, streamed and not, on one
engine in one process, as a client on the same machine sees it.

    python3 scripts/dev/server_latency.py [--model random:llama-3.2-1b] [--prompt-len 32]
                                          [--new-tokens 128] [--repeats 5]

Per path, the median over repeats (after one warm-up run each) of the time to the first
token (client side: from sending the request to the first text event; for the direct
call, the engine's own TTFT) and of ms per token after the first (streamed: between the
first and the last text events, per event; direct and non-streamed: the engine's count,
which the response carries). Greedy, EOS ignored, prompt graphs captured by the warm-up.
"""
from __future__ import annotations

import argparse
import http.client
import json
import statistics
import threading
import time

import torch

import megakernel
from megakernel.server import CompletionServer


def streamed(server, body: dict) -> tuple[float, float, int]:
    """(client TTFT ms, client ms/token, text events) of one streamed request."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=120)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}))
    response = conn.getresponse()
    times = []
    for line in response:
        if line.startswith(b"data: {") and b'"finish_reason": null' in line:
            times.append(time.perf_counter())
    conn.close()
    first, last = times[0], times[-1]
    return (first - t0) * 1000, (last - first) * 1000 / max(len(times) - 1, 1), len(times)


def whole(server, body: dict) -> tuple[float, float, dict]:
    """(client total ms, server ms/token, stats) of one non-streamed request."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=120)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=json.dumps(body))
    payload = json.loads(conn.getresponse().read())
    conn.close()
    return (time.perf_counter() - t0) * 1000, payload["stats"]["ms_per_token"], payload


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:llama-3.2-1b")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    engine = megakernel.Engine.from_pretrained(args.model, max_seq_len=1024)
    server = CompletionServer(engine, ("127.0.0.1", 0), args.model, log=None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    prompt = torch.randint(3, engine.config.vocab_size, (args.prompt_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    body = {"prompt": prompt, "max_tokens": args.new_tokens, "temperature": 0,
            "ignore_eos": True}
    device = torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu"
    print(f"{args.model} on {device}, backend {engine.backend_name}, prompt "
          f"{args.prompt_len} tokens, {args.new_tokens} new, median of {args.repeats}")

    rows = {"Engine.generate()": [], "POST /v1/completions, stream": [],
            "POST /v1/completions": []}
    for repeat in range(args.repeats + 1):
        direct = engine.generate(prompt, max_new_tokens=args.new_tokens, ignore_eos=True)
        # Fewer events than tokens where a token holds back the first bytes of a character.
        ttft, ms, _events = streamed(server, body)
        total, server_ms, payload = whole(server, body)
        assert payload["usage"]["completion_tokens"] == args.new_tokens
        if repeat == 0:
            continue            # warm-up: the prompt's graph is captured after it
        rows["Engine.generate()"].append((direct.stats.ttft_ms, direct.stats.ms_per_token))
        rows["POST /v1/completions, stream"].append((ttft, ms))
        rows["POST /v1/completions"].append((payload["stats"]["ttft_ms"], server_ms, total))
    print("path                            TTFT (ms)  ms/token  total (ms)")
    for name, values in rows.items():
        ttft = statistics.median(v[0] for v in values)
        ms = statistics.median(v[1] for v in values)
        total = (f"{statistics.median(v[2] for v in values):>10.2f}" if len(values[0]) > 2
                 else "")
        print(f"{name:<30}  {ttft:>9.3f}  {ms:>8.4f}  {total}")
    server.shutdown()
    server.server_close()


if __name__ == "__main__":
    main()
