"""Package list, found rather than written out.

Everything else is in pyproject.toml. Every folder with an ``__init__.py`` under
``fastmlp/`` is a package; the top-level folders ``kernels/`` and ``bench/`` are installed
as ``fastmlp.kernels`` and ``fastmlp.bench``, with any subpackages they get. ``tests/`` is
not installed.
"""

from setuptools import find_packages, setup

# Installed name -> source folder. A subpackage ``kernels/x`` becomes ``fastmlp.kernels.x``:
# setuptools resolves ``fastmlp.kernels.x`` through its parent's folder.
PACKAGE_DIR = {"fastmlp.kernels": "kernels", "fastmlp.bench": "bench"}

PACKAGES = find_packages(include=["fastmlp", "fastmlp.*"])
for name, folder in PACKAGE_DIR.items():
    PACKAGES += [name, *(f"{name}.{sub}" for sub in find_packages(folder))]

setup(packages=PACKAGES, package_dir=PACKAGE_DIR)
