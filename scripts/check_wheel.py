"""Install the built wheel into a fresh virtual environment and check that the installed package works.

``python scripts/check_wheel.py dist/`` (what ``make dist`` runs after ``python -m build`` and ``twine check``):

1. the wheel holds the shipped configs, ``py.typed`` and the license;
2. a new venv (``dist/venv-check``) gets the wheel with ``pip install --no-deps``; its dependencies (torch and the
   rest, already installed in the environment running this script) are made visible through a ``.pth`` file
   that is *appended* to the new venv's path, so nothing is downloaded again while ``liftkit`` itself can only
   come from the wheel (the check fails if it is imported from anywhere else, e.g. the source tree);
3. the installed ``liftkit --version`` prints the single-sourced version, ``liftkit methods`` lists the
   registry, and ``liftkit bench --config demo`` finds the packaged ``demo`` config and trains one epoch of
   one method (a real subprocess run of the installed command).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import venv
import zipfile
from pathlib import Path

REQUIRED_IN_WHEEL = ("liftkit/configs/demo.json", "liftkit/py.typed", "liftkit/loggers.py")


def _check(condition: bool, message: str) -> None:
    if not condition:
        print(f"check_wheel: FAILED: {message}", file=sys.stderr)
        raise SystemExit(1)


def _run(cmd: list[str], **kwargs: object) -> str:
    print("+ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    _check(proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return str(proc.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dist", type=Path, help="folder with the built wheel")
    args = parser.parse_args()
    wheels = sorted(args.dist.glob("liftkit-*.whl"))
    _check(len(wheels) == 1, f"expected one liftkit wheel in {args.dist}, found {len(wheels)}")
    wheel = wheels[0]
    names = zipfile.ZipFile(wheel).namelist()
    for required in REQUIRED_IN_WHEEL:
        _check(required in names, f"{wheel.name} lacks {required}")
    _check(any(n.endswith("/licenses/LICENSE") for n in names), f"{wheel.name} lacks the LICENSE file")

    from liftkit import __version__  # the source tree's version: the wheel must carry the same

    # nothing of the source tree may leak into the new venv (pip would take src/ on PYTHONPATH as installed)
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env_dir = args.dist.resolve() / "venv-check"
    shutil.rmtree(env_dir, ignore_errors=True)
    venv.create(env_dir, with_pip=True, symlinks=True)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = str(bin_dir / "python")
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=clean_env).strip()
    # the running environment's packages, after the new venv's own: dependencies only, never liftkit itself
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "zz_liftkit_check_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    _run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)], env=clean_env)

    with tempfile.TemporaryDirectory() as work:  # run away from the source tree
        where = _run([python, "-c", "import liftkit; print(liftkit.__file__)"], cwd=work, env=clean_env).strip()
        _check(Path(where).resolve().is_relative_to(Path(site).resolve()), f"liftkit was imported from {where}")
        liftkit = str(bin_dir / "liftkit")
        version = _run([liftkit, "--version"], cwd=work, env=clean_env).strip()
        _check(version == f"liftkit {__version__}", f"liftkit --version printed {version!r}, not {__version__}")
        _check("adam" in _run([liftkit, "methods"], cwd=work, env=clean_env), "liftkit methods lists no adam")
        out = _run(
            [liftkit, "bench", "--config", "demo", "--methods", "sgd", "--epochs", "1", "--out", "bench"],
            cwd=work, env=clean_env,
        )
        _check("| sgd |" in out, f"the demo bench printed no sgd row:\n{out}")
    shutil.rmtree(env_dir, ignore_errors=True)
    print(f"check_wheel: {wheel.name} installs into a fresh venv; liftkit {__version__}; packaged configs found")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
