"""The fast paths of training: the fused chunked KD loss, device-side metrics, prefetched batches,
compilation with an eager fallback, and the throughput/memory figures `convert` reports."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attnedit.stages import stage2

# --------------------------------------------------------------------------- the chunked KD loss


def _reference_chunk(h_s, h_t, labels, head_s, head_t, temperature):
    """The implementation stage 2 had before the fused loss (autograd through a checkpointed chunk)."""
    z_s = head_s(h_s)
    with torch.no_grad():
        z_t = head_t(h_t)
    logp_s = F.log_softmax(z_s / temperature, dim=-1)
    logp_t = F.log_softmax(z_t / temperature, dim=-1)
    kl = F.kl_div(logp_s, logp_t, log_target=True, reduction="sum")
    ce = F.cross_entropy(z_s, labels, ignore_index=-100, reduction="sum")
    ce_t = F.cross_entropy(z_t, labels, ignore_index=-100, reduction="sum")
    return kl, ce, ce_t


def reference_kd_terms(h_s, h_t, ids, head_s, head_t, temperature, chunk):
    hs, ht = h_s.flatten(0, 1), h_t.flatten(0, 1)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1).flatten()
    kl = ce = ce_t = hs.new_zeros(())
    for s in range(0, hs.shape[0], chunk):
        args = (hs[s : s + chunk], ht[s : s + chunk], labels[s : s + chunk], head_s, head_t, temperature)
        k, c, ct = checkpoint(_reference_chunk, *args, use_reentrant=False)
        kl, ce, ce_t = kl + k, ce + c, ce_t + ct
    n_labels = max(1, int((labels != -100).sum()))
    return kl * temperature**2 / hs.shape[0], ce / n_labels, ce_t / n_labels


def _heads(vocab=37, dim=12, bias=False):
    torch.manual_seed(0)
    head_s = torch.nn.Linear(dim, vocab, bias=bias).double()
    head_t = torch.nn.Linear(dim, vocab, bias=bias).double()
    return head_s, head_t


@pytest.mark.parametrize("temperature,kl_w,ce_w,chunk", [(1.0, 1.0, 0.0, 7), (2.0, 0.7, 0.3, 5), (0.5, 0.0, 1.0, 64)])
@pytest.mark.parametrize("train_head", [False, True])
def test_fused_kd_loss_matches_the_reference_values_and_gradients_in_float64(temperature, kl_w, ce_w, chunk, train_head):
    head_s, head_t = _heads(bias=train_head)
    head_s.requires_grad_(train_head)
    head_t.requires_grad_(False)
    h_s = torch.randn(3, 11, 12, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(3, 11, 12, dtype=torch.float64)
    ids = torch.randint(0, 37, (3, 11))
    ids[1, 4] = -100  # an ignored label inside a row, besides every row's last position

    def grads(fn, **kw):
        h_s.grad = None
        head_s.zero_grad(set_to_none=True)
        kl, ce, ce_t = fn(h_s, h_t, ids, head_s, head_t, temperature, chunk, **kw)
        (kl_w * kl + ce_w * ce).backward()
        out = [h_s.grad.clone()] + ([head_s.weight.grad.clone(), head_s.bias.grad.clone()] if train_head else [])
        return (kl.detach(), ce.detach(), ce_t.detach()), out

    values, got = grads(stage2.kd_terms, grads=(kl_w > 0, ce_w > 0))
    ref_values, want = grads(reference_kd_terms)
    for a, b in zip(values, ref_values):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_kd_loss_passes_gradcheck():
    head_s, head_t = _heads(vocab=9, dim=4, bias=True)
    head_t.requires_grad_(False)
    h_t = torch.randn(2, 5, 4, dtype=torch.float64)
    ids = torch.randint(0, 9, (2, 5))

    def fn(h_s, w, b):
        head_s.weight.data, head_s.bias.data = w, b  # gradcheck perturbs its own inputs
        kl, ce, _ = stage2._ChunkedKD.apply(
            h_s.flatten(0, 1), w, b, h_t.flatten(0, 1), head_t.weight, None,
            torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1).flatten(), 1.5, 3, True, True,
        )  # fmt: skip
        return kl, ce

    h_s = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    w = head_s.weight.detach().clone().requires_grad_(True)
    b = head_s.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (h_s, w, b))


def test_fused_kd_loss_never_keeps_logits_for_the_backward():
    """What autograd saves for the backward is the hidden-state gradient, not chunk x vocab logits."""
    head_s, head_t = _heads(vocab=1000, dim=8)
    head_s.requires_grad_(False)
    h_s = torch.randn(4, 64, 8, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        kl, ce, _ = stage2.kd_terms(h_s, torch.randn_like(h_s), torch.randint(0, 1000, (4, 64)), head_s, head_t, 1.0, 32)
    assert max(saved) <= h_s.numel()
    (kl + ce).backward()
    assert h_s.grad is not None and torch.isfinite(h_s.grad).all()
