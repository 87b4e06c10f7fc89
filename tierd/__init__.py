"""tierd: a memory-tiering daemon for CXL, PMEM and other specific-purpose memory."""

__version__ = "0.1.0"
