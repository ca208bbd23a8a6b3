"""The configuration: one YAML file, validated before anything starts.

Enters: a YAML path (or the embedded default, ``daemon/config/defaults/bonebridge.yaml``). Leaves: a validated
:class:`daemon.config.schema.Config` read by every stage, or :class:`~daemon.config.schema.ConfigError` with file,
line and field per problem. :func:`~daemon.config.schema.load_config` takes a file along the modules in the order
data flows: :mod:`~daemon.config.yaml_lines` (the YAML and the line of every key), :mod:`~daemon.config.schema`
(the pydantic models; paths read by :mod:`~daemon.config.values`), :mod:`~daemon.config.messages` (pydantic's
errors in words, at the file's locations), :mod:`~daemon.config.cross_checks` (sections against each other, on the
plain data), :mod:`~daemon.config.issues` (``FILE:LINE: FIELD: message``). :mod:`~daemon.config.cards` reads model
cards as plain JSON (no torch); :mod:`~daemon.config.check` is ``bonebridge config check``.
"""
