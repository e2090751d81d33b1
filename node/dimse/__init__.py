"""The DIMSE service: the pynetdicom AE, association state, the SCP handlers, statuses and UIDs.

Everything that depends on pynetdicom's private modules lives in :mod:`node.dimse.compat`.
"""
