"""Generated from protos/jobbroker/v1 by scripts/gen-protos; do not edit."""
