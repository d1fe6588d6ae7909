"""What the teacher answers when it sees only part of a passkey prompt (docs/results.md, GateSWA's misses).

A sliding-window layer sees the last W tokens (plus S sink tokens at the start). This asks the teacher itself,
every layer full, the same question on prompts cut to those tokens: the whole prompt, the last W tokens, and
the first S plus the last W, for each depth. Greedy decoding through the teacher's cache, the eval's keys
(seed 0) and scoring (the first number written must be the key); float32.

usage: python benchmarks/passkey_truncation.py [--teacher smollm2-135m] [--context 2048] [--depths 1,0.75]
                                          [--keep 512,1024,1900] [--sink 4] [--trials 5] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch

from attnedit.eval.passkey import answer_is, greedy_answers, passkey_prompt, trial_keys
from attnedit.teachers import load_model


def accuracy(model, tok, rows: list[list[int]], keys: list[str]) -> tuple[float, str]:
    """Share of rows whose answer is their key (the eval's scoring), and the first row's answer."""
    texts = greedy_answers(model, tok, rows)
    return sum(answer_is(t, k) for t, k in zip(texts, keys)) / len(keys), texts[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--depths", default="1,0.75")
    ap.add_argument("--keep", default="512,1024,1900", help="prompt tails to keep, in tokens")
    ap.add_argument("--sink", type=int, default=4, help="leading tokens kept in front of a tail")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    model, tok = load_model(args.teacher, dtype=torch.float32, device=args.device)
    model.eval()
    keys = trial_keys(args.trials, 0)
    print("depth | tokens shown | accuracy | first answer")
    for depth in (float(d) for d in args.depths.split(",")):
        full = [passkey_prompt(tok, args.context, depth, k) for k in keys]
        cuts = [("whole prompt", full)]
        for keep in (int(k) for k in args.keep.split(",")):
            if not 0 < keep < args.context - args.sink:
                raise SystemExit(f"--keep {keep}: give tails shorter than --context minus --sink ({args.context - args.sink})")
            cuts += [(f"last {keep}", [p[-keep:] for p in full]), (f"first {args.sink} + last {keep}", [p[: args.sink] + p[-keep:] for p in full])]
        for name, rows in cuts:
            acc, answer = accuracy(model, tok, rows, keys)
            print(f"{depth:g} | {name} | {acc:.2f} | {answer!r}", flush=True)


if __name__ == "__main__":
    main()
