"""Build of proxyd's compiled request path (everything else is in pyproject.toml).

proxyd/protocol.py, proxyd/ops.py and proxyd/server.py are plain Python (Cython's pure
Python mode) and the only implementation of the request path; Cython compiles them to
C extension modules, which Python imports instead of the .py files beside them. Without
a C compiler or Python's headers the install fails, saying what to install: a proxyd
serving through the interpreter spends about twice the CPU per request.
"""

from __future__ import annotations

from Cython.Build import cythonize
from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError

COMPILED = ["proxyd/protocol.py", "proxyd/ops.py", "proxyd/server.py"]

NO_COMPILER = (
    "proxyd: cannot compile its request path ({error}). It needs a C compiler and the "
    "Python headers: on Debian, apt-get install build-essential python3-dev"
)


class BuildExt(build_ext):
    """build_ext whose failure to compile names what is missing."""

    def run(self) -> None:
        try:
            super().run()
        except (CCompilerError, ExecError, PlatformError) as e:  # no cc, no Python.h
            raise SystemExit(NO_COMPILER.format(error=e)) from e


setup(
    ext_modules=cythonize(
        COMPILED,
        compiler_directives={"language_level": 3, "binding": False, "warn.unreachable": False},
    ),
    cmdclass={"build_ext": BuildExt},
)
