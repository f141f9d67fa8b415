"""A real 256-id `tokenizer.json` for the tiny test models, shaped like Gemma-4's.

Control tokens sit at their real Gemma-4 ids, so prompts built for the tiny models carry the same ids as real ones.
The rest is a SentencePiece-style character vocabulary (spaces become "▁", no pre-tokenizer) plus a few BPE merges.

    python tests/tiny_tokenizer.py OUT_DIR      # writes OUT_DIR/tokenizer.json
"""

import pathlib
import string
import sys

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

VOCAB_SIZE = 256
SPECIAL = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    "<|tool_response>": 50,
    "<|think|>": 98,
    "<|channel>": 100,
    "<channel|>": 101,
    "<|turn>": 105,
    "<turn|>": 106,
}
NEWLINE_ID = 107  # "\n" is 107 in the real vocabulary too
CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation + "▁\t"
# In priority order; each result becomes a token, so later merges may build on earlier ones.
MERGES = [
    ("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"),
    ("r", "e"), ("▁", "s"), ("▁", "w"), ("▁", "o"), ("e", "n"), ("a", "t"), ("o", "u"), ("▁", "i"),
    ("▁", "c"), ("i", "s"), ("o", "r"), ("e", "s"), ("i", "t"), ("in", "g"), ("▁", "b"), ("▁", "m"),
    ("e", "d"), ("▁", "h"), ("▁", "f"), ("▁", "p"), ("a", "r"), ("l", "e"), ("▁a", "n"), ("▁an", "d"),
    ("▁", "d"), ("▁", "T"), ("▁", "I"), ("s", "t"), ("o", "m"), ("▁o", "f"), ("▁", "y"), ("▁y", "ou"),
    ("l", "l"), ("a", "l"), ("e", "l"), ("▁", "n"), ("▁", "l"), ("▁i", "s"), ("▁w", "h"), ("▁t", "o"),
]  # fmt: skip


def vocabulary() -> dict[str, int]:
    vocab = dict(SPECIAL)
    vocab["\n"] = NEWLINE_ID
    free = (i for i in range(VOCAB_SIZE) if i not in vocab.values())
    for piece in [*CHARS, *(a + b for a, b in MERGES)]:
        vocab[piece] = next(free)
    vocab.update({f"<unused{i}>": i for i in free})  # filler keeps the id space dense
    assert sorted(vocab.values()) == list(range(VOCAB_SIZE))
    return vocab


def build_tiny_tokenizer(path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(vocab=vocabulary(), merges=MERGES, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse()])
    # Already in the vocabulary, so they keep their ids; registering them makes "<|turn>" in text one token.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    out = path / "tokenizer.json"
    tok.save(str(out))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/tiny_tokenizer.py OUT_DIR")
    print(build_tiny_tokenizer(sys.argv[1]))
