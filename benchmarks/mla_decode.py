"""MLA decode kernel on a GPU: correctness against a float64 reference, then time against the HBM bound.

    python benchmarks/mla_decode.py [--out FILE.json]

For DeepSeek-shaped latents (512 + 64; 16, 32 and 128 heads), Qwen3-8B's recipe (512 + 64, 32 heads) and small
ones (SmolLM2: 96 + 32, 9 heads; Qwen2.5-0.5B: 56 + 32, 14 heads), at batch 1 and 64 and 8k / 32k keys: the
Triton kernel (attnedit.targets.kernels.mla_decode_triton), the earlier generic split-K kernel
(decode_attention_triton, values = the first columns of the keys) and SDPA with a length mask. The bound is the
latent's bytes (read once) over the measured device-to-device copy bandwidth. Last, batch 1 at 32k keys with the
split length swept (64 to 1,024 keys a split) next to the plan's choice: whether shorter splits pay there, in a
cache of exactly the keys and in caches with 8 and 36 slots more (whether a nearly empty last split costs time).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from triton.testing import do_bench

from attnedit.targets import kernels as K


def copy_bandwidth() -> float:
    a = torch.empty(1 << 28, dtype=torch.bfloat16, device="cuda").uniform_()
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=200, return_mode="median")
    return 2 * a.numel() * 2 / (ms / 1e3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s")
    cases = [  # name, batch, heads, keys, rank, rope
        ("qwen3-8b 512+64 x32", 1, 32, 32768, 512, 64),
        ("qwen3-8b 512+64 x32", 8, 32, 32768, 512, 64),
        ("qwen3-8b 512+64 x32", 64, 32, 8192, 512, 64),
        ("deepseek 512+64 x16", 1, 16, 32768, 512, 64),
        ("deepseek 512+64 x128", 1, 128, 32768, 512, 64),
        ("deepseek 512+64 x128", 64, 128, 8192, 512, 64),
        ("smollm2 96+32 x9", 64, 9, 8192, 96, 32),
        ("smollm2 96+32 x9", 1, 9, 8192, 96, 32),
        ("qwen2.5-0.5b 56+32 x14", 64, 14, 8192, 56, 32),
        ("qwen2.5-0.5b 56+32 x14", 1, 14, 8192, 56, 32),
    ]
    rows, bad = [], False
    for name, b, h, s, r, p_ in cases:
        lat = torch.randn(b, s + 8, r + p_, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(b, h, r + p_, device="cuda", dtype=torch.bfloat16)
        nf = torch.tensor(s, device="cuda")
        scale = (128 + 64) ** -0.5
        ref = K.decode_attention_sdpa(q[:2].double(), lat[:2].double()[:, None], None, nf, None, scale, v_dim=r)  # rows 0-1
        out = K.mla_decode_triton(q, lat, nf, None, scale, r)[:2]
        err = ((out.double() - ref).norm() / ref.norm()).item()
        bad |= not err < 1e-2
        bound_ms = b * s * (r + p_) * 2 / bw * 1e3
        t_new = do_bench(lambda: K.mla_decode_triton(q, lat, nf, None, scale, r), warmup=25, rep=100, return_mode="median")
        try:  # the generic kernel holds every head's whole query row: 128 heads x 1024 columns do not fit shared memory
            t_old = do_bench(lambda: K.decode_attention_triton(q, lat[:, None], lat[:, None, :, :r], nf, None, scale), warmup=25, rep=100, return_mode="median")
        except Exception:  # noqa: BLE001 - triton.runtime.errors.OutOfResources
            t_old = float("nan")
        t_sdpa = (
            do_bench(lambda: K.decode_attention_sdpa(q, lat[:, None], None, nf, None, scale, v_dim=r), warmup=3, rep=10, return_mode="median")
            if b * s <= 65536
            else float("nan")
        )
        plan = K.mla_decode_plan(b, h, s + 8, r, p_, torch.cuda.get_device_properties(0).multi_processor_count)
        row = {"case": name, "batch": b, "keys": s, "error": err, "bound_ms": bound_ms, "ms": t_new, "over_bound": t_new / bound_ms,
               "generic_over_bound": t_old / bound_ms, "sdpa_over_bound": t_sdpa / bound_ms, "nsplit": plan["nsplit"]}  # fmt: skip
        rows.append(row)
        print(f"{name:24s} b{b:<3d} {s:>6d} keys  err {err:.1e}  {t_new:.4f} ms = {t_new / bound_ms:.2f}x bound "
              f"(generic split-K {t_old / bound_ms:.2f}x, SDPA {t_sdpa / bound_ms:.2f}x; {plan['nsplit']} splits)")  # fmt: skip
    # batch 1 leaves SMs idle at the plan's split length (partial states at most an eighth of the latent bytes):
    # shorter splits trade partial-state traffic for programs; these rows measure that trade
    # spare: cache slots beyond the keys (a served cache is allocated for the decoded tokens too: 36 at 32k in the
    # bench), so the last split holds few keys or none; the first rows above have 8
    sweep = []
    cases = [("qwen3-8b 512+64 x32", 1, 32, 32768, 512, 64), ("deepseek 512+64 x16", 1, 16, 32768, 512, 64)]
    for (name, b, h, s, r, p_), spare in itertools.product(cases, (0, 8, 36)):
        lat = torch.randn(b, s + spare, r + p_, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(b, h, r + p_, device="cuda", dtype=torch.bfloat16)
        nf, scale, bound_ms = torch.tensor(s, device="cuda"), (128 + 64) ** -0.5, b * s * (r + p_) * 2 / bw * 1e3
        ref = K.mla_decode_triton(q, lat, nf, None, scale, r)
        for split in (64, 128, 256, 512, 1024):
            out = K.mla_decode_triton(q, lat, nf, None, scale, r, split_len=split)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            bad |= not err < 1e-2
            ms = do_bench(lambda split=split: K.mla_decode_triton(q, lat, nf, None, scale, r, split_len=split), warmup=25, rep=100, return_mode="median")
            nsplit = -(-(s + spare) // split)
            sweep.append(
                {"case": name, "batch": b, "keys": s, "spare_slots": spare, "split_len": split, "nsplit": nsplit, "ms": ms, "over_bound": ms / bound_ms}
            )
            print(f"{name:24s} b{b:<3d} {s:>6d} keys + {spare:>2d} spare  split {split:>4d} ({nsplit:>3d} splits)  {ms:.4f} ms = {ms / bound_ms:.2f}x bound")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bandwidth_bytes_s": bw, "rows": rows, "split_sweep": sweep}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
