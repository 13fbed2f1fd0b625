"""Domain state stored through the store, with an in-memory view for reads."""

from corral.state.state import ConflictError, State

__all__ = ["ConflictError", "State"]
