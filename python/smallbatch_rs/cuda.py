"""CUDA support: finding NVRTC and compiling the kernels.

The native core loads NVIDIA's libraries dynamically and only when asked, so importing
smallbatch_rs never touches CUDA. torch's CUDA wheels install NVRTC as a pip package
(``nvidia/cu13/lib/libnvrtc.so.13`` for CUDA 13, ``nvidia/cuda_nvrtc/lib/libnvrtc.so.12`` for CUDA
12) that the dynamic loader does not search; :func:`preload_nvrtc` finds it and loads it
globally, so the core's own loading then succeeds.
"""

from __future__ import annotations

import ctypes
import glob
import os
import site
import sys
from typing import List, Optional

from . import _core

__all__ = ["find_nvrtc", "preload_nvrtc", "nvrtc_version", "compile_all"]

_PRELOADED: Optional[str] = None


def _search_roots() -> List[str]:
    roots = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    roots.append(site.getusersitepackages() if hasattr(site, "getusersitepackages") else "")
    roots.extend(p for p in sys.path if p.endswith("site-packages"))
    seen, out = set(), []
    for r in roots:
        if r and r not in seen and os.path.isdir(r):
            seen.add(r)
            out.append(r)
    return out


def find_nvrtc() -> Optional[str]:
    """The path of the NVRTC library that torch's CUDA wheels installed, or None."""
    patterns = ["nvidia/cu*/lib/libnvrtc.so.*", "nvidia/cuda_nvrtc/lib/libnvrtc.so.*", "nvidia/cu*/bin/nvrtc64_*.dll"]
    for root in _search_roots():
        for pattern in patterns:
            for path in sorted(glob.glob(os.path.join(root, pattern)), reverse=True):
                if "builtins" not in os.path.basename(path):
                    return path
    return None


def preload_nvrtc() -> Optional[str]:
    """Loads torch's NVRTC (and its builtins library) globally; returns its path, or None when
    none is installed (a system NVRTC on the loader's path may still be found later)."""
    global _PRELOADED
    if _PRELOADED is not None:
        return _PRELOADED
    path = find_nvrtc()
    if path is None:
        return None
    libdir = os.path.dirname(path)
    for builtins in sorted(glob.glob(os.path.join(libdir, "libnvrtc-builtins.so.*"))):
        ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    _PRELOADED = path
    return path


def nvrtc_version() -> tuple:
    """NVRTC's (major, minor) version; RuntimeError when NVRTC cannot be loaded."""
    preload_nvrtc()
    return tuple(_core.cuda_nvrtc_version())


def compile_all(arch: str) -> List[str]:
    """Compiles every kernel for ``arch`` (such as ``"sm_90"``) and returns their names.

    Needs NVRTC, not a GPU. RuntimeError says what is missing or what NVRTC reported.
    """
    preload_nvrtc()
    return list(_core.cuda_compile_all(arch))
