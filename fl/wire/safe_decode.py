"""An allowlist of our own in front of ``torch.load`` for authenticated payloads (MODEL, UPDATE).

``torch.load(weights_only=True)`` never runs code, but what it admits is far wider than
what our messages hold: ``bytearray(N)`` and ``Counter(...)`` (a few hundred bytes that
allocate a GiB or hold the GIL for seconds), DEFLATE-compressed zip entries (a 20 KB
payload that inflates to millions of objects), tensor subclasses and tensors with
arbitrary attributes (``_rebuild_from_type_v2``, ``BUILD``: an ``is_floating_point``
attribute shadowed so that validation skips a NaN), Parameters, stride tricks. Messages
only ever hold dicts, lists, tuples, str, int, float, bool, None and plain CPU tensors,
written by ``torch.save`` as uncompressed zip entries, so a payload must pass:

1. ``check_archive``: the zip layout ``torch.save`` writes, parsed here with bounds before
   torch's reader sees it: every entry STORED, local headers matching the central
   directory, records back to back so their sizes add up to the payload's, a bounded
   number of entries with the names ``torch.save`` gives them.
2. ``scan_pickle``: every opcode of ``data.pkl`` from the few ``torch.save`` emits for
   such values (no BUILD, NEWOBJ, bytes, sets), every GLOBAL one of
   ``_rebuild_tensor_v2``, ``OrderedDict`` (the empty backward-hooks argument) and the
   storage classes of real dtypes, and at most ``Limits.tensors`` tensors: each costs the
   unpickler far more than the few pickle bytes that can rebuild one more view of a
   memoized storage.
3. ``torch.load(weights_only=True)``, as before.
4. ``check_tree``: the decoded value is plain containers, bounded in depth and acyclic,
   and each tensor is exactly ``torch.Tensor`` with an empty ``__dict__``, no grad, no
   hooks, a real dtype, and no more elements than the bytes that were sent for it.

A refusal raises ``ProtocolError`` carrying only a message: no exception chain, no frame
that holds the payload or what was decoded from it, so a failed decode frees its memory
at once instead of when (if) the garbage collector finds the cycle.
"""
from __future__ import annotations

import io
import pickletools
import re
import struct
import traceback
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from fl.common.layout import Layout
from fl.common.logs import sanitize
from fl.wire.errors import ProtocolError

# The strict limits, those of the default model (ImprovedCNN, 18 state tensors); a model
# with more tensors gets limits in proportion (``Limits.of``), never fewer than these.
MAX_ENTRIES = 256  # the 8-bit delta of ImprovedCNN has 56 (three tensors per layer)
MAX_PICKLE = 64 * 1024  # its data.pkl is 3.6 KB; the flat float update's 0.4 KB
MAX_NAME = 128
MAX_EXTRA = 1024  # torch.save pads local headers so records are 64-byte aligned
MAX_SMALL_RECORD = 64  # version, byteorder, .format_version, serialization id ...
MAX_DEPTH = 8  # a message nests four deep: body -> delta -> name -> {q, lo, scale}
MAX_TENSORS = 128  # the most a message holds is ImprovedCNN's 8-bit delta: 50


@dataclass(frozen=True)
class Limits:
    """How much one payload may hold: archive entries, tensors built, pickle bytes."""

    entries: int = MAX_ENTRIES
    tensors: int = MAX_TENSORS
    pickle: int = MAX_PICKLE

    @classmethod
    def of(cls, layout: Layout) -> "Limits":
        """Twice what the largest message of a model of this layout holds (its 8-bit
        delta: three tensors per state entry, a record each, about 1 KB of pickle per
        tensor at most), and never below the strict limits."""
        most = 3 * len(layout.entries) + 8
        return cls(max(MAX_ENTRIES, 2 * most + 16), max(MAX_TENSORS, 2 * most), max(MAX_PICKLE, 1024 * most))


STRICT = Limits()

STORAGE_DTYPES = {"Float": torch.float32, "Double": torch.float64, "Half": torch.float16,
                  "BFloat16": torch.bfloat16, "Byte": torch.uint8, "Char": torch.int8,
                  "Short": torch.int16, "Int": torch.int32, "Long": torch.int64, "Bool": torch.bool}
ALLOWED_DTYPES = frozenset(STORAGE_DTYPES.values())
REBUILD = "torch._utils _rebuild_tensor_v2"
ALLOWED_GLOBALS = frozenset({REBUILD, "collections OrderedDict"}
                            | {f"torch {name}Storage" for name in STORAGE_DTYPES})
# What torch.save (pickle protocol 2) writes for dicts, lists, tuples, str, int, float,
# bool, None and tensors; the memo ops only name objects already built.
ALLOWED_OPS = frozenset({
    "PROTO", "STOP", "MARK", "EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "SETITEM", "SETITEMS",
    "APPEND", "APPENDS", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "NONE", "NEWTRUE", "NEWFALSE",
    "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "BINUNICODE", "BINPUT", "LONG_BINPUT",
    "BINGET", "LONG_BINGET", "GLOBAL", "REDUCE", "BINPERSID",
})
_SCALARS = (str, int, float, bool, type(None))

_LOCAL = struct.Struct("<IHHHHHIIIHH")  # local file header, 30 bytes
_DESCRIPTOR = struct.Struct("<IIII")  # data descriptor: signature, crc, sizes
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory header, 46 bytes
_END = struct.Struct("<IHHHHIIH")  # end of central directory, 22 bytes
_END64 = struct.Struct("<IQHHIIQQQQ")  # zip64 end of central directory, 56 bytes
_LOCATOR64 = struct.Struct("<IIQI")  # zip64 end locator, 20 bytes
SIG_LOCAL, SIG_DESCRIPTOR, SIG_CENTRAL = 0x04034B50, 0x08074B50, 0x02014B50
SIG_END, SIG_END64, SIG_LOCATOR64 = 0x06054B50, 0x06064B50, 0x07064B50
FLAG_DESCRIPTOR, FLAG_UTF8 = 0x0008, 0x0800
_NAME = re.compile(r"([A-Za-z0-9_.-]{1,64})/(data\.pkl|\.format_version|\.storage_alignment|byteorder|"
                   r"version|\.data/serialization_id|\.data/version|data/[0-9]{1,9})")


# --- 1. the archive -----------------------------------------------------------------------

def check_archive(view: memoryview, limits: Limits = STRICT) -> memoryview:
    """Check the zip structure of a ``torch.save`` payload; returns a view of ``data.pkl``."""
    total, cd_offset, cd_end = _directory_bounds(view, limits.entries)
    names: dict[str, tuple[int, int]] = {}  # record (lower case) -> (start, size)
    prefix: str | None = None
    pos, cd = 0, cd_offset  # each local record must start where the previous one ended
    for _ in range(total):
        entry, cd = _central_entry(view, cd, cd_end)
        if entry.offset != pos or pos + _LOCAL.size > cd_offset:
            raise ProtocolError("archive entries are not back to back")
        start, end = _local_record(view, pos, entry, cd_offset)
        prefix, record = _record_name(entry.name, prefix, names)
        names[record] = (start, entry.size)
        pos = end
    if cd != cd_end or pos != cd_offset:
        raise ProtocolError("archive entry sizes do not add up to the payload")
    return _pickle_record(view, names, limits.pickle)


class _Entry(NamedTuple):
    """A central directory entry, as far as the local record must repeat it."""

    name: bytes
    flags: int
    crc: int
    size: int  # stored, so compressed and uncompressed sizes are equal
    offset: int


def _directory_bounds(view: memoryview, max_entries: int) -> tuple[int, int, int]:
    """(entries, central directory offset, its end) from the end records at the payload's
    tail, which must describe one disk and no comment, as ``torch.save`` writes them."""
    n = len(view)
    if n < _END.size:
        raise ProtocolError("too short for a torch.save archive")
    sig, disk, cd_disk, count, total, cd_size, cd_offset, comment = _END.unpack_from(view, n - _END.size)
    if sig != SIG_END or disk or cd_disk or comment or count != total:
        raise ProtocolError("not a torch.save archive (no end of central directory at the end)")
    cd_end = n - _END.size
    if cd_end >= _LOCATOR64.size and struct.unpack_from("<I", view, cd_end - _LOCATOR64.size)[0] == SIG_LOCATOR64:
        _, disk, end64, disks = _LOCATOR64.unpack_from(view, cd_end - _LOCATOR64.size)
        cd_end = end64
        if disk or disks != 1 or end64 != n - _END.size - _LOCATOR64.size - _END64.size:
            raise ProtocolError("zip64 locator does not point just before itself")
        sig, size, _, _, disk, cd_disk, count64, total64, size64, offset64 = _END64.unpack_from(view, end64)
        if (sig, size, disk, cd_disk, count64, total64, size64, offset64) != \
                (SIG_END64, _END64.size - 12, 0, 0, count, total, cd_size, cd_offset):
            raise ProtocolError("zip64 end record disagrees with the end of central directory")
    if not 0 < total <= max_entries:
        raise ProtocolError(f"archive of {total} entries (at most {max_entries})")
    if cd_offset + cd_size != cd_end:
        raise ProtocolError("central directory does not end where the end record starts")
    return total, cd_offset, cd_end


def _central_entry(view: memoryview, cd: int, cd_end: int) -> tuple[_Entry, int]:
    """The entry at ``cd`` and where the next one starts: stored, no extras, a short name."""
    if cd + _CENTRAL.size > cd_end:
        raise ProtocolError("central directory overruns its size")
    (sig, _, _, flags, method, _, _, crc, csize, usize, name_len, extra_len, comment_len, disk,
     _, _, offset) = _CENTRAL.unpack_from(view, cd)
    if sig != SIG_CENTRAL:
        raise ProtocolError("bad central directory entry")
    if method != 0:
        raise ProtocolError(f"compressed archive entry (method {method}): only stored entries are accepted")
    if flags & ~(FLAG_DESCRIPTOR | FLAG_UTF8) or csize != usize or extra_len or comment_len or disk:
        raise ProtocolError("archive entry with flags, extra fields or sizes torch.save does not write")
    if not 0 < name_len <= MAX_NAME or cd + _CENTRAL.size + name_len > cd_end:
        raise ProtocolError("archive entry name too long")
    name = bytes(view[cd + _CENTRAL.size:cd + _CENTRAL.size + name_len])
    return _Entry(name, flags, crc, usize, offset), cd + _CENTRAL.size + name_len


def _local_record(view: memoryview, pos: int, entry: _Entry, cd_offset: int) -> tuple[int, int]:
    """(data start, record end) of the local record at ``pos``, which must repeat ``entry``
    (torch's reader trusts the local header, so a disagreement could hide bytes)."""
    lsig, _, lflags, lmethod, _, _, lcrc, lcsize, lusize, lname_len, lextra_len = _LOCAL.unpack_from(view, pos)
    start = pos + _LOCAL.size + lname_len + lextra_len
    if lsig != SIG_LOCAL or lflags != entry.flags or lmethod != 0 or lname_len != len(entry.name) \
            or lextra_len > MAX_EXTRA or bytes(view[pos + _LOCAL.size:pos + _LOCAL.size + lname_len]) != entry.name:
        raise ProtocolError("local header disagrees with the central directory")
    sizes = (entry.crc, entry.size, entry.size)
    end = start + entry.size
    if entry.flags & FLAG_DESCRIPTOR:
        if (lcrc, lcsize, lusize) not in ((0, 0, 0), sizes) or end + _DESCRIPTOR.size > cd_offset \
                or _DESCRIPTOR.unpack_from(view, end) != (SIG_DESCRIPTOR, *sizes):
            raise ProtocolError("data descriptor disagrees with the central directory")
        end += _DESCRIPTOR.size
    elif (lcrc, lcsize, lusize) != sizes:
        raise ProtocolError("local header sizes disagree with the central directory")
    if end > cd_offset:
        raise ProtocolError("archive entry overruns the central directory")
    return start, end


def _record_name(name: bytes, prefix: str | None, names: dict[str, tuple[int, int]]) -> tuple[str, str]:
    """(the archive's folder, the record's name in lower case): a name ``torch.save`` gives,
    in the same folder as the first entry, seen once."""
    match = _NAME.fullmatch(name.decode("latin-1"))
    if match is None:
        raise ProtocolError(f"unexpected archive entry {sanitize(name.decode('latin-1'), 80)!r}")
    if prefix is None:
        prefix = match.group(1)
    record = match.group(2).lower()
    if match.group(1) != prefix or record in names:
        raise ProtocolError(f"duplicate or stray archive entry {sanitize(name.decode('latin-1'), 80)!r}")
    return prefix, record


def _pickle_record(view: memoryview, names: dict[str, tuple[int, int]], max_pickle: int) -> memoryview:
    """``data.pkl``'s bytes, once the small records are small and the byte order is ours."""
    for record, (start, size) in names.items():
        if not record.startswith("data") and size > MAX_SMALL_RECORD:
            raise ProtocolError(f"archive record {record} of {size} bytes")
    if "byteorder" in names:
        start, size = names["byteorder"]
        if bytes(view[start:start + size]) != b"little":
            raise ProtocolError("archive is not little-endian")
    if "data.pkl" not in names:
        raise ProtocolError("archive has no data.pkl")
    start, size = names["data.pkl"]
    if size > max_pickle:
        raise ProtocolError(f"data.pkl of {size} bytes (at most {max_pickle})")
    return view[start:start + size]


# --- 2. the pickle ------------------------------------------------------------------------

def scan_pickle(data: bytes, limits: Limits = STRICT) -> None:
    """Refuse any opcode or GLOBAL outside what ``torch.save`` writes for our messages."""
    if len(data) > limits.pickle:
        raise ProtocolError(f"pickle of {len(data)} bytes (at most {limits.pickle})")
    last = ("", -1)
    failure = None
    tensors = _TensorCount(limits.tensors)
    try:
        for op, arg, pos in pickletools.genops(data):
            tensors.see(op.name, arg)
            if op.name not in ALLOWED_OPS:
                raise ProtocolError(f"pickle opcode {op.name} is not allowed")
            if pos == 0 and (op.name != "PROTO" or arg != 2):
                raise ProtocolError("pickle does not start with protocol 2")
            if op.name == "GLOBAL" and arg not in ALLOWED_GLOBALS:
                raise ProtocolError(f"pickle global {sanitize(arg, 80)!r} is not allowed")
            if op.name == "LONG1" and not -(1 << 63) <= arg < (1 << 63):
                raise ProtocolError("pickle integer wider than 64 bits")
            last = (op.name, pos)
    except ValueError as exc:  # genops: unknown opcode, truncated argument, bad UTF-8
        failure = f"malformed pickle: {sanitize(str(exc), 120)}"
    if failure is not None:
        raise ProtocolError(failure)
    if last != ("STOP", len(data) - 1):
        raise ProtocolError("pickle does not end with STOP at its last byte")


class _TensorCount:
    """Counts the times ``_rebuild_tensor_v2`` is pushed, which bounds the tensors a pickle
    builds: only REDUCE calls, it pops the callable, and no allowed opcode takes one out
    of a container, so each call needs its own push (GLOBAL, or a GET of a memo slot that
    holds it). A PUT stores the top of the stack; every other opcode replaces it."""

    def __init__(self, most: int = MAX_TENSORS) -> None:
        self.most = most
        self.count = 0
        self.slots: set[int] = set()  # memo slots holding the callable
        self.on_top = False

    def see(self, name: str, arg: Any) -> None:
        if name in ("BINPUT", "LONG_BINPUT"):
            (self.slots.add if self.on_top else self.slots.discard)(arg)
            return
        self.on_top = (name == "GLOBAL" and arg == REBUILD) or (name in ("BINGET", "LONG_BINGET") and arg in self.slots)
        self.count += self.on_top
        if self.count > self.most:
            raise ProtocolError(f"pickle builds more than {self.most} tensors")


# --- 4. the decoded value -----------------------------------------------------------------

def check_tree(root: Any) -> None:
    """Plain containers, bounded and acyclic, of scalars and plain CPU tensors whose
    elements were all sent (no stride or view tricks that make a small payload large)."""
    storages: dict[int, int] = {}  # storage address -> bytes
    done: set[int] = set()
    path: set[int] = set()
    logical = 0

    def visit(obj: Any, depth: int) -> None:
        nonlocal logical
        kind = type(obj)
        if kind in _SCALARS:
            return
        if id(obj) in done:
            return  # shared (the memo may hand out one object twice): checked already
        if kind is torch.Tensor:
            logical += _check_tensor(obj, storages)
        elif kind in (dict, list, tuple):
            if depth >= MAX_DEPTH:
                raise ProtocolError(f"message nested deeper than {MAX_DEPTH}")
            if id(obj) in path:
                raise ProtocolError("message contains a cycle")
            path.add(id(obj))
            if kind is dict:
                for key, value in obj.items():
                    if type(key) not in (str, int):
                        raise ProtocolError(f"dict key of type {type(key).__name__}")
                    visit(value, depth + 1)
            else:
                for value in obj:
                    visit(value, depth + 1)
            path.discard(id(obj))
        else:
            raise ProtocolError(f"a {sanitize(kind.__name__, 40)} in a message")
        done.add(id(obj))

    visit(root, 0)
    if logical > sum(storages.values()):
        raise ProtocolError("tensors overlap: more elements than bytes were sent")


def _check_tensor(t: torch.Tensor, storages: dict[int, int]) -> int:
    if t.__dict__:
        raise ProtocolError("tensor with attributes")
    hooks = t._backward_hooks
    if t.requires_grad or not (hooks is None or (type(hooks) is OrderedDict and not hooks)):
        raise ProtocolError("tensor that requires grad or carries hooks")
    if t.layout != torch.strided or t.device.type != "cpu" or t.dtype not in ALLOWED_DTYPES:
        raise ProtocolError(f"tensor of {t.layout}/{t.device.type}/{t.dtype}")
    if t.is_conj() or t.is_neg():
        raise ProtocolError("tensor with conj or neg bit")
    storage = t.untyped_storage()
    nbytes = t.numel() * t.element_size()
    if nbytes > storage.nbytes():
        raise ProtocolError("tensor has more elements than its storage holds")
    storages[storage.data_ptr()] = storage.nbytes()
    return nbytes


# --- all together -------------------------------------------------------------------------

def load(raw: bytes | bytearray | memoryview, limits: Limits = STRICT) -> dict[str, Any]:
    """Decode an untrusted ``torch.save`` payload that must hold a dict (see the module
    docstring) within ``limits``; ``ProtocolError("undecodable payload: ...")`` otherwise."""
    body, reason = _load(raw, limits)
    del raw  # the exception below must not keep the payload alive through this frame
    if reason is not None:
        raise ProtocolError(f"undecodable payload: {reason}")
    return body


def _load(raw: bytes | bytearray | memoryview, limits: Limits) -> tuple[Any, str | None]:
    """(body, None) or (None, reason); never raises, and leaves no frame holding data."""
    try:
        view = memoryview(raw).cast("B")
        scan_pickle(bytes(check_archive(view, limits)), limits)
        body = torch.load(_BufferReader(view), map_location="cpu", weights_only=True)
        if type(body) is not dict:
            return None, f"payload is a {sanitize(type(body).__name__, 40)}, expected a dict"
        check_tree(body)
        return body, None
    except ProtocolError as exc:
        _clear(exc)
        return None, str(exc)
    except Exception as exc:  # torch.load raises many types; all mean "refused"
        _clear(exc)
        return None, _torch_reason(exc)


def _clear(exc: BaseException) -> None:
    """Release the locals of the frames an exception (and its chain) went through: the
    unpickler's stack holds what was decoded so far."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        traceback.clear_frames(cur.__traceback__)
        cur = cur.__cause__ or cur.__context__
        seen += 1


def _torch_reason(exc: Exception) -> str:
    """The informative line of torch.load's long error text (the unpickler's verdict)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    verdict = [ln for ln in lines if "unsupported" in ln.lower()] or [ln for ln in lines if "Unpickler error" in ln]
    return sanitize((verdict or lines or [type(exc).__name__])[0], 200)


# A pickle protocol other than 2 is refused by scan_pickle; torch must not warn about it either.
warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)


class _BufferReader(io.RawIOBase):
    """A seekable read-only file over received bytes. torch.load reads each tensor's record
    straight into its storage (``readinto``); io.BytesIO would first copy a bytearray
    payload whole: a model-sized allocation and a second pass over the bytes."""

    def __init__(self, raw: bytes | bytearray | memoryview) -> None:
        super().__init__()
        self._view = memoryview(raw).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        chunk = self._view[self._pos:self._pos + len(buffer)]
        memoryview(buffer).cast("B")[:len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else self._pos + size
        chunk = bytes(self._view[self._pos:end])
        self._pos += len(chunk)
        return chunk
