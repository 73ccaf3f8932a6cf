"""The training job and the user tools of distopt (``distopt train|compare|memory|list``).

This package imports :mod:`distopt`; the library never imports it.
"""
