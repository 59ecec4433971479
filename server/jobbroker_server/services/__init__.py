"""Broker operations and the background services around the store."""
