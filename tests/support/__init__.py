"""What the tests share: real servers (``servers``), real encoded media (``media``), and the
in-process reference decoding (``clips``)."""
