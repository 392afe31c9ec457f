"""Checks of the built wheel and of its non-editable install, run by wheel_check.sh.

``wheel_check.py contents WHEEL SOURCE``: every ``.py`` under SOURCE's ``fastmlp/``,
``kernels/`` and ``bench/`` is in WHEEL (``kernels/x.py`` as ``fastmlp/kernels/x.py``,
``bench/x.py`` as ``fastmlp/bench/x.py``) and nothing of ``tests/`` is.

``wheel_check.py imports VENV``: run with VENV's python, isolated (``-I``) and from a
folder outside the repository. ``fastmlp`` comes from VENV and every module of it imports;
the ``__main__`` modules, which run their command when imported, run as
``python -m PACKAGE --help`` instead.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import subprocess
import sys
import traceback
import zipfile
from pathlib import Path

# Source folder -> its path inside the wheel.
INSTALLED_AS = {"fastmlp": "fastmlp", "kernels": "fastmlp/kernels", "bench": "fastmlp/bench"}

# Modules that may fail to import for want of an optional dependency, each with the missing
# top-level modules allowed and why. Any other import error of these modules still fails.
OPTIONAL: dict[str, tuple[frozenset[str], str]] = {
    "fastmlp.bench.test_bench": (
        frozenset({"pytest"}),
        "the pytest-benchmark suite (pytest bench); pytest is in the dev extra only",
    ),
    "fastmlp.integrations.lightning": (
        frozenset({"lightning"}),
        "the Lightning callback; lightning is the [lightning] extra",
    ),
    "fastmlp.integrations.transformers": (
        frozenset({"transformers"}),
        "the Hugging Face Trainer callback; transformers is the [transformers] extra",
    ),
}


def check_contents(wheel: Path, source: Path) -> list[str]:
    """The problems of WHEEL's file list against SOURCE's packages."""
    names = set(zipfile.ZipFile(wheel).namelist())
    problems = []
    expected = 0
    for folder, installed in INSTALLED_AS.items():
        for path in sorted((source / folder).rglob("*.py")):
            expected += 1
            name = f"{installed}/{path.relative_to(source / folder).as_posix()}"
            if name not in names:
                problems.append(f"missing from the wheel: {name} (from {path.relative_to(source)})")
    problems += [f"in the wheel but not a package file: {n}" for n in sorted(names)
                 if n.split("/")[0] == "tests" or n.startswith(("kernels/", "bench/"))]  # fmt: skip
    print(f"wheel {wheel.name}: {expected} source modules checked, {len(names)} files")
    return problems


def check_imports(venv: Path) -> list[str]:
    """The problems of importing every module of the installed fastmlp."""
    try:
        import fastmlp
    except Exception:  # noqa: BLE001 - reported, the check fails
        return [f"import fastmlp: {traceback.format_exc(limit=-3).strip()}"]
    location = Path(fastmlp.__file__).resolve()
    if not location.is_relative_to(venv.resolve()):
        return [f"fastmlp imported from {location}, not from the fresh environment {venv}"]
    problems = []
    imported = optional = 0
    mains = []

    def on_error(name: str) -> None:  # a package that fails to import while walking
        problems.append(f"{name}: {traceback.format_exc(limit=-3).strip()}")

    modules = pkgutil.walk_packages(fastmlp.__path__, "fastmlp.", onerror=on_error)
    for info in sorted(modules, key=lambda m: m.name):
        name = info.name
        if name.rpartition(".")[2] == "__main__":
            mains.append(name.rpartition(".")[0])
            continue
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            allowed, why = OPTIONAL.get(name, (frozenset(), ""))
            if (error.name or "").partition(".")[0] in allowed:
                optional += 1
                print(f"  {name}: not imported, needs {error.name} ({why})")
                continue
            problems.append(f"{name}: {traceback.format_exc(limit=-3).strip()}")
        except Exception:  # noqa: BLE001 - reported, the check fails
            problems.append(f"{name}: {traceback.format_exc(limit=-3).strip()}")
        else:
            imported += 1
    for package in mains:  # python -m PACKAGE: runs its command, so --help only
        command = [sys.executable, "-I", "-m", package, "--help"]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            problems.append(f"{' '.join(command[1:])}: exit {done.returncode}\n{done.stderr}")
    print(f"fastmlp from {location.parent}: {imported} modules imported, {optional} optional "
          f"left out, {len(mains)} __main__ run with --help")  # fmt: skip
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="check", required=True)
    contents = sub.add_parser("contents", help="the wheel holds every source module")
    contents.add_argument("wheel", type=Path)
    contents.add_argument("source", type=Path)
    imports = sub.add_parser("imports", help="every installed module imports")
    imports.add_argument("venv", type=Path)
    args = parser.parse_args()
    if args.check == "contents":
        problems = check_contents(args.wheel, args.source)
    else:
        problems = check_imports(args.venv)
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
