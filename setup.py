"""Builds mltrain and its C++ extension (mltrain._C).

Needs torch at build time, so install without build isolation:
    pip install --no-build-isolation -e .
(tools/bootstrap.sh does this). MLTRAIN_NO_EXT=1 skips the extension; mltrain then runs
its pure-torch reference kernels.
"""
import os

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
if os.environ.get("MLTRAIN_NO_EXT") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules = [
        CppExtension(
            "mltrain._C",
            sources=["csrc/module.cpp", "csrc/pack.cpp", "csrc/transfer.cpp",
                     "csrc/reduce.cpp", "csrc/residual.cpp"],
            # No FMA contraction: the kernels must round like their torch references.
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off"],
            extra_link_args=["-fopenmp"],
        )
    ]
    cmdclass = {"build_ext": BuildExtension}

setup(
    name="mltrain",
    version="0.1.0",
    description="MPI-native training of PyTorch models at supercomputer scale",
    packages=find_packages(include=["mltrain", "mltrain.*"]),
    python_requires=">=3.11",
    install_requires=["mpi4py>=4.1", "numpy", "torch", "h5py", "tqdm"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["mltrain=mltrain.cli:main"]},
)
