"""The only package with SQL: one store contract, one schema, one module per dialect."""

from jobbroker_server.store.base import Store
from jobbroker_server.store.open import open_store

__all__ = ["Store", "open_store"]
