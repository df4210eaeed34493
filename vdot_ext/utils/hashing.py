"""Content hashes of config-like objects (cache keys, stage markers)."""
import hashlib
import json


def stable_hash(obj) -> str:
    """SHA-256 of ``obj`` as canonical JSON (sorted keys; non-JSON values by
    ``str``). Equal configs give equal hashes across processes and runs."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(',', ':'))
    return hashlib.sha256(text.encode()).hexdigest()
