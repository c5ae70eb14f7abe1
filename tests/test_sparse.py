"""The sparse patch codec (sync/codec.py): bit-exact reconstruction, refusal, dense fallback, corruption."""

import math

import numpy as np
import pytest
import torch

from rlflow.sync.codec import PatchEncoder, PatchError, _ef_decode, _ef_encode, apply, checksum, read_header


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view({2: torch.int16, 4: torch.int32}[t.element_size()])


def weights_with_special_values(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {"embed.weight": torch.randn(300, 64, generator=g) * 0.02,
         "layer.0.mlp": torch.randn(70_000, generator=g) * 0.02,  # long enough for gaps >= 2**16
         "layer.0.norm": torch.ones(64),
         "layer.0.bias": torch.zeros(64),
         "special": torch.tensor([0.0, -0.0, math.nan, -math.nan, math.inf, -math.inf, 1e-40, -1e-40])}
    return w


def adam_like_step(w: dict[str, torch.Tensor], lr: float, g: torch.Generator) -> None:
    for name, t in w.items():
        if name != "special":  # changed by hand, so its ±0 and NaN survive
            t.add_(torch.randn(t.shape, generator=g).sign() * lr)


@pytest.mark.parametrize("values", ["new", "xor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_reconstructed_weights_equal_the_trainers_bit_for_bit_over_many_steps(dtype, values):
    w, g = weights_with_special_values(), torch.Generator().manual_seed(1)
    enc = PatchEncoder(dtype, values=values)
    replica = {k: torch.empty(v.shape, dtype=dtype) for k, v in w.items()}
    apply(enc.snapshot(0, w), replica, base=None)
    kinds = set()
    for step in range(1, 41):
        adam_like_step(w, lr=1e-2 if step % 10 == 0 else 1e-6, g=g)  # mostly RL-sized, sometimes dense
        if step == 5:  # sign of zero flips, NaN payload changes: both are changes in the bits
            w["special"][0], w["special"][1] = -0.0, 0.0
            w["special"][2] = torch.tensor(0x7FC10000, dtype=torch.int32).view(torch.float32)
        base_checksum = enc.checksum
        blob, stats = enc.patch(step, w)
        header = apply(blob, replica, base=step - 1, base_checksum=base_checksum)
        kinds.update(t[2] for t in header["tensors"])
        for name, t in w.items():
            expected = t.to(dtype)
            assert torch.equal(bits(replica[name]), bits(expected)), (step, name)
        assert checksum(replica) == header["checksum"]
    assert {"mask", "dense"} <= kinds and ("sparse" in kinds or dtype == torch.float32)  # fp32: 1e-6 changes most elements
    special = bits(replica["special"])
    assert special[0] != special[1] and special[0] == bits(torch.tensor([-0.0], dtype=dtype))[0]


def test_a_patch_for_a_wrong_base_is_refused_before_anything_is_written():
    w = weights_with_special_values()
    enc = PatchEncoder(torch.bfloat16)
    replica = {k: torch.empty(v.shape, dtype=torch.bfloat16) for k, v in w.items()}
    apply(enc.snapshot(0, w), replica, base=None)
    adam_like_step(w, 1e-3, torch.Generator().manual_seed(2))
    enc.patch(1, w)
    adam_like_step(w, 1e-3, torch.Generator().manual_seed(3))
    patch_1_to_2, _ = enc.patch(2, w)
    before = {k: v.clone() for k, v in replica.items()}
    with pytest.raises(PatchError, match="1 -> 2 does not apply to version 0") as e:
        apply(patch_1_to_2, replica, base=0)
    assert not e.value.dirty
    assert all(torch.equal(bits(before[k]), bits(replica[k])) for k in w)


def test_a_snapshot_applies_whatever_the_replica_held_and_fixes_it():
    w = weights_with_special_values()
    enc = PatchEncoder(torch.bfloat16)
    replica = {k: torch.full(v.shape, 7.0, dtype=torch.bfloat16) for k, v in w.items()}  # garbage
    header = apply(enc.snapshot(0, w), replica, base=None)
    assert header["base"] is None and checksum(replica) == enc.checksum


def test_each_tensor_takes_its_smallest_form_and_dense_exactly_when_it_is_smallest():
    # c changes out of n = 10000 bf16 elements. dense: 2n = 20000 bytes. mask: 2c + n/8 = 2c + 1250.
    # sparse: 2c + Elias-Fano, i.e. ceil(c*l / 8) low bytes (l = floor(log2(n / c))) + ceil((c + (n >> l) + 1) / 8).
    n = 10_000
    enc = PatchEncoder(torch.bfloat16, compress=False)
    w = {k: torch.randn(n) for k in ("few", "many", "under", "over", "most", "none")}
    enc.snapshot(0, w)
    w["few"][::100] += 1.0  # c = 100, l = 6: sparse 200 + 75 + 33 = 308 (mask: 1450)
    w["many"][:4000] += 1.0  # c = 4000, l = 1: sparse 8000 + 500 + 1126, mask 8000 + 1250
    w["under"][:9374] += 1.0  # mask 18748 + 1250 = 19998 < 20000
    w["over"][:9375] += 1.0  # mask 20000: a tie goes dense
    w["most"][: 99 * n // 100] += 1.0  # 99% changed: dense
    blob, stats = enc.patch(1, w)
    kinds = {t[0]: t[2] for t in read_header(blob)[0]["tensors"]}
    assert kinds == {"few": "sparse", "many": "mask", "under": "mask", "over": "dense", "most": "dense"}  # "none": no entry
    assert stats["dense_bytes"] == 6 * n * 2
    payload = 308 + 9250 + 19998 + 20000 + 20000  # what the chosen forms take
    assert payload <= stats["bytes"] < payload + 1024  # the rest is the header


def test_the_index_coding_round_trips_every_density_and_layout():
    rng = np.random.default_rng(0)
    cases = [(1, [0]), (5, [0, 1, 2, 3, 4]), (1000, [999]), (1 << 20, [0, (1 << 20) - 1]), (70_000, [65_536])]
    for n in (2, 7, 64, 1000, 100_003):
        for c in sorted({1, 2, n // 50 or 1, n // 3 or 1, n - 1, n}):
            cases.append((n, sorted(rng.choice(n, c, replace=False).tolist())))
    for n, idx in cases:
        idx = np.asarray(idx, dtype=np.int64)
        width, low, high = _ef_encode(idx, n)
        assert np.array_equal(_ef_decode(low, high, n, idx.size, width), idx), (n, idx.size)
        bound = idx.size * (width + 1) + (n >> width) + 16  # c*l low bits, c ones, n >> l zeros, padding
        assert (low.size + high.size) * 8 <= bound, (n, idx.size)


def test_far_apart_and_adjacent_indices_survive_the_index_coding():
    w = {"long": torch.zeros(300_000)}
    enc = PatchEncoder(torch.float32)
    replica = {"long": torch.empty(300_000)}
    apply(enc.snapshot(0, w), replica, base=None)
    w["long"][[5, 70_000, 70_001, 299_999]] = 1.0  # gaps 5, 69995, 1, 229998
    blob, stats = enc.patch(1, w)
    assert stats["changed"] == 4
    apply(blob, replica, base=0)
    assert torch.equal(replica["long"], w["long"])


@pytest.mark.parametrize("where", ["header", "values", "lows", "highs", "end"])
def test_a_corrupted_patch_is_detected(where):
    w = weights_with_special_values()
    enc = PatchEncoder(torch.bfloat16, compress=False)
    replica = {k: torch.empty(v.shape, dtype=torch.bfloat16) for k, v in w.items()}
    apply(enc.snapshot(0, w), replica, base=None)
    adam_like_step(w, 1e-6, torch.Generator().manual_seed(4))
    blob = bytearray(enc.patch(1, w)[0])
    header, start = read_header(blob)
    if where == "header":
        blob[10] ^= 0xFF
    elif where == "values":
        blob[start + header["sections"]["values"][0] + 1] ^= 0x01  # one bit of one new value
    elif where in ("lows", "highs"):
        blob[start + header["sections"][where][0] + 2] ^= 0x04  # one bit of one index
    else:
        del blob[-3:]
    with pytest.raises(PatchError):
        apply(bytes(blob), replica, base=0)


@pytest.mark.parametrize("bit", [0x01, 0x80])
def test_a_corrupted_bitmap_is_detected_before_anything_is_written(bit):
    w = {"half": torch.randn(4096), "other": torch.randn(100)}
    enc = PatchEncoder(torch.bfloat16, compress=False)
    replica = {k: torch.empty(v.shape, dtype=torch.bfloat16) for k, v in w.items()}
    apply(enc.snapshot(0, w), replica, base=None)
    w["half"][::2] += 1.0
    w["other"][:] += 1.0
    blob = bytearray(enc.patch(1, w)[0])
    header, start = read_header(blob)
    assert {t[0]: t[2] for t in header["tensors"]} == {"half": "mask", "other": "dense"}
    blob[start + header["sections"]["masks"][0] + 7] ^= bit  # one more or one fewer element marked
    before = {k: v.clone() for k, v in replica.items()}
    with pytest.raises(PatchError, match="marks") as e:
        apply(bytes(blob), replica, base=0)
    assert not e.value.dirty and all(torch.equal(bits(before[k]), bits(replica[k])) for k in w)


def test_a_compressed_patch_round_trips_and_is_smaller_than_the_raw_one():
    w = {"w": torch.randn(200_000) * 0.02}
    raw_enc, zstd_enc = PatchEncoder(torch.bfloat16, compress=False), PatchEncoder(torch.bfloat16)
    replica = {"w": torch.empty(200_000, dtype=torch.bfloat16)}
    raw_enc.snapshot(0, w)
    apply(zstd_enc.snapshot(0, w), replica, base=None)
    w["w"] += torch.randn(200_000).sign() * 1e-5
    raw, _ = raw_enc.patch(1, w)
    packed, stats = zstd_enc.patch(1, w)
    assert 0 < stats["bytes"] < 0.9 * len(raw)
    apply(packed, replica, base=0)
    assert torch.equal(bits(replica["w"]), bits(w["w"].to(torch.bfloat16)))


def test_xor_patches_are_smaller_and_refuse_a_base_of_unknown_checksum():
    w = {"w": torch.randn(200_000) * 0.02}
    new_enc, xor_enc = PatchEncoder(torch.bfloat16), PatchEncoder(torch.bfloat16, values="xor")
    replica = {"w": torch.empty(200_000, dtype=torch.bfloat16)}
    new_enc.snapshot(0, w)
    apply(xor_enc.snapshot(0, w), replica, base=None)
    base_checksum = xor_enc.checksum
    w["w"] += torch.randn(200_000).sign() * 1e-5
    new_blob, xor_blob = new_enc.patch(1, w)[0], xor_enc.patch(1, w)[0]
    assert len(xor_blob) < 0.8 * len(new_blob)
    with pytest.raises(PatchError, match="base of known checksum"):
        apply(xor_blob, replica, base=0)
    apply(xor_blob, replica, base=0, base_checksum=base_checksum)
    assert torch.equal(bits(replica["w"]), bits(w["w"].to(torch.bfloat16)))
