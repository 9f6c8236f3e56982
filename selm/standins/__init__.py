"""Offline stand-ins for tests, benchmarks, the demo and CPU rehearsals; nothing on a GPU user's path.

- `paper_models`: the paper models' tokenizers rebuilt from files that ship in PyPI packages (Mistral's v1
  sentencepiece model in `mistral-common`, Llama 3's BPE ranks in `llama-models`), with tiny random models of the
  matching architecture (`make paper-tokenizers`, `REHEARSAL=1`).
- `tiny`: the offline default of the tests and the smoke recipes: a 100-row UltraFeedback-schema fixture, a locally
  trained tokenizer, a tiny Llama, and `fixture_reward`, the oracle of the fixture's checkable answers.
- `tiny_ranker`: a PairRM-architecture ranker and a reward model with random weights (the real loading and scoring
  code paths, not ranking quality).
- `sorting_task`, `demo_task`: the demo's task with an exact reward, its preference data and its small SFT base.

The library (generation, ranking, training, evaluation) never imports this subpackage: a recipe reaches a stand-in
only by naming it, e.g. `oracle_reward: selm.standins.sorting_task:reward` or a model directory the builders wrote
(scripts/build_tiny_model.py, build_demo_task.py, build_paper_models.py). A real run loads the real hub
repositories and a real ranker.
"""
