"""twistd integration: `twistd -n agentpost --config FILE` builds the same service as
`agentpost serve`."""

from __future__ import annotations

import sys
from typing import Any

from twisted.application import service
from twisted.python import usage

from agentpost.config import ConfigError, load_config


class Options(usage.Options):
    """Command-line options for the twistd plugin."""

    optParameters = [["config", "c", None, "Path to the TOML configuration file."]]


def makeService(options: Options) -> service.IService:
    """Load and validate the config, then build the root service."""
    from twisted.internet import reactor

    from agentpost.app import make_service
    from agentpost.logs import configure_logging

    try:
        config = load_config(options["config"])
    except ConfigError as exc:
        sys.stderr.write(f"agentpost: configuration error: {exc}\n")
        raise SystemExit(2) from None
    configure_logging(config.logging.level, twisted_to_stderr=False)
    return make_service(config, reactor, argv=serve_argv(config))


def serve_argv(config: Any) -> list[str]:
    """How a worker copy of this process is started (the environment is inherited)."""
    from_file = not config.source.startswith("<")
    return ["-m", "agentpost.cli", *(["--config", config.source] if from_file else []),
            "serve"]


def run_service(config: Any) -> int:
    """Serve in the foreground until SIGINT/SIGTERM (what `agentpost serve` does)."""
    from twisted.internet import reactor

    from agentpost.app import make_service

    root = make_service(config, reactor, argv=serve_argv(config))
    reactor.callWhenRunning(root.startService)
    reactor.addSystemEventTrigger("before", "shutdown", root.stopService)
    reactor.run()
    svc = root.getServiceNamed("agentpost")
    return 1 if getattr(svc, "start_error", None) is not None else 0
