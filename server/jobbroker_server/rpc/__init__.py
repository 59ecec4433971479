"""The gRPC edge: a thin servicer, pb <-> domain conversion, error -> status."""
