"""The Python API: an embedded runtime (kernel, bus and process host in one Python process)."""

from agentlibos.runtime._runtime import Exit, Grant, Runtime

__all__ = ["Exit", "Grant", "Runtime"]
