"""Builds msld_sdk with its native extension through CMake (pybind11's cmake_example pattern)."""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: str = "") -> None:
        super().__init__(name, sources=[])
        self.sourcedir = os.fspath(Path(sourcedir).resolve())


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        ext_fullpath = Path.cwd() / self.get_ext_fullpath(ext.name)
        extdir = ext_fullpath.parent.resolve()
        cfg = "Debug" if self.debug else "Release"
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
        ]
        if "MSLD_CMAKE_ARGS" in os.environ:
            cmake_args += os.environ["MSLD_CMAKE_ARGS"].split()
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cmake", ext.sourcedir, *cmake_args], cwd=build_temp, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_temp, check=True)


setup(
    name="msld_sdk",
    version="0.1.0",
    description="Inference SDK for MedSegLatDiff: k plausible segmentation masks, their mean and confidence",
    # export/msld_export (torch side: model, training, plan writing, reference import, GPU samplers)
    # is only usable with the [export] extra; the runtime (msld_sdk) never imports it.
    packages=find_packages(include=["msld_sdk", "msld_sdk.*"])
    + find_packages("export", include=["msld_export", "msld_export.*"]),
    package_dir={"msld_export": "export/msld_export"},
    package_data={"msld_sdk": ["models/*.plan", "samples/*", "samples/**/*"],
                  # configs: `--config`; checkpoints: the shipped plans' weights (msld bench --baselines)
                  "msld_export": ["configs/*.json", "checkpoints/*.safetensors", "*.md"]},
    ext_modules=[CMakeExtension("msld_sdk._native")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.9",
    # onnx: msld bench counts the graphs' FLOPs and builds its GEMM probe with it
    install_requires=["numpy", "onnxruntime", "onnx", "pillow", "tqdm"],
    extras_require={
        # everything the torch-side commands need (msld export / import, bench --baselines);
        # torch pinned: an unpinned torch pulls a multi-GB CUDA build
        "export": ["torch==2.13.0", "onnx", "onnxscript", "safetensors", "diffusers", "pyyaml"],
        "tensorrt": ["tensorrt-rtx-cu13", "cuda-python", "onnx"],
        "dicom": ["pydicom", "highdicom", "dicomweb-client", "pynetdicom"],
        "volume": ["nibabel"],
        "ray": ["ray[data]"],
        "fuzz": ["atheris", "hypothesis"],
        # scipy: HM-IoU's Hungarian matching (data with several annotators) in msld eval / tune;
        # matplotlib: msld tune's plot (without it the table and JSON are still written)
        "eval": ["scipy", "matplotlib"],
        "test": ["pytest", "pytest-benchmark", "scipy", "torchmetrics", "matplotlib", "hypothesis", "pydicom",
                 "highdicom", "dicomweb-client", "pynetdicom", "nibabel", "ray[data]",
                 "torch==2.13.0", "onnx", "onnxscript", "safetensors", "diffusers", "pyyaml", "tensorrt-rtx-cu13"],
    },
    entry_points={"console_scripts": ["msld=msld_sdk.cli:main"]},
    zip_safe=False,
)
