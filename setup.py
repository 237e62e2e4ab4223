"""Build of proxyd's compiled request path (everything else is in pyproject.toml).

proxyd/protocol.py, proxyd/ops.py and proxyd/server.py are plain Python (Cython's pure
Python mode) and the only implementation of the request path, and proxyd/log.py writes
each request's audit line; Cython compiles them to C extension modules, which Python
imports instead of the .py files beside them. Without
a C compiler or Python's headers the install fails, saying what to install: a proxyd
serving through the interpreter spends about twice the CPU per request.
"""

from __future__ import annotations

import os
import shutil

from Cython.Build import cythonize
from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError

COMPILED = ["proxyd/protocol.py", "proxyd/ops.py", "proxyd/server.py", "proxyd/log.py"]

NO_COMPILER = (
    "proxyd: cannot compile its request path ({error}). It needs a C compiler and the "
    "Python headers: on Debian, apt-get install build-essential python3-dev"
)


class BuildExt(build_ext):
    """build_ext whose failure to compile names what is missing, and which puts a
    module built in place (`pip install -e .`) by renaming over the old one."""

    def run(self) -> None:
        try:
            super().run()
        except (CCompilerError, ExecError, PlatformError) as e:  # no cc, no Python.h
            raise SystemExit(NO_COMPILER.format(error=e)) from e

    def copy_file(self, infile: str, outfile: str, *args: object, **kwargs: object) -> tuple:
        # Copying into the old file would truncate it under a proxyd of this checkout
        # that still runs it (SIGBUS in the daemon); a rename leaves that one mapped.
        if not self.inplace:
            return super().copy_file(infile, outfile, *args, **kwargs)
        partial = f"{outfile}.{os.getpid()}.tmp"
        shutil.copy2(infile, partial)
        os.replace(partial, outfile)
        return outfile, True


setup(
    ext_modules=cythonize(
        COMPILED,
        compiler_directives={"language_level": 3, "binding": False, "warn.unreachable": False},
    ),
    cmdclass={"build_ext": BuildExt},
)
