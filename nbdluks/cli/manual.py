"""Man pages and bash completion, generated from the argparse parser (at
build time, by setup.py), so that they can never disagree with `--help`.

    python -m nbdluks.cli.manual DIR    # DIR/man1/*.1, DIR/bash-completion/nbdluks
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import __version__
from .arguments import build_parser

_SECTION = "1"
_ALSO = ("cryptsetup(8)", "qemu-nbd(8)", "nbdkit(1)", "nbd-client(8)", "nbdinfo(1)")


def _roff(text: str) -> str:
    """Escape text for roff: backslashes and hyphens; a leading dot or quote
    would start a request."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line
                     for line in out.splitlines())


def _subcommands(parser: argparse.ArgumentParser
                 ) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return []


def _option(action: argparse.Action) -> str:
    """One option as a tagged paragraph: its spellings, its value, its help."""
    if action.option_strings:
        value = "" if action.nargs == 0 else " \\fI" + _roff(
            action.metavar if isinstance(action.metavar, str)
            else "{" + ",".join(action.choices or ()) + "}" if action.choices
            else action.dest.upper()) + "\\fR"
        spellings = ", ".join(f"\\fB{_roff(o)}\\fR{value}" for o in action.option_strings)
    else:
        spellings = "\\fI" + _roff(str(action.metavar or action.dest)) + "\\fR"
    return f".TP\n{spellings}\n{_roff(action.help or '')}\n"


def _options(parser: argparse.ArgumentParser) -> str:
    out = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.help != argparse.SUPPRESS
                   and not isinstance(a, argparse._SubParsersAction)]
        if not actions:
            continue
        title = group.title or "options"
        out.append(f".SS {_roff(title[0].upper() + title[1:])}\n")
        out.extend(_option(a) for a in actions)
    return "".join(out)


def _page(name: str, summary: str, parser: argparse.ArgumentParser, body: str) -> str:
    usage = parser.format_usage().removeprefix("usage: ").strip()
    return (
        f'.TH {name.upper()} {_SECTION} "" "nbdluks {__version__}" "User Commands"\n'
        f".SH NAME\n{_roff(name)} \\- {_roff(summary)}\n"
        f".SH SYNOPSIS\n.nf\n{_roff(usage)}\n.fi\n"
        f"{body}"
        f".SH SEE ALSO\n{', '.join(_also(name))}\n"
    )


def _also(name: str) -> list[str]:
    pages = [f"nbdluks-{sub}(1)" for sub, _, _ in _subcommands(build_parser())]
    return [p for p in ["nbdluks(1)", *pages, *_ALSO] if not p.startswith(f"{name}(")]


def man_pages(parser: argparse.ArgumentParser | None = None) -> dict[str, str]:
    """File name -> page: nbdluks.1 and nbdluks-SUBCOMMAND.1 for each."""
    parser = parser or build_parser()
    subs = _subcommands(parser)
    top = ".SH DESCRIPTION\n" + _roff(parser.description or "") + "\n.SH COMMANDS\n" + "".join(
        f".TP\n\\fBnbdluks {s}\\fR\n{_roff(h)}. See \\fBnbdluks\\-{s}\\fR(1).\n"
        for s, h, _ in subs) + ".SH OPTIONS\n" + _options(parser)
    pages = {f"nbdluks.{_SECTION}": _page("nbdluks", parser.description or "", parser, top)}
    for sub, summary, p in subs:
        body = f".SH DESCRIPTION\n{_roff(summary[0].upper() + summary[1:])}.\n"
        body += ".SH OPTIONS\n" + _options(p)
        if p.epilog:
            body += ".SH NOTES\n.nf\n" + _roff(p.epilog.rstrip()) + "\n.fi\n"
        pages[f"nbdluks-{sub}.{_SECTION}"] = _page(f"nbdluks-{sub}", summary, p, body)
    return pages


# Values that name files or directories complete as paths.
_PATHS = ("F", "SRC", "PATH", "DIR")


def bash_completion(parser: argparse.ArgumentParser | None = None) -> str:
    """A bash completion function: subcommands, each one's options, their
    choices, and paths where a value names a file."""
    parser = parser or build_parser()
    cases = []
    subs = _subcommands(parser)
    for sub, _, p in subs:
        opts = [o for a in p._actions for o in a.option_strings]
        values = []
        for a in p._actions:
            if not a.option_strings or a.nargs == 0:
                continue
            pattern = "|".join(a.option_strings)
            if a.choices:
                words = " ".join(str(c) for c in a.choices)
                values.append(f'            {pattern}) COMPREPLY=($(compgen -W "{words}" -- '
                              '"$cur")); return ;;')
            elif a.metavar in _PATHS:
                values.append(f'            {pattern}) COMPREPLY=($(compgen -f -- "$cur")); '
                              "return ;;")
            else:
                values.append(f"            {pattern}) return ;;")
        cases.append(
            f"        {sub})\n"
            f'            case "$prev" in\n' + "\n".join(values) + "\n            esac\n"
            f'            if [[ "$cur" == -* ]]; then\n'
            f'                COMPREPLY=($(compgen -W "{" ".join(opts)}" -- "$cur"))\n'
            "            else\n"
            '                COMPREPLY=($(compgen -f -- "$cur"))\n'
            "            fi ;;\n")
    top_opts = " ".join(o for a in parser._actions for o in a.option_strings)
    names = " ".join(s for s, _, _ in subs)
    return (
        "# bash completion for nbdluks (generated from its parser)\n"
        "_nbdluks() {\n"
        '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"\n'
        "    local i sub=\n"
        "    for ((i = 1; i < COMP_CWORD; i++)); do\n"
        '        case "${COMP_WORDS[i]}" in -*) ;; *) sub="${COMP_WORDS[i]}"; break ;; esac\n'
        "    done\n"
        "    COMPREPLY=()\n"
        '    case "$sub" in\n'
        f'        "") COMPREPLY=($(compgen -W "{names} {top_opts}" -- "$cur")) ;;\n'
        + "".join(cases) +
        "    esac\n"
        "}\n"
        "complete -o filenames -F _nbdluks nbdluks\n"
    )


def write(out: Path) -> list[Path]:
    """Write the pages to out/man1 and the completion to out/bash-completion."""
    written = []
    (out / f"man{_SECTION}").mkdir(parents=True, exist_ok=True)
    for name, text in man_pages().items():
        path = out / f"man{_SECTION}" / name
        path.write_text(text)
        written.append(path)
    (out / "bash-completion").mkdir(parents=True, exist_ok=True)
    path = out / "bash-completion" / "nbdluks"
    path.write_text(bash_completion())
    written.append(path)
    return written


if __name__ == "__main__":  # pragma: no cover
    for p in write(Path(sys.argv[1] if len(sys.argv) > 1 else "build/generated")):
        print(p)
