"""The teacher cache: its on-disk format and reader (``format``) and the command that writes it (``build``)."""
