"""``--NAME=value`` overrides for the UPPER_CASE constants at the top of each stage script.

nanoGPT-style, without ``exec``: a script calls ``cfg = load_config(globals(), argv)`` and gets
a namespace holding every UPPER_CASE constant, with the command-line values parsed to the
constant's own type. Unknown names and ill-typed values are errors that list what is valid.
"""
from __future__ import annotations

import ast
import io
import json
import sys
import tokenize
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class ConfigError(ValueError):
    """A bad ``--NAME=value`` on the command line."""


def _assigned_names(path: Any) -> set[str] | None:
    """Names a script assigns at its top level (None when its source cannot be read)."""
    try:
        tree = ast.parse(Path(path).read_text())
    except (OSError, SyntaxError, TypeError, ValueError):
        return None
    names = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) else []
        names.update(target.id for target in targets if isinstance(target, ast.Name))
    return names


def settings_block(path: Any) -> dict[str, str] | None:
    """``{NAME: comment}`` for the constants between a script's first two ``# ---`` rules, in order.

    The comment is the line's trailing comment plus the comment-only lines that continue it.
    None when the source cannot be read or has no such block.
    """
    try:
        source = Path(path).read_text()
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (OSError, SyntaxError, TypeError, ValueError, tokenize.TokenError):
        return None
    rules = [tok.start[0] for tok in tokens if tok.type == tokenize.COMMENT and tok.string.startswith("# ---")]
    if len(rules) < 2:
        return None
    first, last = rules[0], rules[1]
    settings: dict[str, str] = {}
    current = None
    for index, tok in enumerate(tokens):
        if not first < tok.start[0] < last:
            continue
        if tok.type == tokenize.NAME and tok.start[1] == 0 and tok.string.isupper():
            current = tok.string
            settings[current] = ""
        elif tok.type == tokenize.COMMENT and current is not None:
            text = tok.string.lstrip("#").strip()
            settings[current] = f"{settings[current]} {text}".strip()
    return settings


def constants_of(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The UPPER_CASE, non-callable, non-module entries of a module's ``globals()``.

    When the namespace has a ``__file__``, only names the script itself assigns count, so an
    imported UPPER_CASE name (``from models.paths import CLUSTERS``) is not a setting; when the
    script has a ``# ---`` settings block, only the names in it (module constants below it, such
    as RNG stream offsets, are not settings).
    """
    block = settings_block(namespace.get("__file__"))
    assigned = set(block) if block else _assigned_names(namespace.get("__file__"))
    return {
        name: value
        for name, value in namespace.items()
        if name.isupper() and not name.startswith("_") and not callable(value)
        and not hasattr(value, "__file__") and (assigned is None or name in assigned)
    }


def _parse_value(name: str, raw: str, default: Any) -> Any:
    """Parse ``raw`` to the type of ``default``; ``None`` defaults accept anything (or 'None')."""
    if raw == "None" and default is None:
        return None
    if isinstance(default, bool):  # before int: bool is a subclass of int
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"--{name} expects a boolean (true/false), got {raw!r}")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"--{name} expects an integer, got {raw!r}") from None
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"--{name} expects a number, got {raw!r}") from None
    if isinstance(default, (list, tuple, dict)):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise ConfigError(f"--{name} expects a Python {type(default).__name__} literal, got {raw!r}") from None
        expected = (list, tuple) if isinstance(default, (list, tuple)) else dict
        if not isinstance(value, expected):
            raise ConfigError(f"--{name} expects a {type(default).__name__}, got {raw!r}")
        return type(default)(value)
    if default is None:
        # Optional settings: numbers become numbers, anything else stays a string.
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return raw
    return raw  # str (paths are strings)


def help_text(namespace: Mapping[str, Any]) -> str:
    """The script's docstring, then every setting with its default and its comment."""
    settings = constants_of(namespace)
    comments = settings_block(namespace.get("__file__")) or {}
    lines = [(namespace.get("__doc__") or "").strip(), "",
             "Settings (override any with --NAME=value; defaults shown):"]
    for name, value in settings.items():
        comment = comments.get(name, "")
        lines.append(f"  --{name}={value!r}" + (f"\n      {comment}" if comment else ""))
    return "\n".join(lines) + "\n"


def parse_overrides(defaults: Mapping[str, Any], argv: Sequence[str]) -> dict[str, Any]:
    """Return ``defaults`` updated with ``--NAME=value`` items of ``argv``.

    Raises ConfigError for anything that is not ``--NAME=value`` with a known NAME.
    """
    values = dict(defaults)
    valid = ", ".join(sorted(defaults))
    for arg in argv:
        if arg in ("-h", "--help"):
            raise ConfigError("usage: --NAME=value ... where NAME is one of: " + valid)
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"cannot read argument {arg!r}: use --NAME=value (NAME one of: {valid})")
        name, raw = arg[2:].split("=", 1)
        if name not in defaults:
            raise ConfigError(f"unknown setting {name!r}; valid names are: {valid}")
        values[name] = _parse_value(name, raw, defaults[name])
    return values


def load_config(namespace: Mapping[str, Any], argv: Sequence[str] | None = None) -> SimpleNamespace:
    """The script's constants with command-line overrides applied, as attributes.

    ``-h``/``--help`` prints :func:`help_text` and exits 0. On a bad argument, prints the
    reason and exits with status 2 (argparse's convention).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        sys.stdout.write(help_text(namespace))
        raise SystemExit(0)
    try:
        values = parse_overrides(constants_of(namespace), argv)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    return SimpleNamespace(**values)


def save_config(cfg: SimpleNamespace, path: Path) -> None:
    """Write the settings a run used as JSON next to its outputs (minGPT's config.json)."""
    from models.io import atomic_path

    def plain(value: Any) -> Any:
        return value if isinstance(value, (int, float, str, bool, type(None), list, dict)) else str(value)

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({k: plain(v) for k, v in vars(cfg).items()}, indent=2) + "\n")
