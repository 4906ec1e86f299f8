"""The char tokenizer (ids, exact round trip, save/load) and load_tokenizer's errors."""
import pytest

from hfrl.data.tokenizer import SPECIAL_TOKENS, char_tokenizer, load_tokenizer

ALPHABET = "0123456789+=max(,) "


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(ALPHABET)


def test_special_and_character_ids(tok):
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids(list(ALPHABET)) == list(range(3, 3 + len(ALPHABET)))
    assert len(tok) == 3 + len(ALPHABET)


@pytest.mark.parametrize("text", ["12+3", "max(3,7,2,5)=", "  1 2  ", ""])
def test_encode_decode_round_trip(tok, text):
    ids = tok(text)["input_ids"]
    assert ids == [1] + [3 + ALPHABET.index(c) for c in text]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids + [2, 0, 0], skip_special_tokens=True) == text
    assert tok.decode(ids) == "<bos>" + text


def test_batched_and_without_specials(tok):
    assert tok(["1", "23"])["input_ids"] == [[1, 4], [1, 5, 6]]
    assert tok("23", add_special_tokens=False)["input_ids"] == [5, 6]


def test_save_and_load_same_ids(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    text = "max(9,0,1,2)= 12+3"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text


def test_missing_pad_becomes_eos(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>")
    assert bare.pad_token is None
    bare.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "<eos>" and loaded.pad_token_id == 2


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no tokenizer files.*weights\.bin"):
        load_tokenizer(str(tmp_path))


def test_char_tokenizer_bad_alphabet():
    with pytest.raises(ValueError, match="non-empty"):
        char_tokenizer("")
    with pytest.raises(ValueError, match=r"repeats \['1'\]"):
        char_tokenizer("121")
