"""Probe sets: the folder format, streamed folders, hostile-file reading, the digest, the transform.

``from audit.probes import ProbeSet`` is the public entry; the rest lives in
:mod:`audit.probes.probe_set` and :mod:`audit.probes.transform`.
"""

from audit.probes.probe_set import ProbeFolder, ProbeSet, ProbeSetError
from audit.probes.transform import ProbeTransform

__all__ = ["ProbeSet", "ProbeFolder", "ProbeSetError", "ProbeTransform"]
