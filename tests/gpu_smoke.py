"""GPU smoke check of the targets (run on a CUDA machine: ``python tests/gpu_smoke.py``).

1. Correctness on CUDA: cached decoding equals the full forward (fp32 and bf16) for MLA and GateSWA.
2. Decode speed with SmolLM2-135M's shapes (random weights; speed does not depend on their values):
   teacher (transformers' own model and cache) vs MLA vs GateSWA, tokens/s and cache bytes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny import tiny_ids, tiny_teacher  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from attnedit.surgery import edit_model  # noqa: E402

dev = torch.device("cuda")


@torch.no_grad()
def check_correctness():
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 6e-2)):
        for family in ("llama", "qwen3"):
            teacher = tiny_teacher(family).to(dev, dtype)
            for target, args in (("mla", {}), ("gateswa", {"window": 5, "full_layers": "every:2"})):
                s = edit_model(teacher, target, args)
                ids = tiny_ids(length=21).to(dev)
                full = s(ids).logits.float()
                cache = s.new_cache()
                inc = [s(ids[:, :7], past_key_values=cache, use_cache=True).logits]
                inc += [s(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits for i in range(7, 21)]
                err = (torch.cat(inc, 1).float() - full).abs().max().item()
                print(f"correctness {family:6s} {target:8s} {str(dtype):15s} max|inc-full| = {err:.2e}")
                assert err < tol * max(1.0, full.abs().max().item()), err


def smollm2_shaped():
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        head_dim=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dev, torch.bfloat16).eval()


def cache_bytes(cache) -> int:
    if hasattr(cache, "allocated_bytes"):
        return cache.allocated_bytes()
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None:
                total += t.untyped_storage().nbytes()
    return total


@torch.no_grad()
def decode_speed(model, batch, context, steps=64, teacher=False):
    ids = torch.randint(0, 49152, (batch, context), device=dev)
    cache = DynamicCache(config=model.config) if teacher else model.new_cache()
    kw = {"past_key_values": cache, "use_cache": True}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model(ids, **kw)
    torch.cuda.synchronize()
    ttft = time.perf_counter() - t0
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(4):  # warm-up
        nxt = model(nxt, **kw).logits[:, -1:].argmax(-1)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        nxt = model(nxt, **kw).logits[:, -1:].argmax(-1)
    end.record()
    torch.cuda.synchronize()
    return ttft * 1e3, batch * steps / (start.elapsed_time(end) / 1e3), cache_bytes(cache)


def main():
    print(torch.__version__, torch.cuda.get_device_name())
    check_correctness()
    teacher = smollm2_shaped()
    models = {
        "teacher": teacher,
        "mla": edit_model(teacher, "mla", {}),
        "gateswa": edit_model(teacher, "gateswa", {"window": 512, "full_layers": "every:6"}),
    }
    print(f"{'model':8s} {'batch':>5s} {'ctx':>5s} {'ttft ms':>8s} {'decode tok/s':>12s} {'cache MiB':>10s}")
    for batch, context in ((1, 1024), (16, 4096), (64, 4096)):
        for name, m in models.items():
            try:
                ttft, tps, nbytes = decode_speed(m, batch, context, teacher=name == "teacher")
                print(f"{name:8s} {batch:5d} {context:5d} {ttft:8.1f} {tps:12.0f} {nbytes / 2**20:10.1f}")
            except torch.OutOfMemoryError:
                print(f"{name:8s} {batch:5d} {context:5d} out of memory")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
