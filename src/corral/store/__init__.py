"""The revisioned store and its backends."""

from corral.store.base import (
    Compare,
    CompareOp,
    CompareTarget,
    CompactedError,
    Delete,
    Event,
    EventType,
    Get,
    KeyValue,
    Put,
    Store,
    StoreError,
    TxnResult,
)
from corral.store.sqlite import SQLiteStore

__all__ = [
    "Compare",
    "CompareOp",
    "CompareTarget",
    "CompactedError",
    "Delete",
    "Event",
    "EventType",
    "Get",
    "KeyValue",
    "Put",
    "SQLiteStore",
    "Store",
    "StoreError",
    "TxnResult",
]
