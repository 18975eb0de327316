"""Command-line entry points of mmseg_proto (``python -m mmseg_proto.tools.X``)."""
