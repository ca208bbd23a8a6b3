"""Stage 1, receive: the DICOM listener and the spool.

Enters: associations from modalities and the PACS (A-ASSOCIATE, C-ECHO, C-STORE), checked against
``listener.allowed_callers``. Leaves: one :class:`daemon.receive.spool.InstanceEvent` per instance, handed to the
assembler only once its file is fsynced and renamed into ``data_dir/incoming/<study>/<sop>.dcm``, so *Success*
means "safe on disk". Our own SR/SC routed back are recognised (:mod:`daemon.output.own_output`) and set aside in
``data_dir/returned/``. :mod:`daemon.receive.pynetdicom_patches` holds the pynetdicom replacements (one
``install()``, version-checked) that stream data sets straight to the spool file.
"""
