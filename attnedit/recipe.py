"""A recipe: one YAML file that says everything ``attnedit convert`` does, and its typed schema.

Every field has a default and a one-line help (``attnedit recipe --explain`` lists them). Loading
rejects unknown or ill-typed fields with a one-line error naming the field and what it accepts.
``--set a.b=value`` overrides any field before validation. The run folder keeps the fully resolved
recipe (``recipe.yaml``: every field explicit, data paths absolute), so a run can be resumed or
repeated exactly.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from .data import DataConfig
from .errors import AttnEditError
from .eval.bench import BenchSettings
from .eval.passkey import PasskeySettings
from .eval.quality import QualitySettings
from .results import Bench, Passkey, Quality
from .schema import build, section, setting
from .surgery import SETTINGS, TARGETS, field_help, parse_settings

PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULES = ("cosine", "linear", "constant")
TRAINABLE = ("attention", "attention+norms", "all")
WEIGHTS_DTYPES = ("auto", "float32", "bfloat16")
COMPILE = ("auto", "on", "off")


_f = setting  # a field with its help (and allowed values): see attnedit.schema


@dataclass
class StageConfig:
    """Settings every stage shares: how long, how much data per step, and the optimiser's schedule."""

    steps: int = _f(200, "optimizer steps; 0 skips the stage")
    batch_size: int = _f(
        8, "sequences per micro-batch (on a GPU too small for it, convert runs the largest that fits, with grad_accum raised to keep the global batch)"
    )
    grad_accum: int = _f(1, "micro-batches per optimizer step (effective batch = batch_size x grad_accum)")
    seq_len: int | None = _f(None, "tokens per sequence in this stage (default: data.seq_len)")
    lr: float = _f(1e-3, "peak learning rate (AdamW)")
    warmup: int = _f(20, "steps of linear warm-up from 0 to lr")
    schedule: str = _f("cosine", "decay from lr to min_lr after warm-up", SCHEDULES)
    min_lr: float = _f(1e-5, "learning rate at the last step")
    weight_decay: float = _f(0.0, "AdamW weight decay (matrices only, not norms or biases)")
    clip: float = _f(1.0, "clip the gradient norm to this value; 0 turns clipping off")
    precision: str = _f("auto", "auto = bf16 autocast on a GPU that supports it, fp32 otherwise", PRECISIONS)
    compile: str = _f(
        "auto",
        "torch.compile the trained computation (stage 1: each attention and its loss; stage 2: the decoder layers); auto = on CUDA only; falls back to eager if compiling fails",
        COMPILE,
    )


@dataclass
class Stage1Config(StageConfig):
    """Stage 1: layer-wise teacher forcing (per-layer normalised MSE on the teacher's activations)."""

    steps: int = _f(200, "optimizer steps; 0 skips stage 1 (the 'stage 2 only' ablation)")
    lr: float = _f(1e-3, "peak learning rate (AdamW)")


@dataclass
class Stage2Config(StageConfig):
    """Stage 2: model-level distillation on next-token distributions (plus optional CE and features)."""

    steps: int = _f(200, "optimizer steps; 0 skips stage 2")
    lr: float = _f(1e-4, "peak learning rate (AdamW)")
    temperature: float = _f(1.0, "KD temperature T; the KL term is T^2 KL(p_T^(1/T) || p_S^(1/T))")
    kl_weight: float = _f(1.0, "weight of the KL term")
    ce_weight: float = _f(0.0, "weight of cross-entropy on the data's next tokens")
    feature_weight: float = _f(0.0, "weight of sum over layers of (1 - cos(h_student, h_teacher)) on hidden states")
    trainable: str = _f("attention", "what trains: the edited attention, plus all norms, or every weight (a second copy)", TRAINABLE)
    kl_chunk: int = _f(1024, "tokens per chunk of the KL/CE loss: fp32 logits never exceed kl_chunk x vocab")
    gradient_checkpointing: bool = _f(
        False,
        "true: recompute every decoder layer in the backward pass (less memory, slower: each layer's forward runs twice); "
        "false: none, unless no micro-batch fits the GPU without it, where convert recomputes the fewest of the first "
        "layers that fit",
    )
    recall_fraction: float = _f(
        0.0,
        "fraction of stage-2 blocks in which a 32-256 token span of the block's text is copied further on, so the "
        "student learns to fetch it from far back as the teacher does (long-range retrieval; attnedit.data.recall); 0 = off",
    )
    recall_min_distance: int = _f(
        0,
        "tokens at least from a recall span's start to its copy's (e.g. window + 1 for GateSWA: no token of the copy can "
        "see its source through a sliding layer); 0 = any distance past the span",
    )


@dataclass
class PasskeyConfig(PasskeySettings):
    """``eval.passkey``: ``attnedit passkey``'s settings; it runs when ``contexts`` lists at least one."""

    contexts: list[int] = _f([], "prompt lengths for passkey retrieval (passkey.json); empty: no passkey (attnedit passkey --contexts)")


@dataclass
class BenchConfig(BenchSettings):
    """``eval.bench``: ``attnedit bench``'s settings; it runs when ``contexts`` lists at least one."""

    contexts: list[int] = _f([], "prompt lengths for the decode benchmark (bench.json); empty: no bench (attnedit bench --contexts)")


@dataclass
class EvalConfig(QualitySettings):
    """``eval``: what ``convert`` measures once the model is saved, student next to teacher, with the
    functions of ``attnedit eval``, ``passkey`` and ``bench`` (same settings, same JSON), then the report.
    Each part runs only when its list is not empty; nothing runs by default."""

    tasks: list[str] = _f([], "tasks evaluated after saving (eval.json), as attnedit eval --tasks; empty: no quality evaluation")
    passkey: PasskeyConfig = section(PasskeyConfig, "passkey retrieval after saving (attnedit passkey)")
    bench: BenchConfig = section(BenchConfig, "decode speed and memory after saving (attnedit bench)")

    def parts(self) -> list[str]:
        """The result files this section asks for, in the order they are made."""
        wanted = [(Quality.FILE, self.tasks), (Passkey.FILE, self.passkey.contexts), (Bench.FILE, self.bench.contexts)]
        return [name for name, values in wanted if values]


@dataclass
class Recipe:
    """Everything one conversion does: teacher -> edit -> stage 1 -> stage 2 -> saved model."""

    teacher: str = _f("smollm2-135m", "teacher: Hugging Face id, local folder, .gguf file or smollm2-135m")
    target: str = _f("mla", "the new attention", TARGETS)
    target_args: dict = _f({}, "target settings, as for `attnedit edit --set` (see below)")
    data: DataConfig = section(DataConfig, "training text")
    stage1: Stage1Config = section(Stage1Config, "stage 1")
    stage2: Stage2Config = section(Stage2Config, "stage 2")
    checkpoint_every: int = _f(100, "write a checkpoint every this many optimizer steps (and at each stage's end)")
    keep_checkpoints: int = _f(2, "checkpoints kept on disk; older ones are deleted once a newer one is written")
    log_every: int = _f(10, "optimizer steps per line of metrics.jsonl (and per progress update)")
    seed: int = _f(0, "seed for data order and any randomness in training")
    device: str = _f("auto", "cpu, cuda, cuda:1 ...; auto = cuda if available, else cpu")
    weights_dtype: str = _f("auto", "dtype of the frozen teacher weights; auto = bfloat16 when both stages run in bf16, else float32", WEIGHTS_DTYPES)
    max_nonfinite_restarts: int = _f(3, "on a non-finite or diverging loss: restore the last good checkpoint and halve the lr, at most this many times")
    divergence_factor: float = _f(10.0, "a logged loss above this many times the median of the last 5 logged losses is treated like a non-finite one (0 = off)")
    baseline_batches: int = _f(
        5,
        "batches of the teacher's plain forward timed (after two warm-up ones; the median counts) at each stage's batch shape before training: tokens/s ratios in progress, metrics.jsonl, summary.json; 0 skips it",
    )
    profile_steps: int = _f(
        0,
        "after each stage, profile this many more optimizer steps (torch.profiler; the weights are restored, the result is unchanged) next to one teacher plain forward of the same batch shape: device time by kernel family in profile-stage<N>.json and summary.json; 0 = off",
    )
    heldout_eval: bool = _f(
        True,
        "measure KL and CE on the held-out blocks before stage 1 and after stage 2 (summary.json); where a stage trains on "
        "longer sequences than data.seq_len, the same text in blocks of that length too",
    )
    eval: EvalConfig = section(EvalConfig, "evaluation after the model is saved: eval.json, passkey.json, bench.json, report.md")

    def stage_tokens(self, n: int) -> int:
        """Stage ``n``'s training tokens as written: steps x batch_size x grad_accum x its sequence length."""
        st = self.stage1 if n == 1 else self.stage2
        return st.steps * st.batch_size * st.grad_accum * (st.seq_len or self.data.seq_len)


# ----------------------------------------------------------------------------------- parsing


def _set_path(raw: dict, key: str, value: str) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise AttnEditError(f"--set {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _resolve_path(entry: str, base: Path | None) -> str:
    """A relative path or glob: against the current directory first, then against the recipe's folder."""
    p = Path(entry).expanduser()
    if p.is_absolute():
        return str(p)
    for root in [Path.cwd()] + ([base] if base is not None else []):
        candidate = root / p
        if glob.glob(str(candidate)) if glob.has_magic(entry) else candidate.exists():
            return os.path.abspath(candidate)
    return entry


def validate(r: Recipe) -> Recipe:
    """Range checks that types cannot express; target_args are checked (and completed) by the surgery."""
    try:
        settings = parse_settings(r.target, r.target_args)
    except AttnEditError as e:
        raise AttnEditError(f"target_args: {e}") from None
    r.target_args = dict(vars(settings))
    r.data.validate()
    for name, st in (("stage1", r.stage1), ("stage2", r.stage2)):
        checks = [
            (st.steps >= 0, "steps", ">= 0"),
            (st.batch_size >= 1, "batch_size", ">= 1"),
            (st.grad_accum >= 1, "grad_accum", ">= 1"),
            (st.seq_len is None or st.seq_len >= 2, "seq_len", ">= 2 (or none for data.seq_len)"),
            (st.lr > 0, "lr", "> 0"),
            (0 <= st.min_lr <= st.lr, "min_lr", "between 0 and lr"),
            (st.warmup >= 0, "warmup", ">= 0"),
            (st.weight_decay >= 0, "weight_decay", ">= 0"),
            (st.clip >= 0, "clip", ">= 0 (0 = no clipping)"),
        ]
        for ok, fname, rule in checks:
            if not ok:
                raise AttnEditError(f"{name}.{fname}={getattr(st, fname)!r}: must be {rule}")
    s2 = r.stage2
    for ok, fname, rule in [
        (s2.temperature > 0, "temperature", "> 0"),
        (min(s2.kl_weight, s2.ce_weight, s2.feature_weight) >= 0, "kl_weight/ce_weight/feature_weight", ">= 0"),
        (s2.kl_weight + s2.ce_weight + s2.feature_weight > 0, "kl_weight/ce_weight/feature_weight", "not all 0"),
        (s2.kl_chunk >= 1, "kl_chunk", ">= 1"),
        (0 <= s2.recall_fraction <= 1, "recall_fraction", "between 0 and 1 (0 = off)"),
        (s2.recall_min_distance >= 0, "recall_min_distance", ">= 0 tokens (0 = any distance)"),
    ]:
        if not ok:
            raise AttnEditError(f"stage2.{fname}: must be {rule}")
    for ok, fname, rule in [
        (r.checkpoint_every >= 1, "checkpoint_every", ">= 1"),
        (r.keep_checkpoints >= 1, "keep_checkpoints", ">= 1"),
        (r.log_every >= 1, "log_every", ">= 1"),
        (r.max_nonfinite_restarts >= 0, "max_nonfinite_restarts", ">= 0"),
        (r.divergence_factor == 0 or r.divergence_factor > 1, "divergence_factor", "> 1, or 0 to turn the check off"),
        (r.baseline_batches >= 0, "baseline_batches", ">= 0"),
        (r.profile_steps >= 0, "profile_steps", ">= 0"),
    ]:
        if not ok:
            raise AttnEditError(f"{fname}={getattr(r, fname)!r}: must be {rule}")
    if r.weights_dtype == "bfloat16" and "fp32" in (r.stage1.precision, r.stage2.precision):
        raise AttnEditError("weights_dtype=bfloat16 needs precision bf16 or auto in both stages; or set weights_dtype=float32")
    return r


def parse_recipe(raw: dict, sets: dict | None = None, base_dir: Path | None = None) -> Recipe:
    """Build and validate a recipe from a mapping plus ``--set`` overrides; resolve data paths."""
    raw = dict(raw or {})
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for key, value in (sets or {}).items():
        _set_path(raw, key, value)
    recipe = build(Recipe, raw, "")
    recipe.data.files = [_resolve_path(f, base_dir) for f in recipe.data.files]
    if recipe.data.tokenizer:
        recipe.data.tokenizer = _resolve_path(recipe.data.tokenizer, base_dir)
    if recipe.eval.data_dir:
        recipe.eval.data_dir = _resolve_path(recipe.eval.data_dir, base_dir)
    teacher = _resolve_path(recipe.teacher, base_dir)
    if Path(teacher).exists():
        recipe.teacher = teacher
    return validate(recipe)


def load_recipe(path: str | os.PathLike, sets: dict | None = None) -> Recipe:
    """Read a recipe YAML (relative paths in it resolve against the cwd, then the file's folder)."""
    p = Path(path)
    if not p.is_file():
        raise AttnEditError(f"recipe {path} does not exist; see recipes/ for examples")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        first = str(e).replace("\n", " ")
        raise AttnEditError(f"recipe {path} is not valid YAML: {first}") from None
    if not raw:
        raise AttnEditError(f"recipe {path} is empty; give at least teacher:, target: and data: (see recipes/ or attnedit recipe --explain)")
    if not isinstance(raw, dict):
        raise AttnEditError(f"recipe {path} must be a YAML mapping of fields (teacher:, target:, ...); see recipes/")
    return parse_recipe(raw, sets, p.resolve().parent)


def diff(a: Recipe, b: Recipe) -> list[str]:
    """Dotted names of the fields whose values differ between two recipes."""

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and k != "target_args":
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    fa, fb = flat(asdict(a)), flat(asdict(b))
    return [k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)]


# ----------------------------------------------------------------------------------- writing


def _data_help() -> dict[str, str]:
    helper = getattr(DataConfig, "help", None)
    if callable(helper):
        try:
            return {name: text for name, text, _ in helper()}
        except TypeError:
            pass
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(DataConfig)}


def _help_of(cls, f) -> str:
    if cls is DataConfig:
        return _data_help().get(f.name, "")
    text = f.metadata.get("help", "")
    choices = f.metadata.get("choices")
    return f"{text} [{'|'.join(choices)}]" if choices else text


def _scalar(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip().removesuffix("...").strip()


def to_yaml(recipe: Recipe, header: str = "", comments: bool = True) -> str:
    """The recipe as YAML with every field explicit and (optionally) its help as a comment."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]

    def emit(obj, indent: str):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if comments:
                lines.append(f"{indent}# {_help_of(type(obj), f)}")
            if dataclasses.is_dataclass(value):
                lines.append(f"{indent}{f.name}:")
                emit(value, indent + "  ")
            elif isinstance(value, dict) and value:
                lines.append(f"{indent}{f.name}:")
                for k, v in value.items():
                    lines.append(f"{indent}  {k}: {_scalar(v)}")
            else:
                lines.append(f"{indent}{f.name}: {_scalar(value)}")

    emit(recipe, "")
    return "\n".join(lines) + "\n"


def explain() -> str:
    """Every recipe field with its default and help, then each target's settings (``target_args``)."""
    rows = []

    def walk(cls, prefix: str):
        defaults = cls()
        for f in dataclasses.fields(cls):
            value = getattr(defaults, f.name)
            if dataclasses.is_dataclass(value):
                walk(type(value), f"{prefix}{f.name}.")
            else:
                rows.append((f"{prefix}{f.name}", _scalar(value), _help_of(cls, f)))

    walk(Recipe, "")
    targets: dict[tuple, list[str]] = {}
    for target, cls in SETTINGS.items():
        for name, text, default in field_help(cls):
            targets.setdefault((f"target_args.{name}", _scalar(default), text), []).append(target)
    rows += [(n, d, f"({', '.join(ts)}) {h}") for (n, d, h), ts in targets.items()]
    width = max(len(r[0]) for r in rows) + 2
    dwidth = 14
    lines = []
    for n, d, h in rows:
        if len(d) >= dwidth:  # a long default gets its own line
            lines += [f"{n:<{width}}{d}", f"{'':<{width + dwidth}}{h}"]
        else:
            lines.append(f"{n:<{width}}{d:<{dwidth}}{h}")
    return "\n".join(lines)


__all__ = [
    "Recipe",
    "Stage1Config",
    "Stage2Config",
    "StageConfig",
    "diff",
    "explain",
    "load_recipe",
    "parse_recipe",
    "to_yaml",
    "validate",
]
