"""GPU check of attnedit's kernels: correctness against PyTorch references, then timings against the HBM bound.

    python benchmarks/check_kernels.py          (prints a table; exits non-zero on a wrong result)

Decode: the split-K Triton kernel vs SDPA with a length mask (the fallback) vs SDPA on exactly the filled
keys with enable_gqa and no mask (the kernel fact's 1.0x reference), for the SmolLM2 GQA shape, its MLA latent
(96 + 32, values = first 96 columns) and a Qwen3-8B-sized latent (512 + 64, 32 heads). Sliding-window prefill:
FlexAttention block mask vs SDPA with a boolean mask, forward + backward.
"""

import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from attnedit.targets import kernels
from attnedit.targets.kernels import decode_attention_sdpa, decode_kernel_choice, sliding_attention, window_mask

torch.manual_seed(0)
dev = "cuda"
bw = None


def copy_bw():
    a = torch.empty(1 << 28, dtype=torch.bfloat16, device=dev).uniform_()
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=200, return_mode="median")
    return 2 * a.numel() * 2 / (ms / 1e3)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


rows, bad = [], False
bw = copy_bw()
print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
cases = [
    ("GQA 9q/3kv d64", 64, 9, 3, 64, 64, 8192, False),
    ("GQA padded", 64, 9, 3, 64, 64, 8192, True),
    ("GQA batch 1", 1, 9, 3, 64, 64, 8192, False),
    ("MLA latent 96+32", 64, 9, 1, 128, 96, 8192, False),
    ("MLA latent 512+64 x32h", 16, 32, 1, 576, 512, 4096, False),
]
for name, b, hq, hk, dk, dv, s, padded in cases:
    n = s - 37
    if dv == dk or hk > 1:
        k = torch.randn(b, hk, s, dk, device=dev, dtype=torch.bfloat16)
        v = torch.randn(b, hk, s, dv, device=dev, dtype=torch.bfloat16)
    else:  # latent: values are the first dv columns of the keys
        k = torch.randn(b, hk, s, dk, device=dev, dtype=torch.bfloat16)
        v = k[..., :dv]
    q = torch.randn(b, hq, dk, device=dev, dtype=torch.bfloat16)
    nf = torch.tensor(n, device=dev)
    valid = (torch.rand(b, s, device=dev) > 0.1) if padded else None
    if valid is not None:
        valid[:, 0] = True
    scale = dk**-0.5
    out = kernels._DECODE_OP(q, k, v, nf, valid, scale)
    ref = decode_attention_sdpa(q.double(), k.double(), v.double(), nf, valid, scale)
    err = rel(out, ref)
    bad |= not err < 2e-2
    t_kernel = do_bench(lambda: kernels._DECODE_OP(q, k, v, nf, valid, scale), warmup=25, rep=100, return_mode="median")
    latent = dv != dk and hk == 1
    err_sdpa = rel(decode_attention_sdpa(q, k, None if latent else v, nf, valid, scale, dv), ref)
    bad |= not err_sdpa < 2e-2
    t_mask = do_bench(lambda: decode_attention_sdpa(q, k, None if latent else v, nf, valid, scale, dv), warmup=25, rep=100, return_mode="median")
    kk, vv = k[:, :, :n], v[:, :, :n]
    t_plain = do_bench(
        lambda: F.scaled_dot_product_attention(q[:, :, None], kk, vv, scale=scale, enable_gqa=hk != hq),
        warmup=25,
        rep=100,
        return_mode="median",
    )
    nbytes = b * hk * n * (dk + (dv if (dv == dk or hk > 1) else 0)) * 2
    bound = nbytes / bw * 1e3
    rows.append(
        (name, f"{err:.1e}", f"{t_kernel:.3f}", f"{t_kernel / bound:.2f}", f"{t_mask / bound:.2f}", f"{t_plain / bound:.2f}", decode_kernel_choice(q, k))
    )

print(f"{'decode case':26} {'rel err':>8} {'triton ms':>10} {'triton/bound':>13} {'sdpa+mask/bound':>16} {'sdpa exact/bound':>17} {'used':>7}")
for r in rows:
    print(f"{r[0]:26} {r[1]:>8} {r[2]:>10} {r[3]:>13} {r[4]:>16} {r[5]:>17} {r[6]:>7}")

# sliding-window prefill / training: FlexAttention block mask vs SDPA + boolean mask, fwd + bwd
b, h, hk, t, d, window, sink = 16, 9, 3, 2048, 64, 512, 4
q = torch.randn(b, h, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(b, hk, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(b, hk, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
idx = torch.arange(t, device=dev)
mask = window_mask(idx, idx, window, sink)
out = sliding_attention(q, k, v, window, sink, d**-0.5)
ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=d**-0.5, enable_gqa=True)
err = rel(out, ref)
bad |= not err < 2e-2


def fb(fn):
    def run():
        o = fn()
        o.sum().backward()

    return do_bench(run, warmup=10, rep=50, return_mode="median")


t_flex = fb(lambda: sliding_attention(q, k, v, window, sink, d**-0.5))
t_sdpa = fb(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d**-0.5, enable_gqa=True))
print(f"sliding prefill 16x2048 w512: rel err {err:.1e}; fwd+bwd flex {t_flex:.2f} ms, sdpa+mask {t_sdpa:.2f} ms ({t_sdpa / t_flex:.2f}x)")
sys.exit(1 if bad else 0)
