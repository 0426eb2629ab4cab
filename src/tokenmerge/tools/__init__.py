"""The instruments beside the library: the ``tokenmerge`` command (``generate``, ``demo``, ``eval``, ``bench``), the
maps, the tiny models. They import the library; the library never imports them.

``options`` (argument types and names), ``runtime`` (device, dtype, sync, pipeline loading) and ``reports`` (tables
and files) are shared by the commands.
"""
