"""sanajax: SANA / SANA-Sprint in JAX + Flax.

One package, `sanajax` (its kernels are `sanajax.kernels`); tests/, benchmarks/ and experiments are not shipped.
"""
from setuptools import find_packages, setup

setup(
    name="sanajax",
    version="0.1.0",
    description="SANA (linear DiT + deep-compression AE) and SANA-Sprint in JAX/Flax",
    python_requires=">=3.11",
    packages=find_packages(include=("sanajax", "sanajax.*")),
    install_requires=[
        "jax>=0.10,<0.12",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",  # optax.contrib.muon with consistent_rms (train.optimizer=muon)
        "orbax-checkpoint>=0.11",
        "ml_collections>=1.0",
        "absl-py>=2.0",
        "grain>=0.2.12",
        "array_record>=0.8.1",  # arrayrecord: sources and python -m sanajax.data.build (grain needs it too)
        "numpy>=1.26",
        "pillow>=10",
        "tensorboardX>=2.6",
        "tqdm>=4.60",
        "matplotlib>=3.8",  # WORKDIR/loss.png
    ],
    extras_require={
        # PyTorch references for parity tests: the CPU wheel (torch==2.13.0) lies on disk.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3",
            "torch==2.13.0",
            "diffusers>=0.35",
            "transformers>=4.50",
            "safetensors>=0.4",
            "came-pytorch==0.1.3",  # the authors' CAME, to test sanajax.training.optim.came against.
            "qwix>=0.1.8,<0.2",  # as the "quantize" extra: tests/test_quantize.py
            # The 'data' extra (tests/test_data_sources.py): ~12 s to install, measured (docs/data.md#install).
            "tensorflow-datasets>=4.9.9",
            "webdataset>=1.0",
            "peft>=0.17",  # PEFT LoRA, to test sanajax.models.lora against (tests/test_lora.py).
            "gradio>=6.0,<7",  # as the "serve" extra: tests/test_serve.py
            "playwright>=1.40",  # drives the system's Chromium in tests/test_serve.py (.ci/run installs it)
        ],
        # tfds: sources (TFDS's TensorFlow-free data_source: TensorFlow itself is not needed) and the
        # webdataset package's tools (sanajax reads the tar shards itself; docs/data.md).
        "data": ["tensorflow-datasets>=4.9.9", "webdataset>=1.0"],
        # --quantize=int8|int8_dynamic|fp8 (sanajax.models.quantize): qwix's post-training quantization;
        # 0.1.8 is the release tested with jax 0.10.2 / flax 0.12.8 (docs/quantization.md).
        "quantize": ["qwix>=0.1.8,<0.2"],
        # python -m sanajax.serve (docs/serve.md): written for Gradio 6's API (theme and css at launch, buttons=).
        "serve": ["gradio>=6.0,<7"],
        # Released models' tokenizers (Gemma-2, SD3's CLIP and T5) in a converted workdir: transformers loads them
        # (sanajax.models.gemma2_transformers.load_tokenizer); the models themselves are sanajax's own.
        "weights": ["transformers>=4.50"],
        "gpu": ["jax[cuda12]>=0.10,<0.12", "jax-triton"],
        "tpu": ["jax[tpu]>=0.10,<0.12"],
    },
)
