"""Tokenizer: SmolLM2's GGUF vocabulary, chat templates, HF folders and the byte-level fallback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import jinja2
import pytest
from tokenizers import processors

from loraplane.engine.models.loader import smollm2_gguf_path
from loraplane.engine.tokenizer import CHATML_TEMPLATE, Tokenizer, _gguf_pre_tokenizer

slow = pytest.mark.skipif(not os.environ.get("LORAPLANE_SLOW_TESTS"),
                          reason="set LORAPLANE_SLOW_TESTS=1 (loads transformers' GGUF tokenizer)")

# Ids from transformers 5.24's own GGUF tokenizer (AutoTokenizer.from_pretrained(dir,
# gguf_file=...)); test_matches_transformers re-checks them when slow tests are on.
REFERENCE_IDS: dict[str, list[int]] = {
    "Hello world": [19556, 905],
    "The capital of France is": [504, 3575, 282, 4649, 314],
    "12345": [33, 34, 35, 36, 37],
    "I have 3 apples and 42 pears.": [57, 457, 216, 35, 13855, 284, 216, 36, 34, 41684, 30],
    "def f(x):\n    return x**2  # square\n":
        [1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34, 216, 907, 5222, 198],
    "héllo wörld 🎉 日本語 Привет":
        [88, 2756, 31394, 267, 29989, 400, 15107, 232, 227, 17097, 241, 115, 40993, 179, 120,
         248, 5470, 249, 46879, 16464, 32547],
    "<|im_start|>user\nhi<|im_end|>\n": [1, 4093, 198, 6004, 2, 198],
    "  leading spaces and trailing   ": [216, 2899, 5600, 284, 35079, 333],
    "tabs\tand\r\nnewlines\n\n": [100, 7366, 197, 397, 201, 198, 2241, 5110, 1116],
}

# Where transformers' GGUF conversion differs: it drops the "smollm" pre-tokenizer's digit
# split, so "  1" becomes [Ġ, Ġ, 1]; llama.cpp and SmolLM2's tokenizer.json give [ĠĠ, 1].
DIGIT_CASES: dict[str, list[int]] = {
    "x =  1": [104, 446, 256, 33],
    "a  22 b": [81, 256, 34, 34, 278],
}

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf_path())


@pytest.mark.parametrize("text", list(REFERENCE_IDS))
def test_encode_matches_reference_ids(smol: Tokenizer, text: str) -> None:
    ids = smol.encode(text)
    assert ids == REFERENCE_IDS[text]
    assert smol.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("text", list(DIGIT_CASES))
def test_digits_are_split_before_byte_level_regex(smol: Tokenizer, text: str) -> None:
    assert smol.encode(text) == DIGIT_CASES[text]
    assert smol.decode(DIGIT_CASES[text]) == text


def test_special_tokens(smol: Tokenizer) -> None:
    assert smol.eos_token_ids == (2,)
    assert smol.bos_token_id == 1
    assert smol.vocab_size == 49152
    assert smol.all_special_ids == tuple(range(17))
    assert smol.encode("<|im_start|>") == [1]
    # SmolLM2's GGUF says add_bos_token = false.
    assert smol.encode("hi")[0] != 1
    assert smol.decode([1, 4093, 198, 6004, 2]) == "user\nhi"


def test_smollm2_chat_template(smol: Tokenizer) -> None:
    text = smol.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert text == (f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}]
    text = smol.apply_chat_template(messages, add_generation_prompt=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello!<|im_end|>\n")
    assert smol.encode(text).count(1) == 3


def test_chatml_fallback_and_sandbox() -> None:
    tok = Tokenizer.byte_level(512)
    assert tok.chat_template == CHATML_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    tok = Tokenizer(tok.backend, chat_template="{{ raise_exception('no system role') }}")
    with pytest.raises(jinja2.TemplateError, match="no system role"):
        tok.apply_chat_template([])
    # The sandbox is immutable: templates cannot modify the caller's messages.
    tok = Tokenizer(tok.backend, chat_template="{{ messages.append(1) }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template([])


def test_template_variables() -> None:
    template = "{{ bos_token }}{% for m in messages %}{{ m | tojson }}{% endfor %}{{ eos_token }}"
    tok = Tokenizer(Tokenizer.byte_level(512).backend, chat_template=template,
                    bos_token="<s>", eos_token="</s>")
    assert tok.apply_chat_template([{"role": "user", "content": "é<"}]) == (
        '<s>{"role": "user", "content": "é<"}</s>')


def test_byte_level_tokenizer() -> None:
    tok = Tokenizer.byte_level(300)
    text = "héllo 🎉\n"
    ids = tok.encode(text)
    assert ids == [3 + b for b in text.encode()]
    assert max(ids) < 300 and tok.vocab_size == 259
    assert tok.decode(ids) == text
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    assert tok.all_special_ids == (0, 1, 2)
    # A random model samples ids the tokenizer lacks; decoding drops them.
    assert tok.decode([3 + ord("a"), 290, 2, 3 + ord("b")]) == "ab"
    assert max(tok.encode(bytes(range(256)).decode("latin-1"))) < 300
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.byte_level(258)


def test_hf_folder_round_trip(smol: Tokenizer, tmp_path: Path) -> None:
    smol.save_hf(tmp_path)
    tok = Tokenizer.from_hf_folder(tmp_path)
    for text, ids in (REFERENCE_IDS | DIGIT_CASES).items():
        assert tok.encode(text) == ids
    assert tok.chat_template == smol.chat_template
    assert (tok.bos_token_id, tok.eos_token_ids) == (1, (2,))
    assert not tok.add_bos_token


def test_hf_folder_extras(tmp_path: Path) -> None:
    backend = Tokenizer.byte_level(512).backend
    # Llama 3 style: no add_bos_token flag; the post-processor adds BOS.
    backend.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", 1)])
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": {"content": "<s>"}, "eos_token": "</s>",
              "chat_template": [{"name": "default", "template": "default"},
                                {"name": "tool_use", "template": "tools"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_hf_folder(tmp_path)
    assert tok.add_bos_token
    assert tok.encode("a") == [1, 3 + ord("a")]
    assert tok.encode("<s>a") == [1, 3 + ord("a")]  # no second BOS
    assert tok.eos_token_ids == (2, 0)
    assert tok.chat_template == "default"
    (tmp_path / "chat_template.jinja").write_text("from file")
    assert Tokenizer.from_hf_folder(tmp_path).chat_template == "from file"
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)


def test_unsupported_gguf_tokenizer(tmp_path: Path) -> None:
    path = tmp_path / "spm.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'llama'"):
        Tokenizer.from_gguf(path)


def test_gguf_pre_tokenizers() -> None:
    def split(pre: str, text: str) -> list[str]:
        return [piece for piece, _ in _gguf_pre_tokenizer(pre).pre_tokenize_str(text)]

    assert split("smollm", "a  22 b") == ["a", "ĠĠ", "2", "2", "Ġb"]
    assert split("gpt-2", "a  22 b") == ["a", "Ġ", "Ġ22", "Ġb"]
    # Llama 3: digits in groups of three, newlines kept apart from the next word.
    assert split("llama-bpe", "Hi 12345 don't\n\n  x") == [
        "Hi", "Ġ", "123", "45", "Ġdon", "'t", "ĊĊ", "Ġ", "Ġx"]
    with pytest.raises(ValueError, match="unsupported GGUF pre-tokenizer 'qwen2'"):
        _gguf_pre_tokenizer("qwen2")


@slow
def test_matches_transformers(smol: Tokenizer) -> None:
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    reference = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in REFERENCE_IDS:
        ids = reference.encode(text)
        assert smol.encode(text) == ids
        assert smol.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    for text in DIGIT_CASES:
        assert reference.encode(text) != DIGIT_CASES[text]
    messages = [{"role": "user", "content": "hi"}]
    assert smol.apply_chat_template(messages) == reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
