"""Wire formats and codecs: pure encode/decode functions, no sockets, no logging."""
