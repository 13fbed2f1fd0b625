"""The agent's building blocks: task processes, health checks and resource detection."""
