"""stddaq: the data presentation and interface layer of PSI's std_daq, in Python."""

__version__ = "0.1.0"
