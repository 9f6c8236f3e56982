"""Offline stand-ins of the paper models' tokenizers, for tests and CPU rehearsals.

Built from files that ship in PyPI packages (Mistral's v1 sentencepiece model in `mistral-common`, Llama 3's BPE
ranks in `llama-models`), with tiny random models of the matching architecture. Nothing on a GPU user's path uses
this subpackage: a real run loads the real hub repositories.
"""
