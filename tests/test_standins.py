"""The offline stand-ins of the paper models' tokenizers (selm/standins) against their reference tokenizers:
sentencepiece for Zephyr (Mistral v1), tiktoken for Llama 3, and the facts of the hub files (docs/tokenizers.md)."""

import json

import pytest

TEXTS = ["Hello world", "What is 12 + 7?", "héllo naïve café, 你好, Grüße 🙂", "Line one.\nLine two:\tTabbed",
         "Don't stop: 1234567 apples!"]


@pytest.fixture(scope="module")
def zephyr(paper_standin):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(paper_standin("zephyr"))


@pytest.fixture(scope="module")
def tiktoken_llama3():
    """Llama 3's reference tokenizer: tiktoken over llama-models' ranks, with the 256 special tokens."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from selm.standins.paper_models import LLAMA3_PATTERN, llama3_ranks, llama3_special_tokens

    ranks = load_tiktoken_bpe(str(llama3_ranks()))
    specials = {name: len(ranks) + i for i, name in enumerate(llama3_special_tokens())}
    return tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def test_zephyr_matches_mistral_sentencepiece(zephyr, paper_standin):
    import sentencepiece

    from selm.standins.paper_models import mistral_v1_model

    sp = sentencepiece.SentencePieceProcessor(model_file=str(mistral_v1_model()))
    assert len(zephyr) == sp.get_piece_size() == 32000
    for text in TEXTS:  # the tokenizer adds <s> by default (add_bos_token), never </s>
        assert zephyr(text)["input_ids"] == [sp.bos_id()] + sp.encode(text)
        assert zephyr.decode(sp.encode(text)) == text
    assert (zephyr.bos_token, zephyr.eos_token, zephyr.pad_token, zephyr.unk_token) == ("<s>", "</s>", "</s>", "<unk>")
    assert [zephyr.bos_token_id, zephyr.eos_token_id, zephyr.unk_token_id] == [sp.bos_id(), sp.eos_id(), sp.unk_id()]
    # the special token between texts is one id, as the template writes it (sentencepiece would spell it out)
    assert zephyr("a</s>b", add_special_tokens=False)["input_ids"] == sp.encode("a") + [sp.eos_id()] + sp.encode("b")
    config = json.loads((paper_standin("zephyr") / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["legacy"] is True
    assert config["tokenizer_class"] == "LlamaTokenizer"


def test_zephyr_template_and_model_files(zephyr, paper_standin):
    from transformers import AutoConfig, GenerationConfig

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}]
    # the handbook's template: no BOS, eos + newline after every turn, "<|assistant|>\n" as the generation prompt
    assert zephyr.apply_chat_template(messages, tokenize=False) == (
        "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n")
    assert zephyr.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True).endswith(
        "<|user|>\nHi</s>\n<|assistant|>\n")
    config = AutoConfig.from_pretrained(paper_standin("zephyr"))
    assert config.model_type == "mistral" and config.vocab_size == 32000 and config.sliding_window
    assert config.head_dim == 64 and (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert GenerationConfig.from_pretrained(paper_standin("zephyr")).eos_token_id == 2


def test_llama3_matches_tiktoken(paper_standin, tiktoken_llama3):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paper_standin("llama3"))
    assert len(tok) == tiktoken_llama3.n_vocab == 128256
    header = "<|start_header_id|>user<|end_header_id|>\n\nhi there<|eot_id|>"
    for text in TEXTS + [header]:  # <|begin_of_text|> is added by default
        assert tok(text)["input_ids"] == [128000] + tiktoken_llama3.encode(text, allowed_special="all")
        assert tok.decode(tiktoken_llama3.encode(text, allowed_special="all")) == text
    names = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
             "<|end_header_id|>": 128007, "<|eot_id|>": 128009, "<|reserved_special_token_0|>": 128002,
             "<|reserved_special_token_250|>": 128255}
    for name, token_id in names.items():
        assert tok.convert_tokens_to_ids(name) == tiktoken_llama3.encode_single_token(name) == token_id
    assert tok.bos_token == "<|begin_of_text|>" and tok.pad_token is None


@pytest.mark.parametrize("name, eos, generation_eos", [("llama3", "<|eot_id|>", [128001, 128009]),
                                                       ("llama3-first-release", "<|end_of_text|>", 128001)])
def test_llama3_flavours_template_and_model_files(paper_standin, name, eos, generation_eos):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(paper_standin(name))
    assert tok.eos_token == eos
    assert GenerationConfig.from_pretrained(paper_standin(name)).eos_token_id == generation_eos
    messages = [{"role": "user", "content": "  Hi  "}, {"role": "assistant", "content": "Hello!"}]
    assert tok.apply_chat_template(messages, tokenize=False) == (  # bos first, contents trimmed, <|eot_id|> each turn
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>")
    config = AutoConfig.from_pretrained(paper_standin(name))
    assert config.model_type == "llama" and config.vocab_size == 128256 and config.head_dim == 64
    assert config.bos_token_id == 128000


@pytest.mark.slow  # over 10 s here: make test-fast leaves it out
def test_build_script_writes_the_named_standins(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    subprocess.run([sys.executable, str(REPO / "scripts/build_paper_models.py"), str(tmp_path), "--only", "zephyr"],
                   check=True, capture_output=True, cwd=REPO)
    assert (tmp_path / "zephyr" / "tokenizer.model").is_file() and (tmp_path / "zephyr" / "config.json").is_file()
    assert not (tmp_path / "llama3").exists()
    bad = subprocess.run([sys.executable, str(REPO / "scripts/build_paper_models.py"), str(tmp_path), "--only", "gpt"],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode != 0 and "gpt" in bad.stderr.strip().splitlines()[-1]
