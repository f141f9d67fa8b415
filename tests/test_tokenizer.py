import pytest

from dgemma.errors import DgemmaError
from dgemma.model.tokenizer import Tokenizer, format_chat

from tiny_tokenizer import SPECIAL, VOCAB_SIZE, build_tiny_tokenizer

EMPTY_THOUGHT = "<|turn>model\n<|channel>thought\n<channel|>"


@pytest.fixture
def tok(tmp_path):
    build_tiny_tokenizer(tmp_path)
    return Tokenizer.from_pretrained(tmp_path)


def test_loads_from_folder_or_file(tmp_path):
    file = build_tiny_tokenizer(tmp_path)
    assert file == tmp_path / "tokenizer.json"
    assert Tokenizer.from_pretrained(file).vocab_size == VOCAB_SIZE
    assert Tokenizer.from_pretrained(tmp_path).vocab_size == VOCAB_SIZE


def test_special_tokens_are_single_ids_at_gemma4_positions(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    for token, i in SPECIAL.items():
        assert tok.token_id(token) == i
        assert tok.encode(token) == [i]
    assert tok.encode("\n") == [107]
    assert tok.encode("<|turn>user\nhi<turn|>")[0] == 105
    assert tok.encode("<|turn>user\nhi<turn|>")[-1] == 106


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "The quick brown fox jumps over the lazy dog.",
        "  two  spaces\nand\ttabs ",
        "x=[1, 2]; y={'a': 3}",
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < VOCAB_SIZE for i in ids)
    assert tok.encode(text)[0] != tok.bos_id  # no BOS added behind our back
    assert tok.decode(ids) == text


def test_decode_skips_or_keeps_special_tokens(tok):
    ids = [tok.bos_id, *tok.encode("hi"), tok.token_id("<turn|>")]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>hi<turn|>"


def test_format_user_only_thinking_off():
    text = format_chat([{"role": "user", "content": "What is 2+2?"}])
    assert text == "<bos><|turn>user\nWhat is 2+2?<turn|>\n" + EMPTY_THOUGHT


def test_format_system_and_user_thinking_on():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]
    text = format_chat(messages, thinking=True)
    assert text == (
        "<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\nWhy is the sky blue?<turn|>\n<|turn>model\n"
    )


def test_format_thinking_on_creates_system_turn():
    text = format_chat([{"role": "user", "content": "Hi"}], thinking=True)
    assert text == "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"


def test_format_multi_turn_strips_old_thoughts_and_trims():
    messages = [
        {"role": "system", "content": " Be brief. "},
        {"role": "user", "content": "2+2?\n"},
        {"role": "assistant", "content": "<|channel>thought\nadd them<channel|>4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    text = format_chat(messages)
    assert text == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\n2+2?<turn|>\n<|turn>model\n4<turn|>\n"
        "<|turn>user\nAnd 3+3?<turn|>\n" + EMPTY_THOUGHT
    )
    assert "add them" not in text


def test_format_without_generation_prompt():
    messages = [{"role": "user", "content": "Hi"}, {"role": "model", "content": "Hello"}]
    text = format_chat(messages, add_generation_prompt=False)
    assert text == "<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello<turn|>\n"


def test_chat_ids(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = tok.chat(messages)
    assert ids == tok.encode(format_chat(messages))
    assert ids[:2] == [tok.bos_id, 105]
    assert ids.count(105) == 3 and ids.count(106) == 2  # system, user, model opened; two closed
    assert ids[-1] == 101 and 100 in ids  # empty thought channel closes the prompt
    assert tok.decode(ids, skip_special_tokens=False) == format_chat(messages)

    thinking = tok.chat(messages, thinking=True)
    assert thinking[:3] == [tok.bos_id, 105, tok.encode("system")[0]]
    assert SPECIAL["<|think|>"] in thinking
    assert 100 not in thinking and 101 not in thinking
    tail = [105, *tok.encode("model\n")]
    assert thinking[-len(tail) :] == tail


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_pretrained(tmp_path / "nope.json")


def test_unknown_token(tok):
    with pytest.raises(ValueError, match="<no_such_token>"):
        tok.token_id("<no_such_token>")


@pytest.mark.parametrize(
    "messages, error",
    [
        ([], ValueError),
        ([{"role": "tool", "content": "x"}], ValueError),
        ([{"role": "user", "content": ["x"]}], DgemmaError),  # the project's own ValueError
    ],
)
def test_bad_messages(tok, messages, error):
    with pytest.raises(error):
        format_chat(messages)
    with pytest.raises(error):
        tok.chat(messages)
