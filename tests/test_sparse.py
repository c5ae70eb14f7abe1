"""The sparse patch codec (roles/sparse.py): bit-exact reconstruction, refusal, dense fallback, corruption."""

import math

import pytest
import torch

from roles.sparse import PatchEncoder, PatchError, apply, checksum, read_header


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
    assert kinds == {"sparse", "dense"}
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


def test_the_dense_form_is_chosen_for_a_tensor_exactly_when_it_is_smaller():
    n = 10_000
    enc = PatchEncoder(torch.bfloat16, compress=False)
    w = {"few": torch.randn(n), "most": torch.randn(n), "half": torch.randn(n), "none": torch.randn(n)}
    enc.snapshot(0, w)
    w["few"][::100] += 1.0  # 1% changed: sparse (4 bytes per change vs 2 per element)
    w["most"][: 9 * n // 10] += 1.0  # 90% changed: dense
    w["half"][: n // 2 - 10] += 1.0  # just under the 50% break-even of bf16 values + uint16 gaps
    blob, stats = enc.patch(1, w)
    kinds = {t[0]: t[2] for t in read_header(blob)[0]["tensors"]}
    assert kinds == {"few": "sparse", "most": "dense", "half": "sparse"}  # "none" has no entry at all
    assert stats["dense_bytes"] == 4 * n * 2
    payload = (n // 100) * 4 + n * 2 + (n // 2 - 10) * 4  # what the three chosen forms take
    assert payload <= stats["bytes"] < payload + 1024  # the rest is the header


def test_gaps_wider_than_sixteen_bits_survive_the_narrow_encoding():
    w = {"long": torch.zeros(300_000)}
    enc = PatchEncoder(torch.float32)
    replica = {"long": torch.empty(300_000)}
    apply(enc.snapshot(0, w), replica, base=None)
    w["long"][[5, 70_000, 70_001, 299_999]] = 1.0  # gaps 5, 69995, 1, 229998
    blob, stats = enc.patch(1, w)
    assert stats["changed"] == 4
    apply(blob, replica, base=0)
    assert torch.equal(replica["long"], w["long"])


@pytest.mark.parametrize("where", ["header", "values", "end"])
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
    else:
        del blob[-3:]
    with pytest.raises(PatchError):
        apply(bytes(blob), replica, base=0)


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
