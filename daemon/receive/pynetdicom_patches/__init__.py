"""Replacements of pynetdicom internals for the receive path, installed by one :func:`install`.
"""
