"""Write agentpost(8) in roff, from the argparse definitions of the `agentpost` command.

Usage: ``python packaging/manpage.py > agentpost.8`` with an interpreter that can
import agentpost (the package build uses the venv's). The synopsis, the global
options and every command with its options come from ``agentpost.cli``; the
environment variables from the config loader; the rest (files, exit status,
signals) is written here. The date is SOURCE_DATE_EPOCH's, so builds repeat.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from agentpost import __version__
from agentpost.cli import _parser
from agentpost.config.loader import ENV_OVERRIDES


def roff(text: str) -> str:
    """Escape text for a roff line (backslashes, hyphens, leading control chars)."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    if text[:1] in (".", "'"):
        text = "\\&" + text
    return text


def option_label(action: argparse.Action) -> str:
    flags = ", ".join(f"\\fB{roff(s)}\\fR" for s in action.option_strings)
    if action.nargs == 0:
        return flags
    metavar = action.metavar or (action.dest.upper() if action.option_strings else action.dest)
    if action.choices:
        metavar = "{" + ",".join(str(c) for c in action.choices) + "}"
    return f"{flags} \\fI{roff(str(metavar))}\\fR"


def describe(action: argparse.Action) -> str:
    text = action.help or ""
    if action.required and action.option_strings:
        text += " (required)"
    elif action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
        text += f" (default: {action.default})"
    return roff(text.strip())


def options_of(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction)]


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {c.dest: c.help or "" for c in action._choices_actions}
            for name, sub in action.choices.items():
                found.append((name, helps.get(name, ""), sub))
    return found


def command_section(lines: list[str], prefix: str, parser: argparse.ArgumentParser) -> None:
    for name, help_text, sub in subcommands(parser):
        full = f"{prefix} {name}".strip()
        usage = " ".join(sub.format_usage().split()[1:])  # drop "usage:"
        lines += [f".SS {roff(full)}", f"{roff(help_text)}.", ".PP",
                  f"\\fBusage:\\fR {roff(usage)}"]
        for action in options_of(sub):
            lines += [".TP", option_label(action), describe(action)]
        command_section(lines, full, sub)


def manpage() -> str:
    parser = _parser()
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))
    date = time.strftime("%Y-%m-%d", time.gmtime(epoch))
    lines = [
        f'.TH AGENTPOST 8 "{date}" "agentpost {__version__}" "System Administration"',
        ".SH NAME",
        "agentpost \\- mail server for AI agents: serve, migrate, check the configuration",
        ".SH SYNOPSIS",
        ".B agentpost",
        "[\\fB\\-\\-config\\fR \\fIFILE\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
        ".br",
        ".B /opt/venvs/agentpost/bin/twistd",
        "\\fB\\-n agentpost\\fR [\\fB\\-\\-config\\fR \\fIFILE\\fR]",
        ".SH DESCRIPTION",
        roff(parser.description or ""),
        "One Twisted process serves the inbound SMTP listener (MX) and the JSON HTTP API",
        "through one authentication and tenancy core. Records live in PostgreSQL,",
        "message bytes in a local directory or an S3\\-compatible bucket.",
        ".PP",
        "On a Debian system the server runs as the \\fBagentpost\\fR user under",
        "\\fBagentpost.service\\fR; run the commands below as that user or as root, for",
        "example \\fBsudo \\-u agentpost agentpost check\\-config\\fR.",
        "\\fBtwistd \\-n agentpost\\fR (the venv's twistd) serves exactly what",
        "\\fBagentpost serve\\fR serves.",
        ".SH OPTIONS",
    ]
    for action in options_of(parser):
        lines += [".TP", option_label(action), describe(action)]
    lines += [".TP", "\\fB\\-h\\fR, \\fB\\-\\-help\\fR",
              "Show a summary of the options (of a command, after the command) and exit."]
    lines.append(".SH COMMANDS")
    command_section(lines, "", parser)
    lines += [
        ".SH CONFIGURATION",
        "The configuration is TOML: \\fB\\-\\-config\\fR, else \\fB$AGENTPOST_CONFIG\\fR",
        "(the unit sets \\fI/etc/agentpost/agentpost.toml\\fR). The files in",
        "\\fIconf.d/\\fR beside it named \\fI*.toml\\fR are applied over it in name order,",
        "key by key, a later file winning. Unknown sections and keys are errors;",
        "durations and sizes need units (\\fB30s\\fR, \\fB90d\\fR, \\fB10MiB\\fR).",
        "\\fBagentpost sample\\-config\\fR prints every key with its documentation.",
        ".SH ENVIRONMENT",
        ".TP", "\\fBAGENTPOST_CONFIG\\fR",
        "The configuration file, when \\fB\\-\\-config\\fR is not given.",
    ]
    for var, (section, key) in sorted(ENV_OVERRIDES.items()):
        lines += [".TP", f"\\fB{roff(var)}\\fR",
                  f"Overrides \\fB{roff(section)}.{roff(key)}\\fR of the configuration files."]
    lines += [
        ".TP", "\\fBNOTIFY_SOCKET\\fR",
        "Set by systemd for \\fBType=notify\\fR: the server reports READY once every",
        "listener is bound, RELOADING/READY around a reload and STOPPING at shutdown.",
        ".SH FILES",
        ".TP", "\\fI/etc/agentpost/agentpost.toml\\fR",
        "The main configuration (a conffile).",
        ".TP", "\\fI/etc/agentpost/conf.d/*.toml\\fR",
        "Drop\\-ins: the ones the package wrote at installation (host name, TLS, database)",
        "and yours. Mode 0640, group agentpost: they may hold secrets.",
        ".TP", "\\fI/etc/agentpost/tls/\\fR",
        "The self\\-signed certificate and key made at installation, until you configure",
        "a real one.",
        ".TP", "\\fI/etc/default/agentpost\\fR",
        "Optional environment for the service (secrets such as",
        "\\fBAGENTPOST_DATABASE_URL\\fR); keep it mode 0600.",
        ".TP", "\\fI/var/lib/agentpost/\\fR",
        "State, including the local blob store \\fIblobs/\\fR (message bytes).",
        ".TP", "\\fI/opt/venvs/agentpost/\\fR",
        "The program and its pinned Python dependencies.",
        ".SH EXIT STATUS",
        ".TP", "\\fB0\\fR", "Success.",
        ".TP", "\\fB1\\fR",
        "A runtime failure (database unreachable, a port already in use, ...).",
        ".TP", "\\fB2\\fR",
        "A configuration or usage error; the message names the offending key. systemd",
        "does not restart the service after it (\\fBRestartPreventExitStatus=2\\fR).",
        ".SH SIGNALS",
        ".TP", "\\fBSIGTERM\\fR, \\fBSIGINT\\fR",
        "Stop listening, finish writing the audit trail, close the database, exit.",
        ".TP", "\\fBSIGHUP\\fR",
        "Reload the TLS certificate and key (\\fBsystemctl reload agentpost\\fR); open",
        "connections keep theirs, new ones use the new files.",
        ".SH SEE ALSO",
        "\\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1), \\fBtwistd\\fR(1),",
        "\\fI/usr/share/doc/agentpost/README.Debian\\fR,",
        "\\fI/usr/share/doc/agentpost/operations.md.gz\\fR",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(manpage())
