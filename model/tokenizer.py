r"""Tokenizer and Gemma-4 chat format for DiffusionGemma checkpoints.

`format_chat` reproduces the text-only part of the checkpoint's Jinja chat template (tools and images are left out):

    <bos><|turn>system\n<|think|>\n{system}<turn|>\n<|turn>user\n{user}<turn|>\n<|turn>model\n

With thinking off there is no `<|think|>\n` (and no system turn unless one was given), and the generation prompt
ends in an empty, already-closed thought channel, `<|turn>model\n<|channel>thought\n<channel|>`, so the first
generated token is the answer.
"""

import functools
import pathlib

from tokenizers import Tokenizer as _HFTokenizer

from ..errors import CheckpointError, DgemmaError

ROLES = {"system": "system", "user": "user", "model": "model", "assistant": "model"}
CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
CONTROL = ("<bos>", "<|turn>", "<turn|>", "<|think|>", CHANNEL_OPEN, CHANNEL_CLOSE)


def _strip_thinking(text: str) -> str:
    # The template's strip_thinking: drop every <|channel>...<channel|> block (and an unclosed one at the end).
    return "".join(part.split(CHANNEL_OPEN)[0] for part in text.split(CHANNEL_CLOSE)).strip()


def check_text(text, what: str = "text") -> str:
    """A str that is valid Unicode: a command-line argument in another encoding arrives with lone surrogates."""
    if not isinstance(text, str):
        raise DgemmaError(f"{what} must be a str, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DgemmaError(f"{what} is not valid UTF-8 text (position {e.start}): re-encode it as UTF-8") from e
    return text


def format_chat(messages, *, thinking: bool = False, add_generation_prompt: bool = True) -> str:
    if not isinstance(messages, list) or not messages:
        raise DgemmaError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else m
        if not isinstance(role, str) or role not in ROLES:
            raise DgemmaError(f"message {i}: unknown role {role!r}, expected one of {sorted(ROLES)}")
        check_text(m.get("content"), f"message {i}'s content")
    # Only a leading system message is folded into the system turn that also carries the thinking switch.
    system = messages[0]["content"].strip() if messages[0]["role"] == "system" else None
    rest = messages[1:] if system is not None else messages
    out = "<bos>"
    if thinking or system is not None:
        out += "<|turn>system\n" + ("<|think|>\n" if thinking else "") + (system or "") + "<turn|>\n"
    for m in rest:
        role = ROLES[m["role"]]
        # Earlier answers go back without their reasoning; the model never sees old thoughts.
        text = _strip_thinking(m["content"]) if role == "model" else m["content"].strip()
        out += f"<|turn>{role}\n{text}<turn|>\n"
    if add_generation_prompt:
        out += "<|turn>model\n" + ("" if thinking else f"{CHANNEL_OPEN}thought\n{CHANNEL_CLOSE}")
    return out


class Tokenizer:
    """A `tokenizers` tokenizer.json plus Gemma-4 ids and chat formatting; nothing from transformers."""

    def __init__(self, tok: _HFTokenizer):
        self._tok = tok

    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        path = pathlib.Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {file}")
        try:
            return cls(_HFTokenizer.from_file(str(file)))
        except Exception as e:  # the tokenizers library raises plain Exception for any malformed file
            raise CheckpointError(f"{file} is not a readable tokenizer.json: {e}") from e

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: the real tokenizer.json's post-processor would prepend <bos>; chat() writes it.
        return self._tok.encode(check_text(text, "the prompt"), add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise DgemmaError(f"token {token!r} is not in the tokenizer's vocabulary")
        return i

    @functools.cached_property
    def max_token_chars(self) -> int:
        """Characters in the longest token: no token covers more of a text (byte-fallback tokens cover fewer)."""
        return max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=1)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self.token_id("<bos>")

    @property
    def eos_id(self) -> int:
        return self.token_id("<eos>")

    @property
    def pad_id(self) -> int:
        return self.token_id("<pad>")

    def chat(self, messages, *, thinking: bool = False, add_generation_prompt: bool = True) -> list[int]:
        text = format_chat(messages, thinking=thinking, add_generation_prompt=add_generation_prompt)
        for t in CONTROL:  # an unregistered control token would silently encode as plain characters
            if t in text and self.encode(t) != [self.token_id(t)]:
                raise DgemmaError(f"control token {t!r} does not encode to a single id")
        return self.encode(text)
