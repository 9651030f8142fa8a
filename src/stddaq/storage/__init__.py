"""Files of recordings: the HDF5 layout of writers, the Meta file and the merged master file."""

from stddaq.storage.hdf5 import ImageFile, MetadataFile, write_master

__all__ = ["ImageFile", "MetadataFile", "write_master"]
