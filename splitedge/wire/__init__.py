"""The wire layer: how the two halves talk, and nothing about models.

=============  ==============================================================
``protocol``   message types, their JSON schemas and the multipart framing
``transport``  ZeroMQ sockets, endpoints, size limits (no message meaning)
``security``   CURVE keys and their files, ``splitedge keys``
``shaping``    the emulated access link (rate, delay, loss) of one client
=============  ==============================================================

It sits at the bottom with ``splitedge.codecs``: it imports nothing of export, the
runtimes, profiles, ``splitedge.lab`` or the CLIs (``tests/test_layers.py`` checks it).
"""
