"""The optional C helpers (nbdluks/luks/_xtsloop.c: the AES-XTS loop;
nbdluks/nbd/_transmit.c: runs of small READs answered in C): built when a
compiler and the Python headers are there; without them nbdluks runs its
pure-Python path (`nbdluks --version` and the log say which).

The man pages and the bash completion are written here from the argument
parser (nbdluks/cli/manual.py), so they are never edited by hand, and are
installed as the wheel's data files."""

import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def generated_data_files() -> list[tuple[str, list[str]]]:
    sys.path.insert(0, str(HERE))  # the package being built, not an installed one
    from nbdluks.cli.manual import write

    out = write(Path("build") / "generated")
    pages = [str(p) for p in out if p.suffix == ".1"]
    completion = [str(p) for p in out if p.suffix != ".1"]
    return [("share/man/man1", pages), ("share/bash-completion/completions", completion)]


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
    ext_modules=[
        Extension(f"nbdluks.{name}", [f"nbdluks/{name.replace('.', '/')}.c"],
                  depends=["nbdluks/_c/evpxts.h"], extra_compile_args=["-O2"], optional=True)
        for name in ("luks._xtsloop", "nbd._transmit")
    ],
    cmdclass={"build_ext": OptionalBuildExt},
    data_files=generated_data_files(),
)
