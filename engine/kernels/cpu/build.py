"""Compile a C source into a shared library once per (source, flags, compiler, CPU), cached on disk.

Cache dir: env MEGASERVE_KERNEL_CACHE, else ~/.cache/megaserve/kernels. The library is named
`<name>-<sha256 key>.so`; it is compiled under a temporary name in the same directory and renamed into
place (atomic on POSIX), so several processes may build the same kernel at once and none loads a partial file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

DEFAULT_FLAGS: tuple[str, ...] = ("-O3", "-march=native", "-std=gnu11", "-fno-math-errno", "-shared", "-fPIC",
                                  "-pthread")
COMPILE_TIMEOUT_S = 120.0


class KernelBuildError(RuntimeError):
    """No compiler, or the compiler failed: the caller falls back to its torch path."""


def cache_dir() -> Path:
    """Where compiled kernels live: $MEGASERVE_KERNEL_CACHE or ~/.cache/megaserve/kernels (KernelBuildError when
    there is no home directory to find)."""
    env = os.environ.get("MEGASERVE_KERNEL_CACHE")
    if env:
        return Path(env)
    try:
        home = Path.home()
    except RuntimeError as e:  # no $HOME and no passwd entry (containers run as an arbitrary uid)
        raise KernelBuildError(f"no kernel cache dir: {e}; set MEGASERVE_KERNEL_CACHE") from e
    return home / ".cache" / "megaserve" / "kernels"


def find_compiler() -> str:
    """Path of the C compiler ($CC, else gcc); KernelBuildError when there is none."""
    cc = shutil.which(os.environ.get("CC") or "gcc")
    if cc is None:
        raise KernelBuildError(f"no C compiler found ({os.environ.get('CC') or 'gcc'} not on PATH)")
    return cc


def _cpu_flags() -> str:
    """The CPU's feature flags (part of the key, since -march=native depends on them)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return os.uname().machine


def compile_shared(name: str, source: str, flags: Sequence[str] = DEFAULT_FLAGS,
                   cache: Path | None = None) -> Path:
    """Return the path of `source` compiled with `flags` into a cached shared library, compiling if needed."""
    cc = find_compiler()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"{cc} --version failed: {e}") from e
    key = hashlib.sha256("\0".join([source, *flags, cc, version, _cpu_flags()]).encode()).hexdigest()[:20]
    cache = cache_dir() if cache is None else cache
    target = cache / f"{name}-{key}.so"
    if target.exists():
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=f".{name}-build-") as tmp:
            src = Path(tmp) / f"{name}.c"
            src.write_text(source)
            out = Path(tmp) / f"{name}.so"
            try:
                proc = subprocess.run([cc, *flags, "-o", str(out), str(src), "-lm"], capture_output=True, text=True,
                                      timeout=COMPILE_TIMEOUT_S)
            except (OSError, subprocess.SubprocessError) as e:
                raise KernelBuildError(f"{cc} failed to run: {e}") from e
            if proc.returncode != 0:
                raise KernelBuildError(f"{cc} {' '.join(flags)} failed (rc {proc.returncode}): "
                                       f"{proc.stderr.strip()[-2000:]}")
            os.replace(out, target)
    except OSError as e:
        raise KernelBuildError(f"cannot write kernel cache {cache}: {e}") from e
    return target
