"""The hash-chained event log (the source of truth) and the projections rebuilt from it.

Everything here is public through this module; the underscored modules are private.
"""

from agentlibos.storage._canonical import canonical, digest
from agentlibos.storage._log import (
    ENTRY_VERSION,
    NO_PAYLOAD,
    ZERO_HASH,
    LogBackend,
    LogEntry,
    RetentionPolicy,
    VerifyReport,
)
from agentlibos.storage._sqlite import SCHEMA_VERSION, SQLiteLog

__all__ = [
    "ENTRY_VERSION",
    "NO_PAYLOAD",
    "SCHEMA_VERSION",
    "ZERO_HASH",
    "LogBackend",
    "LogEntry",
    "RetentionPolicy",
    "SQLiteLog",
    "VerifyReport",
    "canonical",
    "digest",
]
