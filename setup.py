"""Only the optional C part of the data build (everything else is in pyproject.toml).

`edgetune.data._native` stages the common log lines in one C pass (see its
header). It is optional: where no C compiler is at hand the install goes on
without it, and the build runs the Python path, to the same bytes.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("edgetune.data._native", ["edgetune/data/_native.c"], optional=True,
                             extra_compile_args=["-O3"])])
