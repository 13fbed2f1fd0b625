"""The server side that turns jobs into tasks on agents."""
