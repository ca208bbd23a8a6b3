"""The configuration: one YAML file, validated before anything starts.

Enters: a YAML path (or the embedded default, ``daemon/config/defaults/bonebridge.yaml``). Leaves: a validated
:class:`daemon.config.schema.Config` read by every stage, or :class:`~daemon.config.schema.ConfigError` with file,
line and field per problem. :mod:`~daemon.config.cards` reads model cards as plain JSON (no torch);
:mod:`~daemon.config.check` is ``bonebridge config check``.
"""
