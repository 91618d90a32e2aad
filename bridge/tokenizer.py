"""A byte-level tokenizer that needs no download (256 byte tokens + one special token), and
the round trip of tokenizer files between server and client."""
from __future__ import annotations

import os
import tempfile

SPECIAL = "<|endoftext|>"


def byte_level_tokenizer(bos_id: int = 256):
    """Every byte is one token; ``bos_id`` is the id of ``<|endoftext|>`` (BOS/EOS/PAD)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[SPECIAL] = bos_id
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([SPECIAL])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL,
                                   pad_token=SPECIAL, unk_token=SPECIAL)
    # TL reloads tokenizers by name_or_path, so give it a real folder to reload from.
    folder = tempfile.mkdtemp(prefix="hookwire-tokenizer-")
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def tokenizer_files(tokenizer) -> dict[str, str]:
    """The tokenizer's JSON files, to ship to clients (text only; nothing executable); none
    for a model served without a tokenizer."""
    if tokenizer is None:
        return {}
    folder = tempfile.mkdtemp(prefix="hookwire-tokenizer-out-")
    tokenizer.save_pretrained(folder)
    files = {}
    for fname in sorted(os.listdir(folder)):
        if fname.endswith((".json", ".txt", ".model")) and fname != "chat_template.jinja":
            with open(os.path.join(folder, fname), encoding="utf-8", errors="strict") as fh:
                files[fname] = fh.read()
    return files


ALLOWED_TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                           "vocab.json", "merges.txt", "added_tokens.json"}


def tokenizer_from_files(files: dict[str, str]):
    """Rebuild a tokenizer from files a server sent. Only known JSON/text file names are
    written, and remote code is never trusted."""
    from transformers import AutoTokenizer

    folder = tempfile.mkdtemp(prefix="hookwire-tokenizer-in-")
    files = _loadable_here(files)
    for fname, text in files.items():
        if fname not in ALLOWED_TOKENIZER_FILES:
            continue
        with open(os.path.join(folder, fname), "w", encoding="utf-8") as fh:
            fh.write(text)
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def _loadable_here(files: dict[str, str]) -> dict[str, str]:
    """A server on transformers 5 names its generic fast tokenizer ``TokenizersBackend``, a
    class transformers 4.x (a legacy TL 2.x client) lacks; there the same ``tokenizer.json``
    loads as ``PreTrainedTokenizerFast``."""
    import json

    import transformers

    text = files.get("tokenizer_config.json")
    if text is None or "tokenizer.json" not in files:
        return files
    config = json.loads(text)
    cls = config.get("tokenizer_class")
    if not isinstance(cls, str) or hasattr(transformers, cls):
        return files
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    return {**files, "tokenizer_config.json": json.dumps(config)}
