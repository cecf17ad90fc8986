"""Build and install the megakernel package.

The CUDA extension `megakernel._C` is built only where it can run: torch has CUDA and
nvcc is found. MEGAKERNEL_BUILD_CUDA=1 forces the build (fails loudly if impossible),
MEGAKERNEL_BUILD_CUDA=0 skips it; elsewhere the package installs as pure Python and runs
its torch and reference backends.
"""
import os
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
PACKAGES = ["megakernel", "megakernel.backends", "megakernel.instructions",
            "megakernel.scheduler"]
PACKAGE_DIR = {"megakernel": "megakernel", "megakernel.backends": "megakernel/backends",
               "megakernel.instructions": "instructions", "megakernel.scheduler": "scheduler"}


def cuda_extension_wanted() -> bool:
    flag = os.environ.get("MEGAKERNEL_BUILD_CUDA", "").strip()
    if flag == "0":
        return False
    if flag == "1":
        return True
    try:
        import torch
    except ImportError:
        return False
    if torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME
    return CUDA_HOME is not None or shutil.which("nvcc") is not None


def extension_kwargs() -> dict:
    if not cuda_extension_wanted():
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = ["csrc/binding.cpp"] + sorted(str(p.relative_to(ROOT))
                                            for p in (ROOT / "csrc").glob("*.cu"))
    nvcc_flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                  "-gencode=arch=compute_90a,code=sm_90a"]
    if os.environ.get("MEGAKERNEL_PROFILE", "0") == "1":
        nvcc_flags.append("-DMEGAKERNEL_PROFILE=1")
    ext = CUDAExtension(
        name="megakernel._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc_flags},
    )
    return {"ext_modules": [ext],
            "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(
    name="megakernel",
    version="0.1.0",
    description="Single-prompt Llama decoding in one persistent CUDA kernel",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    install_requires=["torch>=2.4", "safetensors>=0.4", "numpy"],
    extras_require={
        "hf": ["transformers>=4.45", "huggingface_hub>=0.24"],
        "test": ["pytest>=7", "transformers>=4.45", "huggingface_hub>=0.24", "matplotlib"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["megakernel=megakernel.cli:main"]},
    **extension_kwargs(),
)
