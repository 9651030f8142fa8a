"""One module per service: a ``Service`` subclass with start/run/stop/close and ``main(argv)``."""
