import io
import zipfile

import pytest
import torch

from fl.common.layout import Layout, LayoutError
from fl.learning.model import ImprovedCNN
from fl.wire.errors import ProtocolError
from fl.wire.frames import decode_payload, encode_payload


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(0)
    s = ImprovedCNN().state_dict()
    for k, v in s.items():
        if not v.is_floating_point():
            v.fill_(7 + len(k))  # distinct counters, so a mix-up shows
    return s


def data_records(payload: bytes) -> list[str]:
    return [n for n in zipfile.ZipFile(io.BytesIO(payload)).namelist() if "/data/" in n]


def test_flatten_unflatten_round_trip_is_exact(state):
    layout = Layout.of(state)
    floats, ints = layout.flatten(state)
    assert floats.dtype == torch.float32 and floats.numel() == sum(v.numel() for v in state.values() if v.is_floating_point())
    assert ints.dtype == torch.int64 and ints.numel() == 2
    back = layout.unflatten(floats, ints)
    assert list(back) == list(state)
    for k in state:
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k]), k
    ImprovedCNN().load_state_dict(back)


def test_unflatten_gives_views_of_the_vectors(state):
    layout = Layout.of(state)
    floats, ints = layout.flatten(state)
    back = layout.unflatten(floats, ints)
    floats.zero_()
    assert all(not v.any() for v in back.values() if v.is_floating_point())


def test_packed_state_survives_the_wire_in_one_storage_record(state):
    layout = Layout.of(state)
    payload = encode_payload({"flat": layout.pack(state)})
    assert len(data_records(payload)) == 1  # a state_dict takes one record per tensor
    assert len(data_records(encode_payload({"state": state}))) == len(state)
    floats, ints = layout.unpack(decode_payload(bytearray(payload))["flat"])
    back = layout.unflatten(floats, ints)
    for k in state:
        assert torch.equal(back[k], state[k]), k


def test_fingerprint_tells_models_apart(state):
    base = Layout.of(state).fingerprint
    assert Layout.of(dict(state)).fingerprint == base  # same names, shapes and dtypes
    renamed = {("x." + k if i == 0 else k): v for i, (k, v) in enumerate(state.items())}
    reshaped = {k: (v.reshape(-1) if v.ndim > 1 else v) for k, v in state.items()}
    retyped = {k: (v.double() if k.endswith("bias") else v) for k, v in state.items()}
    reordered = dict(reversed(list(state.items())))
    fingerprints = {Layout.of(s).fingerprint for s in (renamed, reshaped, retyped, reordered)}
    assert base not in fingerprints and len(fingerprints) == 4


def _bad_packs(layout: Layout, floats: torch.Tensor, ints: torch.Tensor) -> dict[str, object]:
    fp = layout.fingerprint
    return {
        "not a dict": [floats, ints],
        "missing int": {"layout": fp, "float": floats},
        "extra key": {"layout": fp, "float": floats, "int": ints.tolist(), "x": 1},
        "other model": {"layout": fp ^ 1, "float": floats, "int": ints.tolist()},
        "fingerprint as float": {"layout": float(fp), "float": floats, "int": ints.tolist()},
        "fingerprint as bool": {"layout": True, "float": floats, "int": ints.tolist()},
        "short float": {"layout": fp, "float": floats[:-1], "int": ints.tolist()},
        "long float": {"layout": fp, "float": torch.cat([floats, floats[:1]]), "int": ints.tolist()},
        "2-D float": {"layout": fp, "float": floats.view(1, -1), "int": ints.tolist()},
        "float64": {"layout": fp, "float": floats.double(), "int": ints.tolist()},
        "counters as tensor": {"layout": fp, "float": floats, "int": ints},
        "counter as float": {"layout": fp, "float": floats, "int": [float(i) for i in ints.tolist()]},
        "counter as bool": {"layout": fp, "float": floats, "int": [True] * ints.numel()},
        "counter beyond int64": {"layout": fp, "float": floats, "int": [1 << 63] * ints.numel()},
        "too few counters": {"layout": fp, "float": floats, "int": ints.tolist()[:-1]},
        "list for tensor": {"layout": fp, "float": floats.tolist()[:3], "int": ints.tolist()},
    }


@pytest.mark.parametrize("case", list(_bad_packs(Layout.of({"w": torch.zeros(2)}), torch.zeros(2),
                                                  torch.zeros(1, dtype=torch.int64))))
def test_unpack_refuses_what_does_not_fit(state, case):
    layout = Layout.of(state)
    packed = _bad_packs(layout, *layout.flatten(state))[case]
    with pytest.raises(LayoutError):
        layout.unpack(packed)


def test_pack_unpack_round_trip_keeps_counters_exact(state):
    layout = Layout.of(state)
    big = {k: (torch.tensor(2**62 + 5) if not v.is_floating_point() else v) for k, v in state.items()}
    floats, ints = layout.unpack(layout.pack(big))
    assert ints.dtype == torch.int64 and ints.tolist() == [2**62 + 5] * 2
    assert torch.equal(floats, layout.flatten(big)[0])


def test_tensor_view_beyond_its_storage_is_refused_on_decode():
    """A forged size must not let a peer read past the storage it sent."""
    t = torch.arange(8, dtype=torch.float32)
    payload = bytearray(encode_payload({"t": t}))
    z = zipfile.ZipFile(io.BytesIO(bytes(payload)))
    name = next(n for n in z.namelist() if n.endswith("data.pkl"))
    pkl = z.read(name)
    forged = pkl.replace(b"K\x08\x85", b"M\x00\x10\x85", 1)  # size (8,) -> (4096,)
    assert forged != pkl
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as w:
        for n in z.namelist():
            w.writestr(n, forged if n == name else z.read(n))
    with pytest.raises(ProtocolError):
        decode_payload(bytearray(out.getvalue()))
