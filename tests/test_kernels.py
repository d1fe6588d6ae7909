"""attnedit's Triton kernels on the CPU: Triton's interpreter (``TRITON_INTERPRET=1``) runs the same kernel code
as the GPU, in float32, against the PyTorch reference; and the launch plans' invariants."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap

import pytest

from attnedit.targets.kernels import mla_decode_plan

HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.parametrize("batch,heads,slots,rank,rope", [(1, 32, 32768, 512, 64), (64, 32, 8192, 512, 64),
                                                          (1, 128, 32768, 512, 64), (64, 14, 8192, 56, 32),
                                                          (1, 9, 8192, 96, 32), (3, 70, 130, 40, 8)])  # fmt: skip
def test_mla_decode_plan(batch, heads, slots, rank, rope):
    plan = mla_decode_plan(batch, heads, slots, rank, rope, sms=132)
    assert plan["nsplit"] * plan["split_len"] >= slots > (plan["nsplit"] - 1) * plan["split_len"]  # splits cover the cache
    assert plan["split_len"] % plan["block_n"] == 0
    assert plan["tiles"] * plan["block_h"] >= heads and 16 <= plan["block_h"] <= 64
    assert plan["r_pad"] >= rank and plan["p_pad"] >= rope
    if plan["nsplit"] > 1:  # partial states cost at most an eighth of the latent bytes a split reads
        assert plan["block_h"] * plan["r_pad"] * 4 * 8 <= plan["split_len"] * (rank + rope) * 2
    if slots >= 8192 and batch == 1:  # one sequence still spreads over the SMs
        assert plan["nsplit"] * plan["tiles"] >= 16


def test_mla_decode_plan_takes_a_measured_split_length():
    """A benchmark's split length replaces the plan's (the splits still cover the cache); a length that is not a
    multiple of every key block the tuning may pick is refused."""
    plan = mla_decode_plan(1, 32, 32768, 512, 64, sms=132, split_len=128)
    assert plan["split_len"] == 128 and plan["nsplit"] == 256
    assert mla_decode_plan(1, 32, 32768, 512, 64, sms=132) != plan
    with pytest.raises(ValueError, match="multiple of 64"):
        mla_decode_plan(1, 32, 32768, 512, 64, split_len=100)


SCRIPT = textwrap.dedent(
    """
    import torch
    from attnedit.targets import kernels as K
    torch.manual_seed(0)
    cases = [  # batch, heads, slots, rank, rope, filled, padding
        (2, 9, 700, 96, 32, 517, True),    # several splits, padded keys, heads < one tile
        (1, 70, 300, 32, 16, 300, False),  # two tiles of heads, the last one partial
        (3, 20, 130, 40, 8, 1, False),     # one key written, ranks that are not powers of two
        (1, 16, 2000, 64, 64, 1999, True),
        (1, 16, 5000, 16, 16, 4990, True),  # more splits than the merge reads at once (40 against 32)
        (1, 16, 1100, 300, 32, 1050, False),  # a wide latent: the merge's blocks of 128 columns, the last past R
    ]
    for b, h, s, r, p, nf, pad in cases:
        q = torch.randn(b, h, r + p)
        lat = torch.randn(b, s, r + p)
        valid = (torch.rand(b, s) > 0.2) if pad else None
        if valid is not None:
            valid[:, 0] = True
        n = torch.tensor(nf)
        got = K.mla_decode_triton(q, lat, n, valid, 0.11, r)
        ref = K.decode_attention_sdpa(q.double(), lat.double()[:, None], None, n, valid, 0.11, v_dim=r)
        err = ((got.double() - ref).norm() / ref.norm()).item()
        plan = K.mla_decode_plan(b, h, s, r, p)
        print(f"mla case {b}x{h}x{s} r{r}+{p}: splits {plan['nsplit']} tiles {plan['tiles']} error {err:.1e}")
    cases = [  # batch, query heads, KV heads, slots, key width, value width, filled, padding
        (2, 8, 2, 300, 64, 64, 211, True),   # grouped heads, several splits, padded keys
        (1, 6, 3, 130, 32, 48, 130, False),  # values narrower than a power of two, every slot filled
        (2, 4, 1, 90, 160, 160, 1, True),    # one key written, heads wider than 128 (the wide kernel's blocks)
    ]
    for b, hq, hk, s, dk, dv, nf, pad in cases:
        q, k, v = torch.randn(b, hq, dk), torch.randn(b, hk, s, dk), torch.randn(b, hk, s, dv)
        valid = (torch.rand(b, s) > 0.2) if pad else None
        if valid is not None:
            valid[:, 0] = True
        n = torch.tensor(nf)
        got = K.decode_attention_triton(q, k, v, n, valid, 0.13)
        ref = K.decode_attention_sdpa(q.double(), k.double(), v.double(), n, valid, 0.13)
        err = ((got.double() - ref).norm() / ref.norm()).item()
        print(f"gqa case {b}x{hq}/{hk}x{s} d{dk}/{dv}: error {err:.1e}")
    """
)


@pytest.fixture(scope="module")
def interpreted():
    """Both decode kernels on the cases above, run once by Triton's interpreter in a fresh process (it reads
    TRITON_INTERPRET when triton is imported)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)


def _errors(out: str, kernel: str) -> list[float]:
    return [float(e) for e in re.findall(rf"^{kernel} case .* error (\S+)$", out, re.MULTILINE)]


@pytest.mark.xdist_group("kernels")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")
@pytest.mark.parametrize("kernel,cases", [("mla", 6), ("gqa", 3)])
def test_decode_kernels_match_reference_in_triton_interpreter(interpreted, kernel, cases):
    """MLA's decode over the latent cache, and the split-K decode over a grouped-query cache (``decode_attention``'s
    Triton kernel, chosen for keys wider than 256), each against the SDPA reference."""
    run = interpreted
    assert run.returncode == 0, run.stdout + run.stderr
    errors = _errors(run.stdout, kernel)
    assert len(errors) == cases and all(err < 1e-5 for err in errors), run.stdout
    if kernel == "mla":  # cases with one split and with several
        assert "splits 1" in run.stdout and any(f"splits {k}" in run.stdout for k in range(2, 64))
