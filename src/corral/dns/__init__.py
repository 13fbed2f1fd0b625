"""Consul-compatible DNS interface to the service catalog."""
