"""Cicada shared library: message contracts, bus, settings, logging and errors."""
