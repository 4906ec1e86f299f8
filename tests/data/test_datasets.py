"""read_rows (JSONL, Parquet), PromptDataset (validation, tokenization, truncation, chat) and
StepSampler (resume equivalence, epochs, drop_last)."""
import json

import pytest

from hfrl.data.datasets import TRUNCATIONS, PromptDataset, StepSampler, read_rows
from hfrl.data.tasks import get_task
from hfrl.data.tokenizer import char_tokenizer

ALPHABET = "0123456789+=abcdefghijklmnopqrstuvwxyz :"


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(ALPHABET)


def write_jsonl(path, rows, extra_lines=()):
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_truncation_choices_match_config():
    from hfrl.config import TRUNCATIONS as CONFIG_TRUNCATIONS

    assert TRUNCATIONS == CONFIG_TRUNCATIONS


def test_read_jsonl_skips_blank_lines(tmp_path):
    rows = [{"prompt": "1+2=", "ground_truth": "3"}, {"prompt": "abc", "id": 7}]
    path = tmp_path / "p.jsonl"
    path.write_text(f"{json.dumps(rows[0])}\n\n   \n{json.dumps(rows[1])}\n")
    assert read_rows(path) == rows


def test_read_jsonl_non_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"prompt": "ok"}).encode() + b"\n" + '{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8 \(byte 0xe9 at column 16\)"):
        read_rows(path)
    path.write_bytes('{"prompt": "caf\u00e9 \u2713"}\r\n'.encode())
    assert read_rows(path) == [{"prompt": "caf\u00e9 \u2713"}]

def test_read_jsonl_errors_name_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}], ["", "{not json"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        read_rows(path)
    path = write_jsonl(tmp_path / "list.jsonl", [{"prompt": "x"}], ['["x"]'])
    with pytest.raises(ValueError, match=r"list\.jsonl:2: a JSON list, expected an object"):
        read_rows(path)
    with pytest.raises(ValueError, match=r"'\.csv'.*\.jsonl, \.parquet"):
        read_rows(tmp_path / "p.csv")
    with pytest.raises(ValueError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")


def test_read_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "1+2=", "ground_truth": "3", "n": 1},
            {"prompt": "9+9=", "ground_truth": "18", "n": 2}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    assert read_rows(tmp_path / "p.parquet") == rows


def test_dataset_ids_ground_truth_and_extras(tok):
    rows = [{"prompt": "1+2=", "ground_truth": "3", "id": 1}, {"prompt": "hello", "lang": "en"}]
    ds = PromptDataset(rows, tok)
    assert len(ds) == 2
    assert ds.prompt_ids == [tok(r["prompt"])["input_ids"] for r in rows]
    assert ds.prompt_ids[0] == [1, 4, 13, 5, 14]  # bos, then 3 + index in ALPHABET
    assert ds.prompts == ["1+2=", "hello"]
    assert ds.ground_truths == ["3", None]
    assert ds.extras == [{"id": 1}, {"lang": "en"}]
    assert ds.rows == rows
    assert ds[1] == {"prompt_ids": ds.prompt_ids[1], "prompt": "hello", "ground_truth": None,
                     "extra": {"lang": "en"}}


def test_dataset_custom_prompt_key(tok):
    ds = PromptDataset([{"question": "ab", "prompt": "kept"}], tok, prompt_key="question")
    assert ds.prompts == ["ab"] and ds.extras == [{"prompt": "kept"}]


@pytest.mark.parametrize("row,match", [
    ({"question": "x", "answer": "y"}, r"src row 2 \(0-based\) has no 'prompt' key; its keys "
                                        r"are \['answer', 'question'\]: set data.prompt_key"),
    ({"prompt": None}, r"src row 2 .*'prompt' is None, expected a non-empty prompt"),
    ({"prompt": "  "}, r"src row 2 .*'prompt' is '  '"),
    ({"prompt": []}, r"src row 2 .*'prompt' is \[\]"),
    ({"prompt": [{"role": "user"}]}, r"src row 2 .*message 0 of the 'prompt' chat"),
])
def test_dataset_bad_rows_named(tok, row, match):
    rows = [{"prompt": "a"}, {"prompt": "b"}, row]
    with pytest.raises(ValueError, match=match):
        PromptDataset(rows, tok, source="src")


def test_dataset_bad_types_named(tok):
    with pytest.raises(TypeError, match=r"src row 1 .*'prompt' is a int \(42\), expected a string"):
        PromptDataset([{"prompt": "a"}, {"prompt": 42}], tok, source="src")
    with pytest.raises(TypeError, match=r"src row 0 .*is a str, expected a dict"):
        PromptDataset(["a"], tok, source="src")


def test_dataset_unencodable_prompt_names_row(tok):
    with pytest.raises(ValueError, match=r"src row 1: the tokenizer cannot encode the prompt 'A!'"):
        PromptDataset([{"prompt": "a"}, {"prompt": "A!"}], tok, source="src")


def test_too_long_and_truncation(tok):
    rows = [{"prompt": "abcdef"}, {"prompt": "ab"}]
    full = tok("abcdef")["input_ids"]  # bos + 6 characters
    with pytest.raises(ValueError, match=r"src row 0: the prompt is 7 tokens, more than "
                                         r"max_prompt_length=4: .*'left'.*'right'"):
        PromptDataset(rows, tok, max_prompt_length=4, source="src")
    left = PromptDataset(rows, tok, max_prompt_length=4, truncation="left")
    right = PromptDataset(rows, tok, max_prompt_length=4, truncation="right")
    assert left.prompt_ids[0] == full[-4:] == [tok.convert_tokens_to_ids(c) for c in "cdef"]
    assert right.prompt_ids[0] == full[:4] == [1] + [tok.convert_tokens_to_ids(c) for c in "abc"]
    assert left.prompt_ids[1] == right.prompt_ids[1] == tok("ab")["input_ids"]
    assert left.prompts[0] == right.prompts[0] == "abcdef"
    with pytest.raises(ValueError, match="truncation='middle'"):
        PromptDataset(rows, tok, truncation="middle")


def test_chat_prompts():
    chat_tok = char_tokenizer(ALPHABET)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2"}]
    rows = [{"prompt": chat, "ground_truth": "3"}, {"prompt": "plain"}]
    with pytest.raises(ValueError, match=r"row 0: the prompt is a chat .* no chat template"):
        PromptDataset(rows, chat_tok)
    chat_tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} "
                              "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    ds = PromptDataset(rows, chat_tok)
    rendered = "system: be brief user: 1+2 assistant:"
    assert ds.prompts == [rendered, "plain"]
    # The template carries no bos, and rendering adds no special tokens.
    assert ds.prompt_ids[0] == chat_tok(rendered, add_special_tokens=False)["input_ids"]
    assert ds.prompt_ids[1] == chat_tok("plain")["input_ids"]
    assert ds.ground_truths == ["3", None]


def test_from_files_concatenates_and_names_file(tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a1"}, {"prompt": "a2"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "b1", "ground_truth": "x"}])
    ds = PromptDataset.from_files([str(a), b], tok, max_prompt_length=8)
    assert ds.prompts == ["a1", "a2", "b1"] and ds.ground_truths == [None, None, "x"]
    assert ds.prompt_ids[2] == tok("b1")["input_ids"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"text": "no prompt"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl row 1 \(0-based\) has no 'prompt' key"):
        PromptDataset.from_files([a, bad], tok)
    with pytest.raises(ValueError, match="no prompt files"):
        PromptDataset.from_files([], tok)


def test_from_task():
    task = get_task("add")
    ds = PromptDataset.from_task("add", None, num=20, seed=5, split="val")
    rows = task.make_prompts(20, seed=5, split="val")
    assert ds.prompts == [r["prompt"] for r in rows]
    assert ds.ground_truths == [r["ground_truth"] for r in rows]
    assert ds.prompt_ids == task.tokenizer()([r["prompt"] for r in rows])["input_ids"]


def test_sampler_resume_equivalence():
    a = StepSampler(103, 8, seed=11)
    steps = [a.indices(s) for s in range(40)]
    b = StepSampler(103, 8, seed=11)  # a resumed run: starts straight at step 25
    assert [b.indices(s) for s in range(25, 40)] == steps[25:]
    assert b.indices(3) == steps[3]
    assert StepSampler(103, 8, seed=12).indices(0) != steps[0]


def test_sampler_epochs_are_permutations():
    sampler = StepSampler(24, 6, seed=0)
    assert sampler.steps_per_epoch == 4
    epochs = [sum((sampler.indices(e * 4 + k) for k in range(4)), []) for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(24))
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] != list(range(24))
    ordered = StepSampler(24, 6, seed=0, shuffle=False)
    assert [ordered.indices(s) for s in (0, 3, 4)] == [[0, 1, 2, 3, 4, 5],
                                                       [18, 19, 20, 21, 22, 23],
                                                       [0, 1, 2, 3, 4, 5]]


def test_sampler_drop_last():
    dropped = StepSampler(10, 4, seed=1)
    assert dropped.steps_per_epoch == 2
    epoch0 = dropped.indices(0) + dropped.indices(1)
    assert len(epoch0) == len(set(epoch0)) == 8
    assert set(epoch0) < set(dropped.epoch_order(0)) == set(range(10))
    kept = StepSampler(10, 4, seed=1, drop_last=False)
    assert kept.steps_per_epoch == 3
    assert [len(kept.indices(s)) for s in range(4)] == [4, 4, 2, 4]
    assert sorted(kept.indices(0) + kept.indices(1) + kept.indices(2)) == list(range(10))
    assert kept.indices(3) == kept.epoch_order(1)[:4]


def test_sampler_errors():
    with pytest.raises(ValueError, match=r"batch_size=16 is more than the 10 prompt rows: "
                                         r"lower data.train_batch_size"):
        StepSampler(10, 16, seed=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        StepSampler(10, 0, seed=0)
    with pytest.raises(ValueError, match="step=-1"):
        StepSampler(10, 2, seed=0).indices(-1)


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        read_rows(tmp_path / "p.parquet")


def test_import_is_light():
    import subprocess
    import sys

    code = ("import sys, hfrl.data\n"
            "print(sorted(m for m in ('transformers', 'pyarrow', 'tokenizers') "
            "if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
