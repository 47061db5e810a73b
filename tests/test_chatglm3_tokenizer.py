"""ChatGLM3 tokenizer: the converted fast tokenizer and the worker's prompt ids equal sentencepiece.

The stand-in sentencepiece BPE model is trained here with ChatGLM3's settings (byte fallback,
dummy prefix, identity normalization) and padded to its 64789 pieces, so the 9 special tokens
get their real ids 64789..64797.
"""

from __future__ import annotations

import random

import pytest
import sentencepiece as spm
from fastchat.conversation import get_conv_template
from transformers import AutoTokenizer

from launch import chatglm3
from launch.synth import train_stand_in_tokenizer

# As in ChatGLM3's tokenization_chatglm.py, in order after the sentencepiece vocabulary.
SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
PIECES = ["hello", " world", "  two spaces", "trailing  ", "\n", "\n\nblank lines\n", "\ttab", "你好，世界！",
          "数字 1234567890", "3.14159", "emoji 😀👩‍💻🎉", "é é", "</s>", "<s>", "<unk>", "[gMASK]", "sop",
          "▁literal", "<|extra|>", "a\r\nb", "\u3000全角空格", "x" * 50, "", " ", "Ünïcödé ĝ",
          "def f(x):\n    return x"]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_stand_in_tokenizer(tmp_path_factory.mktemp("sp") / "tokenizer.model")


@pytest.fixture(scope="module")
def sp(sp_model) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(sp_model))


@pytest.fixture(scope="module")
def tokenizer(sp_model, tmp_path_factory):
    """Saved and loaded back the way the worker loads it."""
    folder = tmp_path_factory.mktemp("tok")
    chatglm3.convert_tokenizer(sp_model).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def random_text(rng: random.Random) -> str:
    count = rng.randint(0, 12)
    pieces = (rng.choice(PIECES) if rng.random() < 0.3 else rng.choice("ab 你好12\n ") for _ in range(count))
    return "".join(pieces)


def build_chat_input(sp: spm.SentencePieceProcessor, messages: list[tuple[str, str]]) -> list[int]:
    """ChatGLM3's build_chat_input (history + query, metadata ""), segment by segment with sentencepiece."""
    special = {t: sp.vocab_size() + i for i, t in enumerate(SPECIALS)}
    ids = [special["[gMASK]"], special["sop"]]
    for role, content in messages:
        ids += [special[f"<|{role}|>"]] + sp.encode("\n") + sp.encode(content)
    return ids + [special["<|assistant|>"]]


def fastchat_prompt(messages: list[tuple[str, str]]) -> str:
    """What FastChat's API server sends the worker for these messages."""
    conv = get_conv_template("chatglm3")
    for role, content in messages:
        if role == "system":
            conv.set_system_message(content)
        else:
            conv.append_message(conv.roles[role == "assistant"], content)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def conversations(rng: random.Random, n: int) -> list[list[tuple[str, str]]]:
    out = []
    for _ in range(n):
        messages = [("system", random_text(rng) or "You are ChatGLM3.")] if rng.random() < 0.7 else []
        for turn in range(rng.randint(1, 4)):
            messages.append(("user", random_text(rng) or "hi"))
            if turn or rng.random() < 0.5:
                messages.append(("assistant", random_text(rng) or "ok"))
        if messages[-1][0] == "assistant":
            messages.append(("user", random_text(rng) or "more"))
        out.append(messages)
    return out


def test_special_tokens_take_64789_to_64797_in_the_original_order(tokenizer):
    assert tokenizer.convert_tokens_to_ids(SPECIALS) == list(range(64789, 64798))
    stops = tokenizer.convert_tokens_to_ids(["</s>", "<|user|>", "<|observation|>"])
    assert stops == list(chatglm3.STOP_TOKEN_IDS) == [2, 64795, 64797]


def test_text_ids_equal_sentencepiece(sp, tokenizer):
    rng = random.Random(0)
    texts = PIECES + [random_text(rng) for _ in range(2000)]
    mismatched = [t for t in texts if chatglm3.encode_text(tokenizer, t) != sp.encode(t)]
    assert not mismatched, mismatched[:5]


def test_decoding_equals_sentencepiece(sp, tokenizer):
    rng = random.Random(1)
    for text in PIECES + [random_text(rng) for _ in range(300)]:
        ids = sp.encode(text)
        assert tokenizer.decode(ids) == sp.decode(ids), text


def test_prompt_ids_equal_build_chat_input(sp, tokenizer):
    for messages in conversations(random.Random(2), 300):
        prompt = fastchat_prompt(messages)
        assert chatglm3.encode_prompt(tokenizer, prompt) == build_chat_input(sp, messages), prompt


def test_hand_picked_conversations(sp, tokenizer):
    cases = [
        [("system", "You are a helpful assistant."), ("user", "你好"), ("assistant", "你好！有什么可以帮你？"),
         ("user", " 解释一下  递归\n\n谢谢")],
        [("user", "</s> is not eos here, nor is [gMASK]")],
        [("system", "tools\n{\n    \"name\": \"f\"\n}"), ("user", "\nstarts with a newline"),
         ("assistant", "ends with one\n"), ("user", "  indented")],
    ]
    for messages in cases:
        assert chatglm3.encode_prompt(tokenizer, fastchat_prompt(messages)) == build_chat_input(sp, messages)


def test_empty_message_keeps_its_newline_segment(sp, tokenizer):
    # FastChat drops the "\n" of an empty message; the original still encodes the role line.
    messages = [("user", "hi"), ("assistant", ""), ("user", "again")]
    assert "<|assistant|><|user|>" in fastchat_prompt(messages)
    assert chatglm3.encode_prompt(tokenizer, fastchat_prompt(messages)) == build_chat_input(sp, messages)


def test_whole_string_encoding_would_be_caught(sp, tokenizer):
    """Negative control: tokenizing the prompt in one piece (each segment not getting its own
    dummy prefix) gives other ids, so the equality above is a real check."""
    messages = [("system", "Be brief."), ("user", "hello")]
    naive = tokenizer(fastchat_prompt(messages), add_special_tokens=False)["input_ids"]
    assert [64790, 64792] + naive != build_chat_input(sp, messages)


def test_removing_extra_whitespace_is_honoured(tmp_path):
    """The other sentencepiece whitespace mode (squeeze and trim spaces) converts exactly too."""
    path = train_stand_in_tokenizer(tmp_path / "squeeze.model", vocab_size=1600, pad_to=0,
                                    remove_extra_whitespaces=True)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    tokenizer = chatglm3.convert_tokenizer(path)
    rng = random.Random(3)
    for text in PIECES + [random_text(rng) for _ in range(500)]:
        assert chatglm3.encode_text(tokenizer, text) == sp.encode(text), repr(text)


def test_reply_text_drops_the_empty_metadata_line_like_process_response():
    assert chatglm3.response_text("\n 你好，我是 ChatGLM3。") == "你好，我是 ChatGLM3。"
    assert chatglm3.response_text("\n Hello\n\nworld ") == "Hello\n\nworld"
    assert chatglm3.response_text(" partial") == "partial"  # streaming, before the newline arrived
    tool_call = "get_weather\n ```python\ntool_call(city='Beijing')\n```"
    assert chatglm3.response_text(tool_call) == tool_call
