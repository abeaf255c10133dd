"""The argument parser of every megavid command (the ``megavid`` program, its tools and
``megavid launch``): a module of its own so that the tools import it without importing the
program (:mod:`megavid.cli`) that dispatches to them."""

from __future__ import annotations

import argparse
import re
import textwrap
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """The parser of every megavid command (tools and ``megavid launch`` too): a usage
    mistake is one line naming the problem and where help is, not a usage block."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def doc_summary(doc: str | None) -> str:
    """The first paragraph of a tool module's docstring as one line, without reST markup and
    without its leading ```megavid TOOL ARGS``:`` label (the usage line shows that): the
    tool's ``--help`` description, whole sentences rather than the docstring's first line."""
    first = " ".join(textwrap.dedent(doc or "").strip().split("\n\n", 1)[0].split())
    first = re.sub(r"^`+megavid [^`]*`+:\s*", "", first).replace("`", "")
    return first[:1].upper() + first[1:]
