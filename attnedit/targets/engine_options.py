"""The edited model's inference options, which change how it runs and never what it computes.

* Fused projections (:meth:`EngineOptions.fuse_projections`): the projections that read the same input run as one
  GEMM each (q/k/v and GateSWA's gate, MLA's first projections, a dense MLP's gate and up), through views of the
  same memory as the parameters, fused again whenever ``.to()`` or ``load_state_dict`` replaces them.
* Folded MLA decode (:meth:`EngineOptions.fold_absorbed`): an MLA layer's absorbed decode with ``W_uk`` and ``W_uv``
  folded into the query's and the output's projections where that reads at most a kernel's worth more bytes (small
  latents): two fewer kernels a layer per decode step, at the cost of the folded copies' memory.
* Compiled prefill (:meth:`EngineOptions.compile_prefill`): the element-wise work around each attention (the
  norms, the MLP's activation, the residual adds) compiled with ``torch.compile`` for calls of more than one token
  without gradients; if compiling fails, one warning is printed and the prefill runs eagerly from then on.

:class:`EngineOptions` is mixed into ``AttnEditForCausalLM`` (which supplies ``attentions()``, ``model.layers``
and ``_backbone``). :func:`pre_attention` and :func:`post_attention` are the parts of a pre-norm decoder layer
around its attention, which the model runs eagerly or compiled.
"""

from __future__ import annotations

import collections
import sys

import torch
import torch.nn as nn

from .common import AttentionContext, FusedLinears, first_line, fused_call


def pre_attention(layer, h: torch.Tensor) -> torch.Tensor:
    return layer.input_layernorm(h)


def gated_mlp(mlp) -> bool:
    """A dense gated MLP (``down(act(gate(x)) * up(x))``, Llama/Mistral/Qwen), whose gate and up can be fused."""
    return all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")) and hasattr(mlp, "act_fn")


def mlp_forward(mlp, x: torch.Tensor) -> torch.Tensor:
    fused = fused_call(mlp, "_attnedit_gate_up", [getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)], mlp)
    if fused is None:
        m = mlp(x)
        return m[0] if isinstance(m, tuple) else m  # some MoE blocks also return router logits
    gate, up = fused(x)
    return mlp.down_proj(mlp.act_fn(gate) * up)


def post_attention(layer, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The rest of a decoder layer once its attention output ``a`` is known: residual, norm, MLP, residual."""
    h = h + a
    return h + mlp_forward(layer.mlp, layer.post_attention_layernorm(h))


class EngineOptions:
    """Fused projections, MLA's folded decode and the compiled prefill of the edited causal LM (see the module's
    docstring)."""

    prefill_backend: str | None = None  # set by compile_prefill(); None: every call runs eagerly
    _prefill_fns: tuple | None = None

    def _fused_groups(self) -> list:
        """(owner, attribute) of every :class:`FusedLinears` in place."""
        owners = [(attn, "_fused") for attn in self.attentions()] + [(layer.mlp, "_attnedit_gate_up") for layer in self.model.layers]
        return [(o, n) for o, n in owners if getattr(o, n, None) is not None]

    def _refuse(self) -> None:
        """Fuse again from the current parameters (after ``.to()``/``load_state_dict`` replaced them): the old
        fused tensors are dropped and the views restored."""
        for owner, name in self._fused_groups():
            setattr(owner, name, FusedLinears(getattr(owner, name).linears))

    def _folds(self) -> list:
        """(attention, its ``FoldedAbsorbed``) of every MLA layer whose decode is folded."""
        pairs = [(attn, getattr(attn, "_folded", None)) for attn in self.attentions()]
        return [(attn, folded) for attn, folded in pairs if folded is not None]

    def _refold(self) -> None:
        """Fold MLA's absorbed decode again from the current parameters, where it is folded."""
        for attn, folded in self._folds():
            attn.fold_absorbed(True, folded.kernel_bytes)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._refuse()
        self._refold()
        return out

    def load_state_dict(self, *args, **kwargs):
        out = super().load_state_dict(*args, **kwargs)
        self._refuse()  # with assign=True the parameters are new tensors
        self._refold()
        return out

    def fold_absorbed(self, fold: bool = True) -> EngineOptions:
        """Fold every MLA layer's absorbed-decode up-projections into its query and output projections where that
        reads at most a kernel's worth more bytes (``targets/mla.py``'s ``FoldedAbsorbed``): the same results,
        two fewer kernels a layer per decode step (and per short absorbed call), for inference only; the folded
        weights are copies beside the parameters (:meth:`folded_bytes`). ``fold=False`` drops them. Layers whose
        folding would read more (DeepSeek-sized latents) keep the per-head products."""
        for attn in self.attentions():
            if hasattr(attn, "fold_absorbed"):
                attn.fold_absorbed(fold)
        return self

    def folded_bytes(self) -> tuple[int, int]:
        """(memory the folded MLA weights hold, bytes a decode step reads more with them; negative: fewer)."""
        folds = self._folds()
        return sum(folded.extra_bytes for _, folded in folds), sum(folded.read_delta(attn) for attn, folded in folds)

    def folded_sides(self) -> dict[str, int]:
        """How many MLA layers fold each side: {'query+output': n, 'output': m, ...}; empty when none is folded."""
        return dict(collections.Counter(folded.sides for _, folded in self._folds()))

    def fuse_projections(self, fuse: bool = True) -> EngineOptions:
        """Run the projections that read the same input as one GEMM each, in calls without gradients (inference):
        q/k/v and GateSWA's gate (MLA: the query's first projection and ``kv_a_proj_with_mqa``), and a dense
        MLP's gate and up. A decode step then launches about half as many GEMMs (each ~3.7 us on an H100 at
        batch 64 for SmolLM2's sizes, whatever its width). The fused weights are views of the same memory as
        the parameters: no extra memory, checkpoints and ``state_dict`` unchanged, training unaffected.
        ``fuse=False`` gives every layer its own storage again."""
        for owner, name in self._fused_groups():
            getattr(owner, name).release()
            setattr(owner, name, None)
        if fuse:
            for attn in self.attentions():
                attn.fuse()
            for layer in self.model.layers:
                if gated_mlp(layer.mlp) and self._backbone("layer") != "teacher":  # the teacher's own layer runs its MLP itself
                    layer.mlp._attnedit_gate_up = FusedLinears([layer.mlp.gate_proj, layer.mlp.up_proj])
        return self

    def compile_prefill(self, backend: str | None = "inductor") -> EngineOptions:
        """Compile the element-wise work around every attention (the norms, the MLP's activation, the residual
        adds) for calls of more than one token without gradients - a prompt's prefill, in ``generate()`` too.

        Eagerly, that work is about half of a long prefill on a GPU (SmolLM2 at 64 x 8k: 587 of 1,066 ms of
        device time, as many full passes over the activations). ``torch.compile(dynamic=True)``: one compilation
        serves every prompt length and batch. The attention runs as before; decode steps and training are not
        affected. ``backend=None`` turns it off. If compiling fails, a warning is printed and prefill runs eagerly.
        """
        self.prefill_backend, self._prefill_fns = backend, None
        return self

    def _prefill_blocks(self):
        if self._prefill_fns is None:
            compile_ = lambda fn: torch.compile(fn, backend=self.prefill_backend, dynamic=True)  # noqa: E731
            self._prefill_fns = (compile_(pre_attention), compile_(post_attention))
        return self._prefill_fns

    def _prefill_failed(self, error: BaseException) -> None:
        print(f"attnedit: warning: compiling the prefill failed ({type(error).__name__}: {first_line(error)}); running it eagerly", file=sys.stderr)
        self.prefill_backend, self._prefill_fns = None, None

    def _layer_prefill(self, layer, h: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """:meth:`_layer` with the parts around the attention compiled; the attention (which writes the cache)
        runs exactly once whatever happens to the compiled parts."""
        pre, post = self._prefill_blocks()
        try:
            x = pre(layer, h)
        except Exception as e:  # noqa: BLE001 - any compiler failure: eager from here on
            self._prefill_failed(e)
            x = pre_attention(layer, h)
        a = layer.self_attn(x, ctx)
        if self.prefill_backend is None:
            return post_attention(layer, h, a)
        try:
            return post(layer, h, a)
        except Exception as e:  # noqa: BLE001
            self._prefill_failed(e)
            return post_attention(layer, h, a)
