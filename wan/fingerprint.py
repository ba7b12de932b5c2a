"""Which base model a fine-tuned file was trained over: a fingerprint of a model folder's
weights that is cheap to take.

It hashes, for every tensor by name (whichever file of the folder holds it), its dtype,
its shape and the first and last SAMPLE_BYTES bytes of its data: about 150 KB of the 7 GB
base model, read in a fraction of a second. Training changes nearly every element of what
it trains (AdamW moves them all), so two checkpoints that differ by any training, in any
tensor, differ in the fingerprint; a hash over the file headers alone would not (they
hold only names, dtypes, shapes and offsets, the same for every checkpoint of the model).
The same weights stored in another dtype give another fingerprint too: the scripts'
IGNORE_BASE_FINGERPRINT setting is for such a copy.
"""

import hashlib
import json
import struct
from pathlib import Path

from wan.loading import CheckpointError, find_weight_files

SAMPLE_BYTES = 64
MAX_HEADER_BYTES = 100 * 1024 * 1024  # what the safetensors library itself accepts
FINGERPRINT_KEY = "base_fingerprint"   # the metadata entry of the files the trainer writes


def weights_fingerprint(located: dict[str, Path]) -> str:
    """16 hex digits over every tensor of {name: file}: its dtype, shape, and the first and
    last SAMPLE_BYTES bytes of its data."""
    entries = {}
    for path in sorted(set(located.values())):
        try:
            with open(path, "rb") as f:
                (header_bytes,) = struct.unpack("<Q", f.read(8))
                if header_bytes > MAX_HEADER_BYTES:
                    raise ValueError(f"a header of {header_bytes:,} bytes")
                header = json.loads(f.read(header_bytes))
                start = 8 + header_bytes
                for name, info in header.items():
                    if name == "__metadata__" or located.get(name) != path:
                        continue
                    begin, end = (int(offset) for offset in info["data_offsets"])
                    f.seek(start + begin)
                    head = f.read(min(SAMPLE_BYTES, end - begin))
                    f.seek(start + max(begin, end - SAMPLE_BYTES))
                    tail = f.read(min(SAMPLE_BYTES, end - begin))
                    entries[name] = (str(info["dtype"]), list(info["shape"]), head, tail)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as error:
            raise CheckpointError(f"{path}: cannot read its header and data to fingerprint it ({error}); the "
                                  "file may be incomplete") from None
    digest = hashlib.sha256()
    for name in sorted(entries):
        dtype, shape, head, tail = entries[name]
        digest.update(f"{name}|{dtype}|{shape}|".encode())
        digest.update(head + b"|" + tail + b"\n")
    return digest.hexdigest()[:16]


def model_fingerprint(model_dir) -> str:
    """The fingerprint of a model folder's weights (see weights_fingerprint)."""
    return weights_fingerprint(find_weight_files(Path(model_dir)))
