"""Model surgery: build the edited model from a teacher, sharing every frozen weight with it.

The student is an :class:`AttnEditForCausalLM` whose embeddings, norms, MLP/MoE blocks and LM head
*are* the teacher's modules (the same tensors, not copies), and whose attention is a new target
module in each edited layer and a :class:`DenseAttention` wrapping the teacher's projections in the
others. Teacher and student therefore cost one set of frozen weights in memory.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import AttnEditError
from ..families import family_for
from ..targets import AttnEditConfig, AttnEditForCausalLM
from .api import attention_code, get_target
from .settings import TargetSettings, parse_settings, plan_layers


def edited_config(teacher_config, target: str, target_args: dict | TargetSettings | None = None) -> AttnEditConfig:
    """The edited model's config, computed from the teacher's config alone (no weights needed)."""
    family = family_for(teacher_config)
    settings = target_args if isinstance(target_args, TargetSettings) else parse_settings(target, target_args)
    plan, edited = plan_layers(target, settings, teacher_config, family)
    return _config(teacher_config, plan, {"target": target, "settings": vars(settings), "edited_layers": edited})


def _config(teacher_config, layer_attention: list[dict], edit: dict, drop: tuple[str, ...] = ()) -> AttnEditConfig:
    family = family_for(teacher_config)
    base = teacher_config.to_dict()
    for key in ("auto_map", "quantization_config", "_name_or_path", *drop):
        base.pop(key, None)
    target = edit.get("target")
    extra = {}
    if family.backbone(teacher_config):
        extra["backbone"] = family.backbone(teacher_config)
    if target not in (None, "none") and attention_code(get_target(target)):
        extra["attention_code"] = attention_code(get_target(target))
    return AttnEditConfig(
        base_config=base,
        teacher_attention=family.attention_spec(teacher_config),
        layer_attention=layer_attention,
        family=family.name,
        edit=edit,
        architectures=["AttnEditForCausalLM"],
        **extra,
    )


def calibration_blocks(hidden_size: int, seq_len: int = 256) -> int:
    """How many blocks of ``seq_len`` tokens calibrate a teacher initialisation: about eight tokens per hidden
    dimension (the input covariance it whitens by has ``hidden_size`` of them; with fewer tokens than dimensions
    the factorisation fits noise), 4 to 128 blocks."""
    return max(4, min(128, -(-8 * hidden_size // seq_len)))


def default_calibration_ids(teacher, n_seqs: int | None = None, seq_len: int = 256, seed: int = 0) -> torch.Tensor:
    """Random token ids: a data-free stand-in for real text when initialising from the teacher (``convert``
    calibrates on the run's own data instead)."""
    n_seqs = n_seqs if n_seqs is not None else calibration_blocks(teacher.config.hidden_size, seq_len)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, teacher.config.vocab_size, (n_seqs, seq_len), generator=g)


def _share_backbone(student: AttnEditForCausalLM, teacher) -> None:
    family = family_for(teacher.config)
    for name, child in teacher.model.named_children():
        if name != "layers":
            setattr(student.model, name, child)
    for s_layer, t_layer in zip(family.layers(student), family.layers(teacher)):
        for name, child in t_layer.named_children():
            if name != "self_attn":
                setattr(s_layer, name, child)
    student.lm_head = teacher.get_output_embeddings()


def _share_projections(attn: nn.Module, t_attn: nn.Module) -> None:
    """An unedited layer's attention uses the teacher's own projection (and QK-norm) modules (a fused q/k/v:
    views of its weight, ``Family.projections``)."""
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
        if getattr(t_attn, name, None) is not None:
            setattr(attn, name, getattr(t_attn, name))


def _check_initialised(model: nn.Module) -> None:
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise AttnEditError(f"internal: parameters left uninitialised after surgery: {leftover[:3]}")


def edit_model(
    teacher,
    target: str,
    target_args: dict | TargetSettings | None = None,
    calibration_ids: torch.Tensor | None = None,
) -> AttnEditForCausalLM:
    """Return the edited (untrained) student. Frozen weights are shared with ``teacher``."""
    config = edited_config(teacher.config, target, target_args)
    settings = parse_settings(target, config.edit["settings"])
    chosen = get_target(target)
    unmeasured = chosen.unmeasured(settings)
    if unmeasured:
        raise AttnEditError(unmeasured)
    device = next(teacher.parameters()).device
    dtype = next(teacher.parameters()).dtype
    family = family_for(teacher.config)
    edited = config.edit["edited_layers"]
    prepared = {}
    if settings.init == "teacher" and chosen.calibrated:  # before the student exists: it may set per-layer shapes
        ids = calibration_ids if calibration_ids is not None else default_calibration_ids(teacher, seed=settings.seed)
        prepared = chosen.calibrate(teacher, edited, ids, config, settings)
    with torch.device("meta"):
        student = AttnEditForCausalLM(config)
    _share_backbone(student, teacher)
    torch.manual_seed(settings.seed)
    std = config.base_config.get("initializer_range", 0.02)
    for i, layer in enumerate(family.layers(student)):
        attn = layer.self_attn.to_empty(device=device).to(dtype)
        t_attn = family.projections(teacher, i)
        plan = config.layer_attention[i]
        if i not in edited:  # unedited: share the teacher's projections
            _share_projections(attn, t_attn)
        elif settings.init == "random":
            chosen.init_random(attn, plan, std)
        else:
            chosen.init_from_teacher(attn, t_attn, plan, config.teacher_attention, prepared.get(i), settings)
    _check_initialised(student)
    student.generation_config = teacher.generation_config
    return student.eval()


def teacher_on_attnedit(teacher) -> AttnEditForCausalLM:
    """The teacher itself as an attnedit model (every layer its own attention, sharing every weight):
    the same engine as a converted model, for like-for-like speed comparisons."""
    family = family_for(teacher.config)
    n = teacher.config.num_hidden_layers
    layers = [{"kind": "dense", "window": family.window(teacher.config, i)} for i in range(n)]
    config = _config(teacher.config, layers, {"target": "none", "settings": {}, "edited_layers": []}, drop=("dtype", "torch_dtype"))
    with torch.device("meta"):
        model = AttnEditForCausalLM(config)
    _share_backbone(model, teacher)
    for i, layer in enumerate(family.layers(model)):
        _share_projections(layer.self_attn, family.projections(teacher, i))
    _check_initialised(model)
    model.generation_config = teacher.generation_config
    return model.eval()


def attention_parameters(student: AttnEditForCausalLM, edited_only: bool = True) -> list[nn.Parameter]:
    """Parameters of the new attention modules (what stage 1 trains)."""
    layers = student.config.edit.get("edited_layers", [])
    params = []
    for i, attn in enumerate(student.attentions()):
        if not edited_only or i in layers:
            params += list(attn.parameters())
    return params


__all__ = [
    "attention_parameters",
    "edit_model",
    "edited_config",
    "teacher_on_attnedit",
]
