"""Tokenizers: a transformers tokenizer from a local folder, or a small per-character one.

`load_tokenizer` never downloads: the folder (data.tokenizer_path, else the actor's
engine.model_path) must already hold the tokenizer files. A tokenizer without a pad token gets
pad = eos, so batches can be padded; padding positions are masked out everywhere, and a
response's own eos is found as the first eos after the prompt, not by comparing with pad.

`char_tokenizer` is the built-in tasks' own tokenizer: one token per character of a fixed
alphabet, after three special tokens <pad>=0, <bos>=1, <eos>=2. Encoding prepends <bos>;
decoding joins characters with nothing between them, so text round-trips exactly. A character
outside the alphabet has no token (there is no <unk>): encoding it raises the tokenizers
library's "Missing [UNK] token" error. transformers and tokenizers are imported inside the
functions so `import hfrl` stays fast.
"""
from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
"""The char tokenizer's special tokens, with ids 0, 1, 2."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model")
"""A folder holding none of these has no tokenizer transformers can load."""


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """A transformers tokenizer from the local folder `path` (nothing is downloaded).

    If the tokenizer has no pad token, its eos token becomes the pad token."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"tokenizer folder {str(path)!r} does not exist or is not a folder: give "
                         "a local folder holding tokenizer.json or tokenizer_config.json "
                         "(data.tokenizer_path, or the actor's engine.model_path); hfrl does "
                         "not download tokenizers")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        present = sorted(p.name for p in folder.iterdir())[:20]
        raise ValueError(f"tokenizer folder {str(path)!r} holds no tokenizer files (looked for "
                         f"{', '.join(TOKENIZER_FILES)}; found {present}): save the tokenizer "
                         "there with tokenizer.save_pretrained(folder)")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        hint = ("; if the folder ships its own tokenizer code and you trust it, set "
                "data.trust_remote_code=true" if "trust_remote_code" in str(e) else "")
        raise ValueError(f"could not load a tokenizer from {str(path)!r}: {e}{hint}") from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"the tokenizer in {str(path)!r} has neither a pad nor an eos "
                             "token: add a pad_token to its tokenizer_config.json")
        tok.pad_token = tok.eos_token
    return tok


def char_tokenizer(alphabet: str):
    """A `transformers.PreTrainedTokenizerFast` with one token per character of `alphabet`.

    Ids: <pad>=0, <bos>=1, <eos>=2, then the alphabet's characters in order."""
    if not isinstance(alphabet, str) or not alphabet:
        raise ValueError(f"char_tokenizer alphabet={alphabet!r}: expected a non-empty string of "
                         "the characters the texts use")
    repeated = sorted({c for c in alphabet if alphabet.count(c) > 1})
    if repeated:
        raise ValueError(f"char_tokenizer alphabet={alphabet!r} repeats {repeated}: list each "
                         "character once")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({c: len(SPECIAL_TOKENS) + i for i, c in enumerate(alphabet)})
    core = Tokenizer(models.WordLevel(vocab, unk_token=None))
    # An empty pattern matches between every two characters: each character is its own piece.
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    core.decoder = decoders.Fuse()  # join the pieces with nothing between them
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", clean_up_tokenization_spaces=False)
