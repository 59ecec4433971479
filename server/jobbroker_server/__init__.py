"""The jobbroker server: ``broker serve`` and the operator CLI."""
