"""Model surgery: which layers change, to what, and how their weights start; the target API (``api.py``) and the
built-in targets (``builtin.py``: MLA, GateSWA; ``gqa.py``), which this package adds to the registry."""

from ..families.hooks import capture_attention_inputs
from .api import LayerPlan, Target, add_builtin, get_target, register_target, target_of_kind, unregister_target
from .builtin import BUILTIN
from .edit import attention_parameters, edit_model, edited_config, teacher_on_attnedit
from .settings import SETTINGS, TARGETS, GateSWASettings, MLASettings, TargetSettings, field_help, parse_settings

add_builtin(*BUILTIN)  # attnedit's own targets, registered before any other when a target is first looked up

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
