"""Install llama-cpp-python built for any x86-64 CPU of this kind, not for the build machine.

pip builds llama-cpp-python from source with llama.cpp's default ``GGML_NATIVE=ON``: on a CPU that
advertises AMX that build enables llama.cpp's AMX path, which crashes in decode on every Q4_1 model.
This script builds it once with portable flags (AVX2/FMA/F16C, no native tuning), keeps the wheel in
a cache directory whose name is derived from the version and the flags, and installs that wheel into
the interpreter that runs it.

pip's own wheel cache is keyed on the source archive only, not on ``CMAKE_ARGS``: a wheel it once
built natively would be reused silently. Here the build bypasses pip's cache (``--no-cache-dir``) and
our cache is keyed on the flags, so the wheel that is installed is always the portable one, and it is
built only when the version or the flags change.

Usage (with the interpreter of the environment to install into)::

    .venv/bin/python scripts/install_llama_cpp.py            # 0.3.36, portable flags
    .venv/bin/python scripts/install_llama_cpp.py --version 0.3.36 --cmake-args "-DGGML_NATIVE=OFF ..."

Runs with the standard library only: the project need not be installed yet.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "llama-cpp-python"
DEFAULT_VERSION = "0.3.36"
# No native tuning: AVX2 + FMA + F16C run on every x86-64 CPU of the machines we build on, and leave
# out the AMX and AVX-512 paths that GGML_NATIVE=ON would pick on CPUs advertising them.
PORTABLE_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qalora-export" / "wheels"


def wheel_dir(version: str, cmake_args: str) -> Path:
    """The cache directory for one (version, flags) pair: a different flag set never shares a wheel."""
    key = hashlib.sha256(f"{version}\0{cmake_args}".encode()).hexdigest()[:12]
    return cache_root() / f"{DISTRIBUTION}-{version}-{key}"


def installed_wheel_url() -> str | None:
    """The ``file://`` URL the installed llama-cpp-python came from (pip's direct_url.json), if any."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    text = dist.read_text("direct_url.json")
    return json.loads(text).get("url") if text else ""


def installed_version() -> str | None:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def cached_wheel(directory: Path, version: str) -> Path | None:
    wheels = sorted(directory.glob(f"llama_cpp_python-{version}-*.whl"))
    return wheels[0] if wheels else None


def build_wheel(version: str, cmake_args: str, directory: Path) -> Path:
    """Build the wheel from the source distribution with ``cmake_args``; atomically placed in ``directory``."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CMAKE_ARGS=cmake_args, FORCE_CMAKE="1")
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=".build-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir",
                        "--no-binary", DISTRIBUTION, f"{DISTRIBUTION}=={version}", "-w", tmp],
                       env=env, check=True)
        built = cached_wheel(Path(tmp), version)
        if built is None:
            raise SystemExit(f"pip wheel produced no {DISTRIBUTION} {version} wheel in {tmp}")
        staging = Path(tmp) / "out"
        staging.mkdir()
        shutil.move(str(built), staging / built.name)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    wheel = cached_wheel(directory, version)
    assert wheel is not None
    return wheel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default=DEFAULT_VERSION, help=f"llama-cpp-python version (default {DEFAULT_VERSION})")
    parser.add_argument("--cmake-args", default=PORTABLE_CMAKE_ARGS,
                        help=f"CMAKE_ARGS for the build (default: {PORTABLE_CMAKE_ARGS!r})")
    parser.add_argument("--rebuild", action="store_true", help="build the wheel again even if it is cached")
    args = parser.parse_args(argv)

    directory = wheel_dir(args.version, args.cmake_args)
    url = installed_wheel_url()
    if not args.rebuild and installed_version() == args.version and url and str(directory) in url:
        print(f"{DISTRIBUTION} {args.version} is installed from {directory.name} (portable build)")
        return 0
    wheel = None if args.rebuild else cached_wheel(directory, args.version)
    if wheel is None:
        print(f"building {DISTRIBUTION} {args.version} with CMAKE_ARGS={args.cmake_args!r} (a few minutes, once)",
              flush=True)
        wheel = build_wheel(args.version, args.cmake_args, directory)
    if installed_version() is not None:
        # A build from elsewhere (pip's native default, perhaps) is replaced; its dependencies stay.
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", DISTRIBUTION], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", str(wheel)], check=True)
    print(f"{DISTRIBUTION} {args.version} installed from {wheel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
