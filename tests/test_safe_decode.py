"""The allowlist in front of torch.load: each attack crafted for real, shown to work against
bare ``torch.load(weights_only=True)`` where that is cheap to show, and shown refused by
``safe_decode.load`` quickly, without a large allocation, and without keeping anything alive."""
from __future__ import annotations

import gc
import io
import struct
import time
import tracemalloc
import weakref
import zipfile
from collections import OrderedDict

import pytest
import torch
from updates import update_message

from fl.common.layout import Layout
from fl.learning.model import ImprovedCNN
from fl.learning.quantization import quantize_state, state_delta
from fl.wire import safe_decode
from fl.wire.errors import ProtocolError
from fl.wire.frames import encode_payload
from fl.wire.safe_decode import MAX_DEPTH, MAX_ENTRIES, MAX_PICKLE, MAX_TENSORS, check_tree, load

# --- crafting -----------------------------------------------------------------------------

def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def archive(pkl: bytes, storages: dict[str, bytes] | None = None) -> bytes:
    """A hand-written pickle in the exact zip layout torch.save writes (its own writer)."""
    buf = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(buf, True, 64)
    writer.write_record("data.pkl", pkl, len(pkl))
    writer.write_record("byteorder", b"little", 6)
    for key, data in (storages or {}).items():
        writer.write_record(f"data/{key}", data, len(data))
    writer.write_end_of_file()
    return buf.getvalue()


def in_dict(value_ops: bytes) -> bytes:
    """Protocol-2 pickle of {"x": <value_ops>}."""
    return b"\x80\x02}X\x01\x00\x00\x00x" + value_ops + b"s."


def bytearray_pickle(n: int) -> bytes:
    return in_dict(b"cbuiltins\nbytearray\nJ" + struct.pack("<i", n) + b"\x85R")


def counter_pickle(n: int) -> bytes:
    return in_dict(b"ccollections\nCounter\ncbuiltins\nbytearray\nJ" + struct.pack("<i", n) + b"\x85R\x85R")


def refused_cheaply(raw: bytes, needle: str, seconds: float = 0.5, peak_bytes: int = 4 << 20) -> str:
    """Refused with ``needle`` in the reason, within ``seconds`` of this process's CPU time
    (not wall time: other processes on the machine do not count), Python allocations under
    ``peak_bytes`` beyond the payload itself."""
    tracemalloc.start()
    try:
        t0 = time.process_time()
        with pytest.raises(ProtocolError) as info:
            load(raw)
        elapsed = time.process_time() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert needle in str(info.value), str(info.value)
    assert str(info.value).startswith("undecodable payload: ")
    assert elapsed < seconds, elapsed
    assert peak < len(raw) + peak_bytes, peak
    return str(info.value)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


# --- honest messages, through the real encoders -------------------------------------------

@pytest.fixture(scope="module")
def states():
    torch.manual_seed(0)
    model = ImprovedCNN()
    model.train()
    model(torch.randn(4, 1, 28, 28))  # non-default BatchNorm statistics
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    local = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v + 3 for k, v in base.items()}
    return model, base, local


METRICS = {"loss": 0.25, "accuracy": 0.9, "train_s": 1.5, "samples_per_s": 400.0}
CONFIG = {"epochs": 1, "lr": 1e-3, "batch_size": 64, "augment": True, "hflip": False}


def honest_messages(model, base, local) -> dict[str, dict]:
    header = {"round": 2, "rounds": 5, "config": CONFIG}
    return {
        "MODEL state": {**header, "state": base, "view_id": 2},
        "MODEL model.state_dict()": {**header, "state": model.state_dict(), "view_id": 2},
        "MODEL 8-bit delta": {**header, "delta": quantize_state(state_delta(local, base)), "base_view": 1,
                              "view_id": 2},
        "UPDATE flat": update_message(local, base, 2, 600, METRICS),
        "UPDATE 8-bit": update_message(local, base, 2, 600, METRICS, quantization=True),
        "UPDATE 8-bit stochastic": update_message(local, base, 2, 600, METRICS, quantization=True,
                                                  stochastic=True, generator=torch.Generator().manual_seed(1)),
        "UPDATE plain state": {"round": 2, "num_samples": 600, "quantized": False, "metrics": METRICS,
                               "state": local},
        "UPDATE flat views": {"round": 2, "num_samples": 600, "quantized": False, "metrics": METRICS,
                              "state": Layout.of(local).unflatten(*Layout.of(local).flatten(local))},
        "misc": {"ints": [1, -2, 1 << 62], "none": None, "tuple": (1, "a", 2.5), "nested": {"a": {"b": [True]}},
                 "empty": torch.zeros(0), "scalar": torch.tensor(3.0), "half": torch.ones(3).half(),
                 "bf16": torch.ones(2).bfloat16(), "bool": torch.tensor([True, False]), "i32": torch.arange(4).int(),
                 "f64": torch.ones(2).double(), "i8": torch.arange(3).to(torch.int8),
                 "i16": torch.arange(3).short(), "channels_last": torch.randn(2, 3, 4, 5).to(
                     memory_format=torch.channels_last)},
    }


def assert_same(a, b, where="body"):
    if isinstance(a, torch.Tensor):
        assert type(b) is torch.Tensor and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert type(b) is dict and list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b and type(a) is type(b), where


def test_honest_messages_of_every_kind_decode(states):
    for name, body in honest_messages(*states).items():
        out = load(encode_payload(body))
        assert_same(body, out, name)


def test_honest_messages_are_unchanged_by_encode_payload_except_plain_dicts(states):
    """encode_payload writes OrderedDicts (model.state_dict(), with its _metadata) as plain
    dicts: otherwise torch.save emits BUILD, which the allowlist refuses."""
    model, _, _ = states
    raw_state = saved({"state": model.state_dict()})
    with pytest.raises(ProtocolError, match="BUILD"):
        load(raw_state)
    out = load(encode_payload({"state": model.state_dict()}))
    assert type(out["state"]) is dict
    fresh = ImprovedCNN()
    fresh.load_state_dict(out["state"])  # strict: same keys, shapes


def test_honest_decode_overhead_is_small(states):
    """The checks must not cost more than torch.load itself (a loose bound; the machine is shared)."""
    body = update_message(states[2], states[1], 2, 600, METRICS, quantization=True)
    raw = encode_payload(body)
    reader = safe_decode._BufferReader
    t0 = time.process_time()
    for _ in range(5):
        torch.load(reader(raw), map_location="cpu", weights_only=True)
    bare = time.process_time() - t0
    t0 = time.process_time()
    for _ in range(5):
        load(raw)
    checked = time.process_time() - t0
    assert checked < 2.5 * bare + 0.05, (checked, bare)


# --- 1. bytearray and DEFLATE (the HELLO attacks, now against authenticated payloads) -----

def test_bytearray_is_admitted_by_bare_torch_load():
    out = torch.load(io.BytesIO(archive(bytearray_pickle(1 << 20))), weights_only=True)
    assert type(out["x"]) is bytearray and len(out["x"]) == 1 << 20  # 1 MiB from ~300 bytes


def test_bytearray_of_a_gib_is_refused_without_allocating():
    raw = archive(bytearray_pickle(1 << 30))
    assert len(raw) < 1024
    refused_cheaply(raw, "'builtins bytearray' is not allowed")


def deflated_archive(n_items: int) -> bytes:
    pkl = b"\x80\x02]q\x00(" + b"N" * n_items + b"e."  # a list of n_items Nones
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def test_deflate_bomb_is_admitted_by_bare_torch_load():
    raw = deflated_archive(200_000)
    assert len(raw) < 2000
    assert len(torch.load(io.BytesIO(raw), weights_only=True)) == 200_000  # 200 k objects from < 2 KB


def test_deflate_bomb_is_refused_before_inflating():
    raw = deflated_archive(20_000_000)  # the 20 KB payload that inflates to 20 M objects
    assert len(raw) < 40_000
    refused_cheaply(raw, "compressed archive entry")


def test_deflated_entry_in_torch_layout_is_refused(states):
    """The same refusal when only the method field says DEFLATE, in torch.save's own layout."""
    raw = bytearray(encode_payload({"t": torch.zeros(10)}))
    for sig, at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        i = raw.find(sig)
        raw[i + at:i + at + 2] = struct.pack("<H", 8)
    refused_cheaply(bytes(raw), "compressed archive entry (method 8)")


# --- 2. Counter -----------------------------------------------------------------------------

def test_counter_is_admitted_by_bare_torch_load():
    out = torch.load(io.BytesIO(archive(counter_pickle(100_000))), weights_only=True)
    assert type(out["x"]) is __import__("collections").Counter and out["x"][0] == 100_000


def test_counter_of_a_huge_bytearray_is_refused_at_once():
    raw = archive(counter_pickle(200_000_000))  # held the GIL ~4 s
    assert len(raw) < 1024
    refused_cheaply(raw, "'collections Counter' is not allowed", seconds=0.2)


# --- 3. tensors that are not what they seem -----------------------------------------------

def shadowed_tensor() -> torch.Tensor:
    t = torch.full((4,), float("nan"))
    t.is_floating_point = OrderedDict  # a callable the unpickler allows; OrderedDict() is falsy
    t.numel = OrderedDict
    return t


def test_shadowed_attribute_survives_bare_torch_load():
    out = torch.load(io.BytesIO(saved({"w": shadowed_tensor()})), weights_only=True)
    assert not out["w"].is_floating_point()  # a validator asking this would skip the NaN check
    assert torch.isnan(out["w"]).all()


def test_shadowed_attribute_via_rebuild_from_type_is_refused():
    refused_cheaply(saved({"w": shadowed_tensor()}), "_rebuild_from_type_v2' is not allowed")


class Sub(torch.Tensor):
    pass


def test_tensor_subclass_and_parameter_are_refused():
    refused_cheaply(saved({"w": torch.zeros(3).as_subclass(Sub)}), "_rebuild_from_type_v2' is not allowed")
    refused_cheaply(saved({"w": torch.nn.Parameter(torch.zeros(3))}), "_rebuild_parameter' is not allowed")


def test_build_opcode_is_refused():
    """BUILD sets state on what the unpickler built (Tensor.set_, OrderedDict.__dict__)."""
    raw = saved({"t": torch.zeros(4)})
    pkl_at = raw.find(b"\x80\x02")
    end = raw.index(b"s.", pkl_at)  # {"t": tensor}: insert "() BUILD" on the tensor before SETITEM
    pkl = raw[pkl_at:end] + b")b" + raw[end:end + 2]
    storages = {"0": torch.zeros(4).numpy().tobytes()}
    refused_cheaply(archive(pkl, storages), "opcode BUILD is not allowed")
    od = OrderedDict(a=torch.zeros(1))
    od.is_floating_point = True
    refused_cheaply(saved({"d": od}), "opcode BUILD is not allowed")


def test_metadata_neg_bit_is_refused():
    refused_cheaply(saved({"w": torch._neg_view(torch.ones(3))}), "neg bit")


def test_requires_grad_is_refused():
    refused_cheaply(saved({"w": torch.zeros(3, requires_grad=True)}), "requires grad")


@pytest.mark.parametrize("value,needle", [
    (torch.zeros(2, dtype=torch.complex64), "ComplexFloatStorage"),
    (b"bytes", "_codecs encode"),
    ({1, 2}, " set' is not allowed"),
    (bytearray(3), " bytearray' is not allowed"),
    (1 + 2j, " complex' is not allowed"),
    (torch.Size([2, 3]), "torch Size"),
    (torch.device("cpu"), "torch device"),
    (torch.float32, "torch float32"),
    (OrderedDict(a=1), "a OrderedDict in a message"),
])
def test_values_messages_never_hold_are_refused(value, needle):
    refused_cheaply(saved({"x": value}), needle)


def test_expanded_tensor_is_refused():
    """4 bytes sent, 4 TB of logical elements: any operation on it would allocate them."""
    t = torch.zeros(1).expand(1 << 40)
    out = torch.load(io.BytesIO(saved({"t": t})), weights_only=True)
    assert out["t"].numel() == 1 << 40  # bare torch.load hands it over
    refused_cheaply(saved({"t": t}), "more elements than its storage")


def test_many_views_of_one_storage_are_refused():
    base = torch.zeros(10_000)
    views = [base[:] for _ in range(100)]  # 40 KB sent, 4 MB of tensors
    refused_cheaply(saved({"v": views}), "more elements than bytes were sent", seconds=2.0)
    honest = list(base.split(100))  # views that partition their storage are fine
    assert len(load(saved({"v": honest}))["v"]) == len(honest) == 100


def many_empty_tensors(n: int) -> bytes:
    """{"x": [n tensors]} as torch.save writes one empty tensor, then n - 1 more calls of the
    memoized _rebuild_tensor_v2 (slot 3) on the memoized arguments (slot 13): 5 bytes each.
    Every tensor is empty, so nothing overlaps and the decoded value passes check_tree."""
    pkl = bytes(safe_decode.check_archive(memoryview(encode_payload({"x": [torch.zeros(0)]}))))
    assert pkl.endswith(b"q\x0eas.") and b"ctorch._utils\n_rebuild_tensor_v2\nq\x03" in pkl
    assert b"tq\rRq\x0e" in pkl  # the arguments' tuple is memo slot 13
    pkl = pkl[:-2] + b"(" + b"h\x03h\rR" * (n - 1) + b"es."
    return archive(pkl, {"0": b""})


def test_a_payload_of_many_tensors_is_refused_before_torch_load(monkeypatch):
    """An allowlisted 64 KB pickle of 13,000 empty views: torch.load builds them all (the
    issue measured 0.93 s); refused by the scan, before torch.load, in one line."""
    n = (MAX_PICKLE - 200) // 5
    raw = many_empty_tensors(n)
    assert len(load(many_empty_tensors(MAX_TENSORS))["x"]) == MAX_TENSORS  # at the cap: decoded
    assert len(torch.load(io.BytesIO(raw), weights_only=True)["x"]) == n > 13_000  # bare torch.load builds them
    calls = []
    real_load = torch.load
    monkeypatch.setattr(safe_decode.torch, "load", lambda *a, **k: calls.append(1) or real_load(*a, **k))
    reason = refused_cheaply(raw, f"pickle builds more than {MAX_TENSORS} tensors")
    assert calls == [] and "\n" not in reason
    refused_cheaply(many_empty_tensors(MAX_TENSORS + 1), f"more than {MAX_TENSORS} tensors")


def test_the_tensor_cap_leaves_room_for_every_honest_message(states):
    most = max(sum(isinstance(v, torch.Tensor) for v in _leaves(body)) for body in honest_messages(*states).values())
    assert most == 50 and 2 * most <= MAX_TENSORS  # ImprovedCNN's 8-bit delta


def _leaves(value):
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


# --- structure ----------------------------------------------------------------------------

def test_deep_nesting_is_refused_without_recursion():
    n = 30_000  # nested lists built by the unpickler without recursion; str() of it would recurse
    pkl = in_dict(b"]" * n + b"a" * (n - 1))
    assert len(pkl) < MAX_PICKLE
    refused_cheaply(archive(pkl), f"nested deeper than {MAX_DEPTH}", seconds=2.0)
    nested: list = [1]
    for _ in range(MAX_DEPTH):
        nested = [nested]
    with pytest.raises(ProtocolError, match="nested deeper"):
        check_tree({"x": nested})


def test_cycles_are_refused_and_sharing_is_not():
    refused_cheaply(archive(in_dict(b"]q\x05h\x05a")), "cycle")  # l = []; l.append(l)
    shared = [1, 2]
    check_tree({"a": shared, "b": shared, "t": [torch.zeros(2)] * 3})


def test_check_tree_refuses_objects_a_crafted_unpickler_could_build():
    t = torch.zeros(3)
    t.is_floating_point = OrderedDict
    with pytest.raises(ProtocolError, match="attributes"):
        check_tree({"w": t})
    with pytest.raises(ProtocolError, match="Parameter"):
        check_tree({"w": torch.nn.Parameter(torch.zeros(3))})
    with pytest.raises(ProtocolError, match="key"):
        check_tree({(1, 2): 1})
    check_tree({"w": torch.zeros(3), 1: [None, 1.5, "s", True, (1,)]})


@pytest.mark.parametrize("raw,needle", [
    (b"", "too short"),
    (b"\x80\x02}q\x00.", "too short"),
    (b"\x80\x02}q\x00." + bytes(30), "not a torch.save archive"),
    (b"GET / HTTP/1.1\r\n\r\n" * 3, "not a torch.save archive"),
], ids=["empty", "pickle", "pickle-padded", "http"])
def test_non_archives_are_refused(raw, needle):
    refused_cheaply(raw, needle)


def test_archive_tampering_is_refused():
    raw = encode_payload({"t": torch.arange(10.0)})
    assert load(raw)["t"].numel() == 10
    cases = {
        "trailing junk": raw + b"x",
        "leading junk": b"x" + raw,
        "hidden gap": raw[:64] + b"\x00" * 64 + raw[64:],
        "comment": raw[:-2] + b"\x05\x00" + b"hello",
        "truncated": raw[:-30],
    }
    for name, bad in cases.items():
        with pytest.raises(ProtocolError):
            load(bad)


def test_stray_and_duplicate_entries_are_refused():
    buf = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(buf, True, 64)
    pkl = in_dict(b"N")
    writer.write_record("data.pkl", pkl, len(pkl))
    writer.write_record("evil.so", b"\x7fELF", 4)
    writer.write_end_of_file()
    refused_cheaply(buf.getvalue(), "unexpected archive entry")
    big = archive(in_dict(b"N"), {str(i): b"" for i in range(MAX_ENTRIES)})
    refused_cheaply(big, "entries")


def test_big_endian_archive_is_refused():
    raw = bytearray(encode_payload({"t": torch.arange(10.0)}))
    i = raw.find(b"little")
    raw[i:i + 6] = b"bigxxx"
    refused_cheaply(bytes(raw), "little-endian")


@pytest.mark.parametrize("pkl,needle", [
    (b"\x80\x04}X\x01\x00\x00\x00xNs.", "protocol 2"),
    (b"\x80\x02}X\x01\x00\x00\x00xNs.junk", "STOP"),
    (b"\x80\x02}X\x01\x00\x00\x00xN", "malformed pickle"),
    (b"\x80\x02}X\xff\x00\x00\x00x", "malformed pickle"),
    (in_dict(b"\x8a\x10" + bytes(15) + b"\x7f"), "64 bits"),
    (in_dict(b"cos\nsystem\n"), "'os system' is not allowed"),
    (in_dict(b"\x95" + bytes(8)), "opcode FRAME"),  # protocol 4
    (in_dict(b"\x8c\x01x"), "SHORT_BINUNICODE"),
    (in_dict(b"(U\x01x"), "SHORT_BINSTRING"),
    (in_dict(b"\x8f"), "EMPTY_SET"),
], ids=["proto4", "trailing", "truncated", "bad-length", "long1", "os.system", "frame", "short-unicode",
        "binstring", "set"])
def test_pickle_scan_refusals(pkl, needle):
    refused_cheaply(archive(pkl), needle)


def test_oversized_pickle_is_refused():
    pkl = in_dict(b"X" + struct.pack("<I", MAX_PICKLE) + b"a" * MAX_PICKLE)
    refused_cheaply(archive(pkl), "data.pkl of")


def test_non_dict_payloads_are_refused():
    for value in ([1, 2], torch.zeros(3), 5, "text", None):
        with pytest.raises(ProtocolError, match="expected a dict"):
            load(saved(value))


# --- 6. a failed decode frees its memory at once ------------------------------------------

def _tensors_of(numel: int) -> list[torch.Tensor]:
    return [o for o in gc.get_objects() if type(o) is torch.Tensor and o.numel() == numel]


class Payload(bytearray):
    """A bytearray that can be weakly referenced."""


@pytest.mark.parametrize("stage", ["check_tree", "torch.load"])
def test_failed_decode_keeps_nothing_alive(stage):
    numel = 1_234_567  # a distinctive size; ~5 MB
    if stage == "check_tree":  # decoded in full, then refused by the walk
        raw = saved({"a": torch.ones(numel), "b": torch.zeros(2, requires_grad=True)})
    else:  # torch.load fails after building the first tensor: record size != declared numel
        raw = bytearray(saved({"a": torch.ones(numel), "b": torch.zeros(4)}))
        i = raw.find(b"K\x04tq")  # BININT1 4: the second storage's numel
        raw[i + 1] = 5
    payload = Payload(raw)
    ref = weakref.ref(payload)
    gc.collect()
    gc.disable()  # what is kept alive through a reference cycle would stay alive now
    try:
        try:
            load(payload)
        except ProtocolError as exc:
            kept = exc  # held, like the server's ingest thread hands it to the handler
        assert kept.__cause__ is None and kept.__context__ is None
        del payload
        assert ref() is None, "the exception keeps the payload alive"
        assert _tensors_of(numel) == [], "the exception keeps decoded tensors alive"
    finally:
        gc.enable()


def test_failed_decodes_do_not_grow_memory():
    """The observed +1.2 GB: repeated undecodable updates must not accumulate."""
    raw = saved({"a": torch.ones(4_000_000), "b": torch.zeros(2, requires_grad=True)})  # 16 MB
    kept = []
    gc.disable()
    try:
        before = rss_bytes()
        for _ in range(10):
            try:
                load(raw)
            except ProtocolError as exc:
                kept.append(exc)
        grown = rss_bytes() - before
    finally:
        gc.enable()
    assert len(kept) == 10
    assert grown < 64 << 20, grown  # ten leaked decodes would be 160 MB
