"""proxyd: a supervised host daemon for QEMU's 9p proxy filesystem driver."""

__version__ = "0.1.0"
