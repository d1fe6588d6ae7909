"""Typed results: one record per file a run writes (attnedit.results), read by the report and the comparison.

The run folders under docs/results/ were written before the records existed; the docs cite them, so every
one must still read, write back unchanged, and make its report and comparison.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from attnedit import AttnEditError
from attnedit.report import build_report, compare_runs
from attnedit.results import Bench, Passkey, Quality, Summary, read_any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
RECORDS = (Summary, Quality, Passkey, Bench)


def _published(cls) -> list[Path]:
    pattern = "bench-*.json" if cls is Bench else f"**/{cls.FILE}"
    return sorted(RESULTS.glob(pattern))


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.FILE)
def test_every_published_file_reads_as_its_record_and_writes_back_unchanged(cls, tmp_path):
    files = _published(cls)
    if not files:
        pytest.skip(f"no published {cls.FILE} under {RESULTS}")
    for path in files:
        record = cls.read(path)
        assert isinstance(record, cls), path
        data = json.loads(path.read_text())
        assert record.to_dict() == data, path  # every key kept, none added (a key a file lacks stays absent)
        copy = record.write(tmp_path / cls.FILE)
        assert json.loads(copy.read_text()) == data, path


def test_old_files_read_with_the_defaults_of_their_time():
    """passkey.json before filler could vary has no filler (the same filler then); summary.json before the KV
    dtype was named says bf16 in its kv.dtype; an old eval.json's tasks and windows are typed."""
    old_passkey = next(p for p in _published(Passkey) if "filler" not in json.loads(p.read_text()))
    record = Passkey.read(old_passkey)
    assert record.filler == "same" and "filler" not in record.to_dict()
    assert set(record.grid("student")) == set(record.contexts)
    summary = Summary.read(next(iter(_published(Summary))))
    assert summary.kv.dtype == "bfloat16" and summary.stage(2) is summary.stage2
    quality = Quality.read(next(iter(_published(Quality))))
    assert quality.perplexity.contexts and all(t.student for t in quality.tasks.values())


def test_published_run_folders_make_their_report_and_comparison(tmp_path):
    runs = sorted({p.parent for p in _published(Summary) if (p.parent / Quality.FILE).is_file()})
    if not runs:
        pytest.skip(f"no published run folders under {RESULTS}")
    compared = compare_runs(runs, tmp_path / "compare.md").read_text()
    assert all(f"| {run.name} |" in compared or f"| {run} |" in compared for run in runs)
    run = tmp_path / runs[0].name
    shutil.copytree(runs[0], run, ignore=shutil.ignore_patterns("*.png"))
    report = build_report(run).read_text()
    assert "## Quality" in report and "_No quality figures" not in report and "| wikitext2" in report


def test_a_newer_writers_keys_are_kept_and_wrong_types_are_one_line(tmp_path):
    bench = Bench.read(_published(Bench)[0]) if _published(Bench) else None
    data = bench.to_dict() if bench else {"kv": {}, "runs": [{"batch": 1, "context": 8}]}
    data["serving"] = {"tokens_s": 1.0}  # a figure a later bench adds
    data["runs"][0]["student_extra"] = [1, 2]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    assert Bench.read(path).to_dict() == data
    data["runs"][0]["batch"] = "many"
    path.write_text(json.dumps(data))
    with pytest.raises(AttnEditError, match=r"bench.json does not have the layout attnedit writes \(runs.0.batch: ") as e:
        read_any(path)
    assert "\n" not in str(e.value)


def test_one_module_names_the_result_files():
    """The file names appear as values only in attnedit/results.py; everything else asks its records."""
    names = {cls.FILE for cls in RECORDS}
    found = {}
    for path in sorted((ROOT / "attnedit").rglob("*.py")):
        tree = ast.parse(path.read_text())
        hits = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in names]
        if hits:
            found[str(path.relative_to(ROOT))] = hits
    assert list(found) == ["attnedit/results.py"], found
