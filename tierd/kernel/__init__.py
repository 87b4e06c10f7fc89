"""The only code in tierd that touches /sys, /proc, udev or syscalls.

Everything here takes a root (``SysFS(root)``, ``ProcFS(root)``) or an injectable object, so the rest of tierd
is pure and runs unchanged on the live system, on fixture trees under tests/fixtures, and inside the QEMU guest.
"""
