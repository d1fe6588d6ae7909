"""Which GateSWA full layers keep passkey retrieval, measured on the teacher's own weights (docs/results.md).

Every layer is cut to the window (+ sink tokens) except a chosen set; the score is the log-probability of a
passkey's answer tokens after the prompt (teacher-forced). Prints the teacher (all full), `--compare` sets, no
layer full, each single layer full, the K best single layers together, and a greedy choice of K among the 2K best.
Calibration keys come from --seed (the eval's passkey uses seed 0), so the probe does not see the eval's keys.

usage: python benchmarks/retrieval_layers.py [--teacher smollm2-135m] [--context 2048] [--depth 0.9] [--k 5]
                                          [--window 512] [--sink 4] [--compare 3,7,8,18,23] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from attnedit.eval.passkey import passkey_prompt, trial_keys
from attnedit.surgery.edit import teacher_on_attnedit
from attnedit.teachers import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--depth", type=float, default=0.9)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--compare", action="append", default=[], help="a set of full layers to score, e.g. 3,7,8,18,23")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    teacher, tok = load_model(a.teacher, device=a.device)  # any teacher name: folder, hub id, .gguf, alias
    model = teacher_on_attnedit(teacher)
    attns = model.attentions()
    key = trial_keys(1, seed=a.seed)[0]
    prompt = passkey_prompt(tok, a.context, a.depth, key)
    answer = tok(" " + key, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + answer], device=a.device)
    n = len(attns)

    @torch.no_grad()
    def score(full: set[int]) -> float:
        for i, m in enumerate(attns):
            m.window, m.sink = (None, 0) if i in full else (a.window, a.sink)
        lp = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
        return float(lp.gather(-1, ids[0, len(prompt) :, None]).sum())

    t0 = time.time()
    print(f"key {key} at depth {a.depth} of {a.context} tokens; window {a.window} + {a.sink} sinks elsewhere")
    print(f"teacher (all full): {score(set(range(n))):.3f}")
    for spec in a.compare:
        layers = {int(x) for x in spec.split(",")}
        print(f"full {sorted(layers)}: {score(layers):.3f}")
    print(f"none full: {score(set()):.3f}", flush=True)
    singles = {c: score({c}) for c in range(n)}
    top = sorted(singles, key=lambda c: -singles[c])
    print("single layer full, best first:", ", ".join(f"{c}: {singles[c]:.2f}" for c in top))
    print(f"the {a.k} best single layers {sorted(top[: a.k])} together: {score(set(top[: a.k])):.3f}", flush=True)
    chosen = {top[0]}
    for _ in range(1, a.k):
        best = max((score(chosen | {c}), c) for c in top[: 2 * a.k] if c not in chosen)
        chosen.add(best[1])
        print(f"greedy: add layer {best[1]} -> {best[0]:.3f}, full {sorted(chosen)} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
