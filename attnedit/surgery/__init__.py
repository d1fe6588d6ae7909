"""Model surgery: which layers change, to what, and how their weights start; the target API (``api.py``)."""

from .api import LayerPlan, Target, get_target, register_target, target_of_kind, unregister_target
from .edit import attention_parameters, capture_attention_inputs, edit_model, edited_config, teacher_on_attnedit
from .settings import SETTINGS, TARGETS, GateSWASettings, MLASettings, TargetSettings, field_help, parse_settings

__all__ = [
    "SETTINGS",
    "TARGETS",
    "GateSWASettings",
    "LayerPlan",
    "MLASettings",
    "Target",
    "TargetSettings",
    "attention_parameters",
    "capture_attention_inputs",
    "edit_model",
    "edited_config",
    "field_help",
    "get_target",
    "parse_settings",
    "register_target",
    "target_of_kind",
    "teacher_on_attnedit",
    "unregister_target",
]
