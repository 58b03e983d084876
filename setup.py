# SPDX-License-Identifier: Apache-2.0
"""Build script: the pure-Python package always installs; the CUDA extension
``teacache_fast._C`` (csrc/, torch-free) is added when nvcc is found.

Environment knobs:
  TEACACHE_FAST_BUILD_CUDA   auto (default): build _C when nvcc is found; on a
                             failure or without nvcc install pure Python with a
                             warning. 1: a missing nvcc or failed build is an
                             error. 0: skip the CUDA build (installs in seconds).
  TEACACHE_FAST_CUDA_ARCHS   ";"-separated SM versions, default "80;90;100;120";
                             an entry may end in "+PTX" (e.g. "120+PTX") to embed
                             PTX for newer GPUs too.
  MAX_JOBS                   parallel nvcc jobs (ninja -j); default: CPU count.
  CUDA_HOME / CUDA_PATH      where to look for bin/nvcc before PATH.
  TEACACHE_FAST_WERROR       1: warnings are errors (CI).

The extension is compiled by nvcc through ninja, not torch.utils.cpp_extension,
so neither the build nor the module needs torch.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def _cuda_sources() -> tuple:
    """The CUDA translation units, from csrc/sources.mk (the Makefiles read it too)."""
    text = (CSRC / "sources.mk").read_text()
    m = re.search(r"^CU\s*:=\s*(.+)$", text, re.M)
    return tuple(f"{name}.cu" for name in m.group(1).split())


CUDA_SOURCES = _cuda_sources()
BINDING_SOURCES = ("bindings.cpp",)
DEFAULT_ARCHS = "80;90;100;120"


def _mode() -> str:
    mode = os.environ.get("TEACACHE_FAST_BUILD_CUDA", "auto").strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"TEACACHE_FAST_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def _warn(message: str) -> None:
    print(f"WARNING (teacache_fast): {message}", file=sys.stderr, flush=True)


def _find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def _find_ninja() -> str | None:
    found = shutil.which("ninja")
    if found:
        return found
    try:  # the `ninja` wheel named in [build-system] requires
        import ninja
        return str(Path(ninja.BIN_DIR) / "ninja")
    except (ImportError, AttributeError):
        return None


def _gencode_flags(archs: str) -> tuple[list[str], list[str]]:
    """nvcc -gencode flags and the arch names baked into the module."""
    flags, names = [], []
    for entry in re.split(r"[;, ]+", archs.strip()):
        if not entry:
            continue
        m = re.fullmatch(r"(?:sm_|compute_)?(\d+[af]?)(\+PTX)?", entry, flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"TEACACHE_FAST_CUDA_ARCHS entry {entry!r} is not an SM version "
                             "like 80, 90a or 120+PTX")
        sm = m.group(1).lower()
        flags += ["-gencode", f"arch=compute_{sm},code=sm_{sm}"]
        names.append(f"sm_{sm}")
        if m.group(2):
            flags += ["-gencode", f"arch=compute_{sm},code=compute_{sm}"]
            names.append(f"compute_{sm}")
    if not flags:
        raise ValueError("TEACACHE_FAST_CUDA_ARCHS is empty")
    return flags, names


def _version() -> str:
    text = (ROOT / "teacache_fast" / "_version.py").read_text()
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", text)
    return m.group(1) if m else "0.0.0"


def _ninja_escape(path: Path | str) -> str:
    return str(path).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


class CudaExtension(Extension):
    """An extension whose sources nvcc compiles through a generated build.ninja."""


class BuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure
            if _mode() == "1" or not any(isinstance(e, CudaExtension) for e in self.extensions):
                raise
            _warn(f"building the CUDA extension teacache_fast._C failed ({exc}); installing the "
                  "pure-Python package (torch/triton backends only). Set "
                  "TEACACHE_FAST_BUILD_CUDA=1 to make this an error.")
            self.extensions = [e for e in self.extensions if not isinstance(e, CudaExtension)]

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CudaExtension):
            super().build_extension(ext)
            return
        nvcc, ninja = _find_nvcc(), _find_ninja()
        if nvcc is None:
            raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
        if ninja is None:
            raise RuntimeError("ninja not found (pip install ninja)")
        build_dir = Path(self.build_temp).resolve() / "teacache_fast_C"
        build_dir.mkdir(parents=True, exist_ok=True)
        built = build_dir / "_C.so"
        self._write_ninja(build_dir, nvcc, built)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run([ninja, "-C", str(build_dir), "-j", jobs], check=True)
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, target)

    @staticmethod
    def _write_ninja(build_dir: Path, nvcc: str, output: Path) -> None:
        import pybind11

        gencode, arch_names = _gencode_flags(os.environ.get("TEACACHE_FAST_CUDA_ARCHS", DEFAULT_ARCHS))
        werror = os.environ.get("TEACACHE_FAST_WERROR") == "1"
        warn = ["-Xcompiler", "-Wall,-Wextra"] + (["-Werror", "all-warnings", "-Xcompiler", "-Werror"]
                                                 if werror else [])
        common = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC", f"-I{CSRC}"] + warn
        cu_flags = common + gencode
        py_includes = {sysconfig.get_paths()["include"], sysconfig.get_paths()["platinclude"],
                       pybind11.get_include()}
        cxx_flags = common + ["-Xcompiler", "-fvisibility=hidden"] + \
            [a for p in sorted(py_includes) for a in ("-isystem", p)] + \
            [f"-DTCF_VERSION={_version()}", f"-DTCF_CUDA_ARCHS={':'.join(arch_names)}"]  # stringified in C++ (nvcc splits -D at commas)
        q = shlex.join
        lines = [
            "ninja_required_version = 1.3",
            f"nvcc = {q([nvcc])}",
            f"cu_flags = {q(cu_flags)}",
            f"cxx_flags = {q(cxx_flags)}",
            "rule cu",
            "  command = $nvcc $cu_flags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = nvcc $in",
            "rule cxx",
            "  command = $nvcc $cxx_flags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = nvcc (host) $in",
            "rule link",
            f"  command = $nvcc -shared {q(gencode)} $in -o $out",
            "  description = link $out",
        ]
        objects = []
        for rule, names in (("cu", CUDA_SOURCES), ("cxx", BINDING_SOURCES)):
            for name in names:
                obj = build_dir / (name + ".o")
                objects.append(_ninja_escape(obj))
                lines.append(f"build {_ninja_escape(obj)}: {rule} {_ninja_escape(CSRC / name)}")
        lines.append(f"build {_ninja_escape(output)}: link {' '.join(objects)}")
        lines.append(f"default {_ninja_escape(output)}")
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")


def _ext_modules() -> list[Extension]:
    mode = _mode()
    if mode == "0":
        return []
    if _find_nvcc() is None:
        if mode == "1":
            raise SystemExit("TEACACHE_FAST_BUILD_CUDA=1 but nvcc was not found "
                             "(set CUDA_HOME or put nvcc on PATH)")
        _warn("nvcc not found: installing without the CUDA extension teacache_fast._C "
              "(torch/triton backends only); set TEACACHE_FAST_BUILD_CUDA=0 to silence this")
        return []
    return [CudaExtension("teacache_fast._C", sources=[])]


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": BuildExt})
