"""The one compiled part of vmfront: the Hextile encoder's C core (rfb/encodings/_hextile.c). Everything else
about the package is in pyproject.toml; ``pip install -e .`` (install.sh) builds this too."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("rfb.encodings._hextile", ["rfb/encodings/_hextile.c"],
                             extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"])])
