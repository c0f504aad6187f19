"""CUDA support: finding NVRTC and cuBLAS, compiling the kernels, per-group device workspaces.

The native core loads NVIDIA's libraries dynamically and only when asked, so importing
smallbatch_rs never touches CUDA. torch's CUDA wheels install NVRTC and cuBLAS as pip packages
(``nvidia/cu13/lib/libnvrtc.so.13`` for CUDA 13, ``nvidia/cuda_nvrtc/lib/libnvrtc.so.12`` for CUDA
12; cuBLAS beside them or in ``nvidia/cublas/lib``) that the dynamic loader does not search;
:func:`preload_nvrtc` and :func:`preload_cublas` find them and load them globally, so the core's
own loading then succeeds.
"""

from __future__ import annotations

import ctypes
import glob
import os
import site
import sys
from typing import Any, List, Optional

from . import _core

__all__ = ["find_nvrtc", "preload_nvrtc", "find_cublas", "preload_cublas", "nvrtc_version", "compile_all"]

_PRELOADED: Optional[str] = None
_PRELOADED_CUBLAS: Optional[str] = None


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


def find_cublas() -> Optional[str]:
    """The path of the cuBLAS library that torch's CUDA wheels installed, or None."""
    patterns = ["nvidia/cu*/lib/libcublas.so.*", "nvidia/cublas/lib/libcublas.so.*", "nvidia/cu*/bin/cublas64_*.dll"]
    for root in _search_roots():
        for pattern in patterns:
            for path in sorted(glob.glob(os.path.join(root, pattern)), reverse=True):
                if "Lt" not in os.path.basename(path):
                    return path
    return None


def preload_cublas() -> Optional[str]:
    """Loads torch's cuBLAS (with cuBLASLt, which it needs) globally; returns its path, or None
    when none is installed (a system cuBLAS on the loader's path may still be found later).
    Muon's Newton-Schulz products on CUDA run in it."""
    global _PRELOADED_CUBLAS
    if _PRELOADED_CUBLAS is not None:
        return _PRELOADED_CUBLAS
    path = find_cublas()
    if path is None:
        return None
    for lt in sorted(glob.glob(os.path.join(os.path.dirname(path), "libcublasLt.so.*"))):
        ctypes.CDLL(lt, mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    _PRELOADED_CUBLAS = path
    return path


def group_workspace(tg: Any) -> Any:
    """The device memory a CUDA param group keeps between steps (Adafactor's segment table and
    scratch, Muon's Newton-Schulz workspace and cuBLAS handle), created at its first step and
    freed with the group (or when the group's parameters move to another device)."""
    import torch

    ordinal = tg.device.index if tg.device.index is not None else torch.cuda.current_device()
    ws = getattr(tg, "cuda_workspace", None)
    if ws is None or ws.ordinal != ordinal:
        ws = tg.cuda_workspace = _core.CudaWorkspace(ordinal)
    return ws


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
