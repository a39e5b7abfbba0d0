"""The optional C helper (nbdluks/luks/_xtsloop.c): built when a compiler and
the Python headers are there; without it nbdluks runs its pure-Python path
(the log's cipher_engine says which)."""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # no compiler, no headers: the fallback serves
            print(f"warning: the C helper was not built ({e}); the Python path will serve")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:
            print(f"warning: {ext.name} was not built ({e}); the Python path will serve")


setup(
    ext_modules=[Extension("nbdluks.luks._xtsloop", ["nbdluks/luks/_xtsloop.c"],
                           extra_compile_args=["-O2"], optional=True)],
    cmdclass={"build_ext": OptionalBuildExt},
)
