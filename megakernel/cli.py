"""Command line: low-latency single-prompt decoding, a chat whose history stays in the KV
cache, an OpenAI-style HTTP server, and program inspection.

    megakernel generate --model random:tiny --prompt "Hello" --max-new-tokens 32
    megakernel chat --model ./llama-1b --system "You are terse."
    megakernel serve --model ./llama-1b --port 8000
    megakernel program --model random:llama-3.2-1b --num-sms 132

Errors the user can fix print one line on stderr and exit with status 2 (1 for faults
inside the engine, 130 on Ctrl-C, 141 when stdout's reader has gone, as after `| head`);
no traceback. In a chat, a turn's error or a Ctrl-C during its reply ends that turn only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULT_MODEL = "random:tiny"


def _add_decoding_args(g: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The model, engine and sampling options that generate and chat share."""
    _add_engine_args(g)
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop where the text contains TEXT, which is not printed (repeatable)")


def _add_engine_args(g: argparse.ArgumentParser) -> None:
    """The model and engine options of every command that loads one."""
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="checkpoint dir, hub id, or random:<tiny|llama-3.2-1b|llama-3.2-3b|"
                        "llama-3.1-8b> (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="weights seed for random: models and "
                   "the sampling seed (serve: for requests that name none)")
    g.add_argument("--backend", choices=["megakernel", "torch", "reference"], default=None,
                   help="default: megakernel on a supported GPU, else torch")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    g.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 "
                   "(default: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--max-seq-len", type=int, default=None,
                   help="longest prompt plus new tokens, the KV cache's size (default: the "
                        "model's max_position_embeddings or sliding window, at most 4096)")
    g.add_argument("--page-size", type=int, default=None)
    g.add_argument("--steps-per-launch", type=int, default=None,
                   help="decode steps chained in one kernel launch, greedy or sampled "
                        "(top-k up to 64), 1-16 (default: the backend's, 8 for megakernel)")
    g.add_argument("--quiet", action="store_true", help="no loading progress or stats: only "
                   "the generated text (serve: no line per request)")


class _VersionAction(argparse.Action):
    """--version: what a bug report needs to know about this install."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        import torch

        import megakernel

        usable, reason = megakernel.megakernel_available()
        backend = ("megakernel backend usable on " + torch.cuda.get_device_name() if usable
                   else f"unusable here: {reason}")
        print(f"megakernel {megakernel.__version__} (torch {torch.__version__}; {backend})")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megakernel",
                                description="Llama decoding in one persistent CUDA kernel")
    p.add_argument("--version", action=_VersionAction,
                   help="print the version, torch's, and whether the megakernel backend "
                        "can run here, then exit")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from one prompt, streaming it")
    prompt = g.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-ids", help="prompt as comma-separated token ids")
    prompt.add_argument("--prompt-file", help="prompt text read from a file, as it is "
                        "('-': stdin)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's "
                   "chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object when done "
                   "(text, token ids, finish reason, stats) instead of streaming the text")
    _add_decoding_args(g, max_new_tokens=128)

    c = sub.add_parser("chat", help="a conversation read line by line from stdin; earlier "
                       "turns stay in the KV cache")
    c.add_argument("--system", default=None, help="system message")
    _add_decoding_args(c, max_new_tokens=512)

    sv = sub.add_parser("serve", help="serve OpenAI's /v1/completions and "
                        "/v1/chat/completions over HTTP, one request at a time")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on "
                    "(default: %(default)s; 0.0.0.0 for every interface)")
    sv.add_argument("--port", type=int, default=8000, help="default: %(default)s; 0 picks "
                    "a free one")
    sv.add_argument("--model-name", default=None, help="the model's id in responses and "
                    "/v1/models (default: --model)")
    _add_engine_args(sv)

    pr = sub.add_parser("program", help="print the compiled instruction stream of a model")
    pr.add_argument("--model", default=DEFAULT_MODEL)
    pr.add_argument("--num-sms", type=int, default=None,
                    help="SM count to compile for (default: this GPU's, else 132)")
    pr.add_argument("--max-seq-len", type=int, default=4096)
    pr.add_argument("--page-size", type=int, default=16)
    pr.add_argument("--list", action="store_true", help="also print every instruction")
    pr.add_argument("--whole-context", action="store_true",
                    help="print the program of the short positions (whole-context attention, "
                         "no reduce stage) instead of the split one")
    return p


def _load_engine(args, prompt_graphs: bool):
    """Engine.from_pretrained with the command's options, progress on stderr, and the
    sampling kind prepared."""
    import megakernel

    quiet = args.quiet
    t0 = time.perf_counter()
    if not quiet:
        print(f"loading {args.model} ...", file=sys.stderr, flush=True)

    def progress(done, total):
        if not quiet:
            print(f"\r  layers {done}/{total}", end="" if done < total else "\n",
                  file=sys.stderr, flush=True)

    engine = megakernel.Engine.from_pretrained(
        args.model, device=args.device, backend=args.backend, dtype=args.dtype,
        max_seq_len=args.max_seq_len, page_size=args.page_size, seed=args.seed,
        progress=progress, steps_per_launch=args.steps_per_launch,
        prompt_graphs=prompt_graphs)
    # serve's requests sample at OpenAI's default temperature 1 unless they say otherwise.
    engine.prepare(temperature=getattr(args, "temperature", 1.0),
                   top_p=getattr(args, "top_p", 1.0), top_k=getattr(args, "top_k", 0))
    if not quiet:
        dtype = str(engine.weights.dtype).replace("torch.", "")
        print(f"loaded in {time.perf_counter() - t0:.1f} s: backend {engine.backend_name}, "
              f"device {engine.device}, {dtype}", file=sys.stderr, flush=True)
    return engine


def _stream(_token, piece):
    sys.stdout.write(piece)
    sys.stdout.flush()


def _decoding_kwargs(args, stream=_stream) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                ignore_eos=args.ignore_eos, stop=args.stop, stream=stream)


def _read_prompt_file(path: str) -> str:
    from megakernel.errors import InvalidRequestError

    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise InvalidRequestError(f"cannot read --prompt-file '{path}': {reason}") from None


def _generate(args) -> int:
    import megakernel

    ids = None
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise megakernel.InvalidRequestError(
                f"--prompt-ids must be comma-separated integers, got '{args.prompt_ids}'")
    text = args.prompt if args.prompt_file is None else _read_prompt_file(args.prompt_file)
    # One generation: a prompt graph captured after it would go unused.
    engine = _load_engine(args, prompt_graphs=False)
    prompt = ids if ids is not None else text
    if args.json:
        result = engine.generate(prompt, chat=args.chat, **_decoding_kwargs(args, stream=None))
        print(json.dumps(_result_record(result)), flush=True)
        return 0
    try:
        result = engine.generate(prompt, chat=args.chat, **_decoding_kwargs(args))
    finally:
        sys.stdout.write("\n")
        sys.stdout.flush()
    if not args.quiet:
        print(result.stats.line(), flush=True)
    return 0


def _result_record(result) -> dict:
    """generate --json's object: what a script needs of a GenerationResult."""
    return {"text": result.text, "token_ids": result.token_ids,
            "prompt_token_ids": result.prompt_token_ids,
            "finish_reason": result.finish_reason, "stats": result.stats.as_json()}


def _chat(args) -> int:
    """One user message per line of stdin, each reply streamed; '/reset' starts the
    conversation over, end of input ends it. A turn's bad input prints its error, and
    Ctrl-C during a reply stops it; either way the conversation goes on without that
    turn."""
    import megakernel

    # Turns prefill at ever new positions: no prompt graph would be replayed.
    engine = _load_engine(args, prompt_graphs=False)
    session = engine.chat_session(system=args.system)
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        message = line.strip()
        if not message:
            continue
        if message == "/reset":
            session.reset()
            print("(conversation cleared)", file=sys.stderr, flush=True)
            continue
        try:
            result = session.send(message, **_decoding_kwargs(args))
        except megakernel.InvalidRequestError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            sys.stdout.flush()
            print("(reply interrupted; the conversation goes on without it)",
                  file=sys.stderr, flush=True)
            continue
        except BaseException:
            sys.stdout.write("\n")     # end a reply cut short before the error's line
            sys.stdout.flush()
            raise
        sys.stdout.write("\n")
        sys.stdout.flush()
        if not args.quiet:
            print(result.stats.line(), file=sys.stderr, flush=True)
    return 0


def _serve(args) -> int:
    """Serve until Ctrl-C, one line per generation (or refused request) on stderr."""
    from megakernel.server import CompletionServer

    if not 0 <= args.port <= 65535:
        from megakernel.errors import InvalidRequestError
        raise InvalidRequestError(f"--port must be in [0, 65535], got {args.port}")
    # Listen first: a port in use is refused before a model takes its time to load.
    try:
        server = CompletionServer(None, (args.host, args.port), args.model_name or args.model,
                                  log=None if args.quiet else sys.stderr)
    except OSError as e:
        raise OSError(f"cannot listen on {args.host}:{args.port}: "
                      f"{e.strerror or e}") from None
    try:
        server.engine = _load_engine(args, prompt_graphs=True)
    except BaseException:
        server.server_close()
        raise
    # stdout, so a script that started the server (on port 0) can read where it listens.
    print(f"serving {server.model_name} at {server.url} (POST /v1/completions, "
          "/v1/chat/completions; GET /v1/models, /health); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr, flush=True)
    finally:
        server.server_close()
    return 0


def _program(args) -> int:
    import torch
    from megakernel.loading import resolve_model
    from megakernel.scheduler import build_program, whole_context_limit

    config, _source = resolve_model(args.model)
    num_sms = args.num_sms
    if num_sms is None:
        num_sms = (torch.cuda.get_device_properties(0).multi_processor_count
                   if torch.cuda.is_available() else 132)
    if num_sms < 1 or args.max_seq_len < 1 or args.page_size < 1:
        from megakernel.errors import InvalidRequestError
        raise InvalidRequestError("--num-sms, --max-seq-len and --page-size must be >= 1")
    program = build_program(config, num_sms=num_sms, page_size=args.page_size,
                            max_seq_len=args.max_seq_len,
                            whole_context_attention=args.whole_context)
    print(f"model {args.model}: {config.num_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_heads} heads / {config.num_kv_heads} KV heads x {config.head_dim}, "
          f"vocab {config.vocab_size}")
    limit = whole_context_limit(config)
    if args.whole_context:
        print(f"decodes positions below {limit}; the others run the split program "
              "(without --whole-context)")
    elif program.attn_partitions == 1:
        print("decodes every position: one attention partition needs no reduce stage")
    else:
        print(f"decodes positions from {limit} on; those below run the whole-context program "
              "(--whole-context)")
    print(program.summary())
    if args.list:
        for i, instr in enumerate(program.instruction_list()):
            print(f"{i:>6} {instr}")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import torch
    from megakernel.errors import KernelFaultError, MegakernelError, first_line

    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "chat":
            return _chat(args)
        if args.command == "serve":
            return _serve(args)
        return _program(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Whoever read stdout stopped (`| head`): end quietly, like other command-line
        # tools, with stdout pointed at /dev/null so the interpreter's last flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except torch.OutOfMemoryError as e:
        print(f"error: out of memory: {first_line(e)}", file=sys.stderr)
        return 2
    except KernelFaultError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except MegakernelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
