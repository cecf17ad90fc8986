"""Time to first token of a conversation's next turn: its prompt's prefix kept in the KV
cache (generate(..., reuse_prefix=True), what a chat session does) against the whole
prompt prefilled (with its prompt graphs captured, as a long-lived engine replays them).

    python3 scripts/dev/reuse_ttft.py [--model random:llama-3.2-1b] [--history 500,1500,3000]
                                      [--reply 32] [--turn 24] [--rounds 3]
                                      [--conversation TURNS]

Per history length and round: a generation of `reply` tokens after `history` random prompt
tokens (its tokens but the last stay in the cache), then the next turn's prompt (history,
reply, `turn` new tokens) with reuse_prefix, then the same prompt whole. The first round
also captures the whole prompt's graphs and is not counted. Prints the median TTFT of each.
Each round repeats the same positions; --conversation N instead runs one conversation of N
turns, each `turn` new tokens after the last reply, so every turn's new tokens start at a
position of their own, and prints each turn's TTFT.
"""
from __future__ import annotations

import argparse
import statistics

import torch

import megakernel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:llama-3.2-1b")
    ap.add_argument("--history", default="500,1500,3000")
    ap.add_argument("--reply", type=int, default=32)
    ap.add_argument("--turn", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conversation", type=int, default=0, metavar="TURNS")
    args = ap.parse_args()

    engine = megakernel.Engine.from_pretrained(args.model, max_seq_len=4096)
    vocab = engine.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    print(f"{args.model} on {torch.cuda.get_device_name()}, backend {engine.backend_name}")
    if args.conversation:
        conversation = torch.randint(0, vocab, (args.turn,), generator=gen).tolist()
        print("turn  prompt  reused  TTFT (ms)")
        ttfts = []
        for turn in range(args.conversation):
            r = engine.generate(conversation, max_new_tokens=args.reply, ignore_eos=True,
                                reuse_prefix=True)
            print(f"{turn:>4}  {len(conversation):>6}  {r.stats.reused_tokens:>6}  "
                  f"{r.stats.ttft_ms:>9.2f}")
            if turn:
                ttfts.append(r.stats.ttft_ms)
            conversation += r.token_ids + torch.randint(0, vocab, (args.turn,),
                                                        generator=gen).tolist()
        median = statistics.median(ttfts)
        slow = sum(t > 2 * median for t in ttfts)
        print(f"turns 1-{args.conversation - 1}: median TTFT {median:.2f} ms, "
              f"{slow} turns over twice that: "
              + ", ".join(f"turn {i + 1} {t:.2f}" for i, t in enumerate(ttfts)
                          if t > 2 * median))
        return
    print("history  next prompt  reused  TTFT reused (ms)  TTFT whole (ms)")
    for history_len in (int(h) for h in args.history.split(",")):
        history = torch.randint(0, vocab, (history_len,), generator=gen).tolist()
        turn = torch.randint(0, vocab, (args.turn,), generator=gen).tolist()
        reused_ms, whole_ms, reused = [], [], 0
        for round_ in range(args.rounds + 1):
            reply = engine.generate(history, max_new_tokens=args.reply, ignore_eos=True,
                                    reuse_prefix=True).token_ids
            follow = history + reply + turn
            r = engine.generate(follow, max_new_tokens=4, ignore_eos=True, reuse_prefix=True)
            w = engine.generate(follow, max_new_tokens=4, ignore_eos=True)
            if round_ > 0:
                reused_ms.append(r.stats.ttft_ms)
                whole_ms.append(w.stats.ttft_ms)
                reused = r.stats.reused_tokens
        print(f"{history_len:>7}  {len(follow):>11}  {reused:>6}  "
              f"{statistics.median(reused_ms):>16.2f}  {statistics.median(whole_ms):>15.2f}")


if __name__ == "__main__":
    main()
