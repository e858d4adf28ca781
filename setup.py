from setuptools import find_packages, setup

setup(
    name="ted-ds",
    version="0.1.0",
    description="Task-aware layer-wise distillation (TED) of causal LMs on DeepSpeed ZeRO-3",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # the two data folders are listed as packages so that setuptools ships them as such
    packages=find_packages(include=["ted_ds", "ted_ds.*", "data_prep", "data_prep.*"])
    + ["data_prep.sample", "ted_ds.configs"],
    package_data={"data_prep.sample": ["*.gz", "*.md"], "ted_ds.configs": ["*.yaml", "*.json"]},
    include_package_data=True,
    install_requires=[
        # A range: GPU users bring their own CUDA build. CPU machines pin it with constraints-cpu.txt.
        "torch>=2.4",
        "deepspeed>=0.17",
        "transformers>=5.0",
        "datasets>=3.0",
        "sentencepiece>=0.2",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "accelerate>=1.0",
        "tensorboard>=2.16",
        "numpy>=1.26",
        "pyyaml>=6",
        "tqdm>=4.66",
        "pyarrow>=15",
        "zstandard>=0.22",
        "psutil>=5.9",
    ],
    extras_require={
        "mpi": ["mpi4py>=3.1"],
        "eval": ["lm-eval[hf]>=0.4"],
        "bench": ["matplotlib>=3.8", "scipy>=1.10"],
        "dev": ["pytest>=8", "hypothesis>=6.100", "ruff>=0.6"],
    },
    entry_points={"console_scripts": ["ted-prep=data_prep.cli:main", "ted-ds=ted_ds.cli:main"]},
)
