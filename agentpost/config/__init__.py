"""Configuration: TOML files validated against the section declarations."""

from agentpost.config.loader import Config, ConfigError, load_config, render_sample

__all__ = ["Config", "ConfigError", "load_config", "render_sample"]
