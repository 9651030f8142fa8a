"""The bus: RAM ring buffers of image slots plus one ImageMetadata message per image.

``ImagePublisher`` writes a channel, ``ImageSubscriber`` reads one; ``RamBuffer`` is the slot
store under both; ``image_metadata`` builds the message for an image of a config.
"""

from stddaq.bus.publisher import ImagePublisher, image_metadata
from stddaq.bus.ram_buffer import BufferLayout, RamBuffer
from stddaq.bus.subscriber import Image, ImageSubscriber

__all__ = ["BufferLayout", "Image", "ImagePublisher", "ImageSubscriber", "RamBuffer", "image_metadata"]
