"""SparseRL-Sync: lossless sparse patches of policy weights in the dtype the rollout runs in.

    enc = PatchEncoder(torch.bfloat16)
    full = enc.snapshot(0, trainer_weights)        # every tensor dense: first sync, late joiners
    patch, stats = enc.patch(1, trainer_weights)   # after an optimizer step: only what changed, base 0 -> 1
    apply(patch, rollout_tensors, base=0)          # scatter in place, then verify the checksum

Design decisions (formulas in ALGORITHMS.md, "SparseRL-Sync"):
- Changes are found by comparing the **bits** of the cast weights (integer views): ``!=`` on floats
  would call +0 and -0 equal and NaN always changed. The reference is the image last *published*, so a
  patch holds the union of the changes of every optimizer step since (minus elements that came back to
  the published bits, which need no update).
- A patch carries **new values**, not deltas: applying is a pure scatter, idempotent, bit-exact.
  ``values="xor"`` sends new XOR old bits instead (still exact integer arithmetic, no float deltas):
  a one-ulp change leaves only low bits set, so the value section compresses far better, at the cost
  of idempotence; such a patch applies only to a base whose checksum it names (``apply`` insists).
- Per tensor, the smaller of: sparse (sorted indices as uint16 gaps, the rare gap >= 2**16 carried as an
  exception, plus the new values) or dense (the whole tensor). Tensors with no change are left out.
- Packing: all tensors share one value section and one gap section, so a patch is a handful of buffers
  whatever the number of tensors. Each section is byte-shuffled (the high bytes of bf16 values and of
  gaps are nearly constant) and zstd-compressed when that saves at least ``MIN_SAVING``.
- Every blob names its base version (None for a full snapshot) and the xxh3-128 checksum of the whole
  result (names, shapes and bits of every tensor, sorted by name). ``apply`` validates everything it
  can before writing, and checks the checksum after: a mismatch means the tensors must not serve until
  a full snapshot replaces them (``PatchError.dirty`` says whether anything was written).

Blob layout: ``MAGIC | u32 header length | header JSON | sections``; the header lists the tensors
(name, shape, kind, changed count) and each section's offset, stored and raw length and codec.
"""

from __future__ import annotations

import json
import struct
import time
import warnings

import numpy as np
import pyarrow as pa
import torch
import xxhash

MAGIC = b"RLSP\x01"
MIN_SAVING = 0.1  # compress a section only when it shrinks by at least this fraction
GAP_BITS = 16  # gaps are stored in uint16; larger ones go to the exception lists
_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PatchError(ValueError):
    """A blob that cannot be applied: wrong base, wrong model, corrupted, or a failed checksum."""

    def __init__(self, message: str, dirty: bool = False):
        super().__init__(message)
        self.dirty = dirty  # True: some tensors were already written and must be replaced by a full snapshot


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The flat integer view of a tensor's elements (same bytes)."""
    return t.reshape(-1).view(_INT[t.element_size()])


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """xxh3-128 over every tensor's name, shape, dtype and bytes, in name order."""
    h = xxhash.xxh3_128()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{tuple(t.shape)}|{dtype_name(t.dtype)}|".encode())
        h.update(memoryview(_bits(t.detach()).cpu().numpy()).cast("B"))
    return h.hexdigest()


# ---------------------------------------------------------------- encoding (trainer side)
class PatchEncoder:
    """The working-dtype image of the last published version, and the patches away from it.

    Memory: one copy of the weights in the working dtype (the image), plus one patch being built.
    """

    def __init__(self, dtype: torch.dtype, compress: bool = True, values: str = "new"):
        if values not in ("new", "xor"):
            raise ValueError(f"values={values!r}: choose 'new' (pure scatter) or 'xor' (smaller)")
        self.dtype = dtype
        self.compress = compress
        self.values = values
        self.image: dict[str, torch.Tensor] = {}  # name -> [n] working-dtype values, as last published
        self.version: int | None = None
        self.checksum: str | None = None

    @property
    def dense_bytes(self) -> int:
        """Bytes of the whole image: what a dense transfer of these weights would send."""
        return sum(t.numel() for t in self.image.values()) * self.dtype.itemsize

    def snapshot(self, version: int, weights: dict[str, torch.Tensor] | None = None) -> bytes:
        """A full snapshot of ``weights`` (cast), which becomes the image; None: of the current image."""
        if weights is not None:
            self.image = {k: self._cast(v) for k, v in sorted(weights.items())}
            self.version, self.checksum = version, checksum(self.image)
        if version != self.version:
            raise ValueError(f"snapshot of version {version} asked of an image at version {self.version}")
        return _pack(None, None, version, self.dtype, self.checksum,
                     [(k, tuple(v.shape), None, _bits(v)) for k, v in self.image.items()], self.compress, "new")

    def patch(self, version: int, weights: dict[str, torch.Tensor]) -> tuple[bytes, dict]:
        """The patch from the image's version to ``weights`` (cast); the image moves to ``version``."""
        if self.version is None:
            raise ValueError("no base: publish a snapshot first")
        if weights.keys() != self.image.keys():
            raise ValueError(f"weights changed names since the snapshot: "
                             f"{sorted(weights.keys() ^ self.image.keys())[:5]}")
        t0 = time.perf_counter()
        entries, changed, total = [], 0, 0
        for name in self.image:
            new = self._cast(weights[name])
            new_bits, old_bits = _bits(new), _bits(self.image[name])
            idx = (new_bits != old_bits).nonzero().squeeze(1)  # [c] int64, ascending
            total += new_bits.numel()
            if idx.numel():
                changed += idx.numel()
                entries.append((name, tuple(new.shape), idx, new_bits if self.values == "new" else new_bits ^ old_bits))
                self.image[name] = new
        base, base_sum, self.version = self.version, self.checksum, version
        self.checksum = checksum(self.image)
        blob = _pack(base, base_sum, version, self.dtype, self.checksum, entries, self.compress, self.values)
        size = self.dtype.itemsize
        return blob, {"changed": changed, "elements": total, "density": changed / max(total, 1),
                      "bytes": len(blob), "dense_bytes": self.dense_bytes,
                      "int32_bytes": changed * (size + 4),  # flat int32 indices + values, uncompressed
                      "encode_s": time.perf_counter() - t0}

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device="cpu", dtype=self.dtype, copy=True).contiguous()


def _pack(base: int | None, base_sum: str | None, version: int, dtype: torch.dtype, digest: str, entries: list,
          compress: bool, values_kind: str) -> bytes:
    """entries: (name, shape, idx [c] int64 or None for dense, bits [n]: integer view of the new values or of new ^ old)."""
    size = dtype.itemsize
    tensors, values, gaps, exc_pos, exc_hi, num_gaps = [], [], [], [], [], 0
    for name, shape, idx, bits in entries:
        n = bits.numel()
        if idx is None or idx.numel() * (size + GAP_BITS // 8) >= n * size:  # dense is no bigger
            tensors.append([name, list(shape), "dense", n])
            values.append(bits.numpy())
            continue
        tensors.append([name, list(shape), "sparse", idx.numel()])
        values.append(bits[idx].numpy())
        g = torch.diff(idx, prepend=idx.new_zeros(1))  # first gap is the first index
        big = (g >> GAP_BITS).nonzero().squeeze(1)
        if big.numel():
            exc_pos.append((big + num_gaps).numpy())
            exc_hi.append((g[big] >> GAP_BITS).numpy())
        gaps.append((g & 0xFFFF).to(torch.int32).numpy().astype(np.uint16))
        num_gaps += g.numel()
    sections = {"values": _join(values, np.dtype(f"int{8 * size}")), "gaps": _join(gaps, np.uint16),
                "exc_pos": _join(exc_pos, np.int64), "exc_hi": _join(exc_hi, np.int64)}
    header = {"base": base, "base_checksum": base_sum, "version": version, "dtype": dtype_name(dtype), "checksum": digest,
              "values": values_kind,
              "tensors": tensors, "sections": {}}
    body, offset = [], 0
    for name, arr in sections.items():
        stored, codec = _encode_section(arr, compress)
        header["sections"][name] = [offset, len(stored), arr.nbytes, codec, arr.itemsize]
        body.append(stored)
        offset += len(stored)
    head = json.dumps(header).encode()
    return b"".join([MAGIC, struct.pack("<I", len(head)), head, *body])


def _join(parts: list, dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _encode_section(arr: np.ndarray, compress: bool) -> tuple[bytes, str | None]:
    raw = np.ascontiguousarray(arr).view(np.uint8)
    if not compress or raw.size < 4096:
        return raw.tobytes(), None
    shuffled = raw.reshape(-1, arr.itemsize).T.copy()  # byte planes: high bytes compress well
    packed = pa.Codec("zstd", compression_level=1).compress(shuffled)
    if packed.size > (1 - MIN_SAVING) * raw.size:
        return raw.tobytes(), None
    return packed.to_pybytes(), "zstd+shuffle"


def _decode_section(blob: memoryview, start: int, spec: list, dtype) -> np.ndarray:
    offset, stored, raw_len, codec, itemsize = spec
    data = blob[start + offset: start + offset + stored]
    if len(data) != stored:
        raise PatchError(f"blob truncated: section needs {stored} bytes at {offset}, has {len(data)}")
    if codec is None:
        raw = np.frombuffer(data, dtype=np.uint8)
    elif codec == "zstd+shuffle":
        try:
            planes = np.frombuffer(pa.Codec("zstd").decompress(data, decompressed_size=raw_len), dtype=np.uint8)
        except (OSError, pa.ArrowException) as e:
            raise PatchError(f"corrupted section: {e}") from e
        raw = planes.reshape(itemsize, -1).T.reshape(-1).copy()
    else:
        raise PatchError(f"unknown section codec {codec!r}")
    if raw.size != raw_len:
        raise PatchError(f"section decodes to {raw.size} bytes, header says {raw_len}")
    return raw.view(dtype)


# ---------------------------------------------------------------- decoding (rollout side)
def read_header(blob) -> tuple[dict, int]:
    """(header, offset of the first section); PatchError if this is not a patch blob."""
    blob = memoryview(blob)
    if bytes(blob[: len(MAGIC)]) != MAGIC or len(blob) < len(MAGIC) + 4:
        raise PatchError("not a weight patch (bad magic)")
    (length,) = struct.unpack_from("<I", blob, len(MAGIC))
    start = len(MAGIC) + 4 + length
    try:
        header = json.loads(bytes(blob[len(MAGIC) + 4: start]))
    except ValueError as e:
        raise PatchError(f"corrupted patch header: {e}") from e
    return header, start


def apply(blob, tensors: dict[str, torch.Tensor], base: int | None, base_checksum: str | None = None) -> dict:
    """Write ``blob`` into ``tensors`` (contiguous, in the blob's dtype) and verify the checksum.

    ``base``, ``base_checksum``: the version ``tensors`` hold now and its checksum (as verified when it
    was applied). A patch made from another base (version, or the same number from another lineage, as
    after a trainer restart) is refused before any write. A full snapshot applies whatever the base.
    Returns the header. Raises PatchError.
    """
    blob = memoryview(blob)
    header, start = read_header(blob)
    if header["base"] is not None and header["base"] != base:
        raise PatchError(f"patch {header['base']} -> {header['version']} does not apply to version {base}")
    if header["base"] is not None and base_checksum is not None and header["base_checksum"] != base_checksum:
        raise PatchError(f"patch {header['base']} -> {header['version']} was made from other weights than "
                         f"this replica's version {base} (another lineage: was the trainer restarted?)")
    xor = header.get("values") == "xor"
    if xor and base_checksum is None:
        raise PatchError("an xor patch applies only to a base of known checksum: pass base_checksum")
    dtype = DTYPES.get(header["dtype"])
    plan = _plan(header, tensors, dtype)
    int_t = _INT[dtype.itemsize]
    np_int = np.dtype(f"int{8 * dtype.itemsize}")
    secs = header["sections"]
    values = _decode_section(blob, start, secs["values"], np_int)
    gaps = _decode_section(blob, start, secs["gaps"], np.uint16).astype(np.int64)
    gaps[_decode_section(blob, start, secs["exc_pos"], np.int64)] += \
        _decode_section(blob, start, secs["exc_hi"], np.int64) << GAP_BITS
    scatters, v_at, g_at = [], 0, 0
    for (name, _, kind, count), target in plan:
        vals = values[v_at: v_at + count]
        v_at += count
        if len(vals) != count:
            raise PatchError(f"value section too short for tensor {name!r}")
        if kind == "dense":
            scatters.append((target, None, vals))
            continue
        idx = np.cumsum(gaps[g_at: g_at + count])
        g_at += count
        if len(idx) != count or (count and idx[-1] >= target.numel()):
            raise PatchError(f"indices of tensor {name!r} out of range: corrupted patch")
        scatters.append((target, idx, vals))
    if v_at != len(values) or g_at != len(gaps):
        raise PatchError("sections longer than the tensors listed: corrupted patch")
    with warnings.catch_warnings():  # arrays over received buffers are read-only; they are only read here
        warnings.simplefilter("ignore", UserWarning)
        for target, idx, vals in scatters:
            flat = target.view(-1).view(int_t)
            src = torch.from_numpy(vals).to(flat.device)
            if idx is None:
                flat.bitwise_xor_(src) if xor else flat.copy_(src)
            else:
                at = torch.from_numpy(idx).to(flat.device)
                flat[at] = flat[at] ^ src if xor else src
    got = checksum(tensors)
    if got != header["checksum"]:
        raise PatchError(f"weights after {'snapshot' if header['base'] is None else 'patch'} "
                         f"{header['base']} -> {header['version']} fail their checksum "
                         f"({got} != {header['checksum']})", dirty=True)
    return header


def _plan(header: dict, tensors: dict[str, torch.Tensor], dtype) -> list:
    if dtype is None:
        raise PatchError(f"unknown dtype {header['dtype']!r} in patch")
    names = {t[0] for t in header["tensors"]}
    if header["base"] is None and names != tensors.keys():
        raise PatchError(f"snapshot does not match the model: missing {sorted(tensors.keys() - names)[:5]}, "
                         f"unexpected {sorted(names - tensors.keys())[:5]}")
    plan = []
    for entry in header["tensors"]:
        name, shape = entry[0], tuple(entry[1])
        target = tensors.get(name)
        if target is None or tuple(target.shape) != shape:
            raise PatchError(f"tensor {name!r} {shape} is not in the model with that shape")
        if target.dtype != dtype or not target.is_contiguous():
            raise PatchError(f"tensor {name!r} is {target.dtype} (contiguous={target.is_contiguous()}); "
                             f"the publisher sends {header['dtype']}: set the rollout dtype and the sync dtype alike")
        plan.append((entry, target))
    return plan
