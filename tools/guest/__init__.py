"""Helpers for the QEMU guest proving ground (tools/guest.py): topology data, guest-side CXL sequences."""
