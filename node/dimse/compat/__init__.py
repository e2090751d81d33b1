"""The one place that touches pynetdicom's internals, behind a version check.

modelnode replaces or reads private names of pynetdicom (its DUL and association reactors, the
C-STORE message path, the receive-file factory, the per-association copy of the contexts). Those
names are not part of pynetdicom's API and may change in any release, so:

* setup.cfg pins pynetdicom to :data:`guard.PYNETDICOM_VERSION`, the version these patches were
  written and measured against;
* :func:`guard.check` runs before anything is patched and refuses to start, naming the
  version and the attribute, when the installed pynetdicom differs (a forced install, a
  distribution package) or lacks one of the names.
"""

from node.dimse.compat.guard import PYNETDICOM_VERSION, IncompatibleLibrary, check

__all__ = ["PYNETDICOM_VERSION", "IncompatibleLibrary", "check"]
