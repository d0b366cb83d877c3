"""Configuration drop-ins: ``conf.d/*.toml`` merged over the main file.

The Debian package ships ``/etc/agentpost/agentpost.toml`` as a conffile that upgrades
never rewrite, and its postinst writes what it learns at install time (host name, TLS
files, database URL) as separate files in ``/etc/agentpost/conf.d/``. The rules:

- only files named ``*.toml`` directly in the directory count; names starting with
  ``.`` do not, nor do editor backups or dpkg's ``*.dpkg-dist``/``*.dpkg-old``;
- they are applied in lexical (byte) order of their names, each over the result of
  the ones before, so a later file wins (``90-local.toml`` beats ``20-tls.toml``);
- tables merge key by key, recursively; any other value (string, number, list)
  replaces the earlier one whole;
- a missing directory means no drop-ins; an unreadable or invalid file is an error
  naming that file.

Validation (unknown sections and keys are errors, units, types) is not done here: the
loader validates the merged document exactly as it validates a single file.
``origins`` lets the loader say which file set an offending key.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

__all__ = ["DropinError", "dropin_files", "merge_tomls"]


class DropinError(Exception):
    """A drop-in that cannot be used; ``key`` and ``problem`` as in ConfigError."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def dropin_files(dropin_dir: Path) -> list[Path]:
    """The drop-in files of ``dropin_dir`` in the order they apply (none if it is absent)."""
    try:
        entries = list(dropin_dir.iterdir())
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise DropinError("config", f"{dropin_dir} is not a directory") from None
    except OSError as exc:
        raise DropinError("config", f"cannot read {dropin_dir}: {exc.strerror}") from None
    chosen = [p for p in entries if p.name.endswith(".toml") and not p.name.startswith(".")]
    return sorted(chosen, key=lambda p: p.name.encode("utf-8", "surrogateescape"))


def _merge(base: dict[str, Any], over: dict[str, Any], source: str,
           origins: dict[str, str] | None, prefix: str) -> None:
    for key, value in over.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, source, origins, dotted + ".")
        else:
            base[key] = copy.deepcopy(value)
            if origins is not None:
                _record(origins, dotted, value, source)


def _record(origins: dict[str, str], dotted: str, value: Any, source: str) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _record(origins, f"{dotted}.{key}", inner, source)
    else:
        origins[dotted] = source


def merge_tomls(main: dict[str, Any], dropin_dir: Path,
                origins: dict[str, str] | None = None) -> dict[str, Any]:
    """``main`` (a parsed TOML document) with every drop-in of ``dropin_dir`` merged over it.

    ``main`` is not modified. When ``origins`` is given, it receives ``"section.key"`` ->
    path of the drop-in that set the key last (keys from ``main`` are not recorded).
    """
    merged = copy.deepcopy(main)
    for path in dropin_files(Path(dropin_dir)):
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise DropinError("config", f"cannot read {path}: {exc.strerror}") from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise DropinError("config", f"{path} is not valid TOML: {exc}") from None
        _merge(merged, data, str(path), origins, "")
    return merged
