"""Inference: decoding (``decode``, over the jitted ``programs``), the gist cache
(``gist_cache``: compression and decoding from it) and its files (``store``)."""
