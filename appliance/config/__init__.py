"""Configuration files: network topologies and per-node configurations."""
