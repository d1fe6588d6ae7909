"""Model surgery: which layers change, to what, and how their weights start."""

from .edit import attention_parameters, capture_attention_inputs, edit_model, edited_config, teacher_on_attnedit
from .settings import SETTINGS, TARGETS, GateSWASettings, MLASettings, TargetSettings, field_help, parse_settings

__all__ = [
    "SETTINGS",
    "TARGETS",
    "GateSWASettings",
    "MLASettings",
    "TargetSettings",
    "attention_parameters",
    "capture_attention_inputs",
    "edit_model",
    "edited_config",
    "field_help",
    "parse_settings",
    "teacher_on_attnedit",
]
