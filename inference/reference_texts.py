"""Texts an int8 graph is checked against, unlike any model's training tweets, read from packaged files.

Python's own standard library is on every machine that runs tiergate: the
docstrings of its modules, classes and functions (read with `ast`, nothing
imported), one paragraph per text. They are nothing like the tweets the
default model was trained on, which is the point: an int8 graph must agree
with float32 on texts unlike its training data, which in-domain accuracy
alone does not show (the first int8 served kept only 91% of float32's labels
on such texts while losing a quarter of a point on held-out tweets).

Deterministic for one Python version: the same texts in the same order on
every run, so an export's check is repeatable.
"""

from __future__ import annotations

import ast
import pathlib
import sysconfig

__all__ = ["stdlib_passages", "reference_texts"]

# Modules read, in this order: a broad spread of prose (text processing,
# networking, data formats, concurrency, the interpreter's own machinery).
_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "cgitb", "cmd", "codecs", "collections",
    "concurrent", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email", "enum", "filecmp", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
    "gzip", "heapq", "hmac", "html", "http", "imaplib", "importlib", "inspect", "ipaddress", "json",
    "locale", "logging", "mailbox", "multiprocessing", "netrc", "numbers", "optparse", "pathlib", "pdb",
    "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "pydoc", "queue", "random", "re",
    "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver",
    "sqlite3", "ssl", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tkinter", "tokenize", "trace", "traceback", "turtle", "typing", "unittest", "urllib", "uuid",
    "venv", "warnings", "wave", "weakref", "webbrowser", "xml", "zipfile", "zoneinfo",
)
_MIN_WORDS = 6
_MAX_CHARS = 2000


def _sources(stdlib: pathlib.Path) -> list[pathlib.Path]:
    files = []
    for name in _MODULES:
        package = stdlib / name
        if package.is_dir():
            files += sorted(p for p in package.rglob("*.py") if "test" not in p.relative_to(package).parts)
        elif (stdlib / f"{name}.py").is_file():
            files.append(stdlib / f"{name}.py")
    return files


def _docstrings(path: pathlib.Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return [doc for doc in (ast.get_docstring(n) for n in nodes) if doc]


def stdlib_passages() -> list[str]:
    """Every distinct docstring paragraph of at least _MIN_WORDS words, in a fixed order."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    passages = []
    for path in _sources(stdlib):
        for doc in _docstrings(path):
            for paragraph in doc.split("\n\n"):
                text = " ".join(paragraph.split())[:_MAX_CHARS]
                if len(text.split()) >= _MIN_WORDS and text not in seen and not text.startswith((">>>", "...")):
                    seen.add(text)
                    passages.append(text)
    return passages


def reference_texts(count: int, long_texts: int) -> list[str]:
    """`count` docstring paragraphs spread evenly over the whole library, then
    `long_texts` texts of eight other paragraphs joined (long enough to reach a
    256-token max_length: an int8 graph that holds short texts may still go
    wrong on long ones)."""
    passages = stdlib_passages()
    if len(passages) < 2 * count + 8 * long_texts:
        raise RuntimeError(f"the standard library at {sysconfig.get_paths()['stdlib']} has too few docstrings "
                           f"({len(passages)} paragraphs) to check an int8 graph on")
    step = len(passages) / count
    chosen = {int(i * step) for i in range(count)}
    picked = [passages[i] for i in sorted(chosen)]
    rest = [p for i, p in enumerate(passages) if i not in chosen]
    return picked + [" ".join(rest[i * 8 : i * 8 + 8]) for i in range(long_texts)]
