"""The run folder: a new run starts in an empty folder with its resolved recipe (and that recipe's sha256);
a resumed run must be the same recipe, unedited."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import AttnEditError
from ..io import check_output, write_text
from ..recipe import Recipe, diff, load_recipe, to_yaml


def check_new_run_dir(run_dir: Path) -> None:
    """A new run needs a folder that does not exist yet (or is empty); nothing is written here."""
    if run_dir.exists() and not run_dir.is_dir():
        raise AttnEditError(f"{run_dir} is a file; give a folder for the run (--out)")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise AttnEditError(f"{run_dir} already exists; continue it with --resume, or choose another --out")
    check_output(run_dir, overwrite=True)  # a folder that cannot be made or written fails now, before any loading


def prepare_run_dir(recipe: Recipe, run_dir: Path, resume: bool) -> None:
    """A new run folder gets the resolved recipe (and its sha256); a resumed one must have been started
    with the same recipe, and its recipe.yaml must be the one written then."""
    saved = run_dir / "recipe.yaml"
    checksum = run_dir / "recipe.yaml.sha256"
    if resume:
        if run_dir.exists() and not run_dir.is_dir():
            raise AttnEditError(f"{run_dir} is a file, not a run folder to resume")
        if not saved.is_file():
            raise AttnEditError(f"{run_dir} has no recipe.yaml, so it is not a run to resume; start it without --resume")
        check_output(run_dir, "the run folder", overwrite=True)  # checkpoints and the model are written here
        if checksum.is_file() and checksum.read_text().split()[:1] != [hashlib.sha256(saved.read_bytes()).hexdigest()]:
            raise AttnEditError(
                f"{saved} was edited after the run started (its sha256 differs from {checksum.name}); put it back as it was "
                f"to resume, or start a new run from the edited recipe with another --out"
            )
        old = load_recipe(saved)
        changed = sorted(diff(old, recipe))
        if changed:
            first = changed[0]
            raise AttnEditError(
                f"{run_dir} was started with a different recipe ({len(changed)} field(s) differ, e.g. {first}); "
                f"resume with its own recipe (attnedit convert {run_dir} --resume) or choose another --out"
            )
        return
    check_new_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = to_yaml(recipe, "the fully resolved recipe of this run (attnedit convert)")
    write_text(checksum, f"{hashlib.sha256(text.encode()).hexdigest()}  recipe.yaml\n")
    write_text(saved, text)
