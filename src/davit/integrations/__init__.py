"""Integrations with other libraries' models (import each submodule explicitly; none is imported here)."""
