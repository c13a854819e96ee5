"""The `agentlibos` command line."""

from agentlibos.cli._main import main

__all__ = ["main"]
