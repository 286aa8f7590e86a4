"""The wire layer: how the two halves talk, and nothing about models.

=============  ==============================================================
``protocol``   message types, their JSON schemas, builders and the multipart framing
``channel``    the edge's requests: ids, the one reply-matching rule, retries, pings
``transport``  ZeroMQ sockets, endpoints, size limits (no message meaning)
``security``   CURVE keys and their files, ``splitedge keys``
``shaping``    the emulated access link (rate, delay, loss) of one client
=============  ==============================================================

It sits at the bottom with ``splitedge.codecs``: it imports nothing of export, the
runtimes, profiles, ``splitedge.lab`` or the CLIs (``tests/test_layers.py`` checks it).
"""
