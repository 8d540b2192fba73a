# Golden vectors of vmbackup's encryption formats, from implementations independent of ours
# (Python blake3, argon2-cffi, cryptography, crc32c). proto/src/seal.rs, blob.rs and
# keyfile.rs freeze its output; rerun with: pip install blake3 argon2-cffi cryptography crc32c
import json, struct
from blake3 import blake3
from argon2.low_level import hash_secret_raw, Type
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
import crc32c

def derive(ctx, master): return blake3(master, derive_key_context=ctx).digest()
master = bytes([7])*32
key_id = derive("vmbackup 2026-12-02 key id", master)[:16]
name_key = derive("vmbackup 2026-12-02 chunk name key", master)
seal_key = derive("vmbackup 2026-12-02 seal key", master)
print("GOLDEN_ID", key_id.hex())
keyed = blake3(b"abc", key=name_key).digest()
print("GOLDEN_KEYED", keyed.hex())
sealed_name = blake3(key_id + keyed, derive_key_context="vmbackup 2026-12-02 sealed chunk name").digest()
print("GOLDEN_SEALED_NAME", sealed_name.hex())

# Version-3 sealed blob of "abc", uncompressed, nonce 0..11, under master [7]*32: the keyed
# hash is in the header and the associated data is the header without length and CRC.
nonce = bytes(range(12))
hdr = b"VMBKCHNK" + bytes([3, 0, 1, 0]) + struct.pack("<II", 3, 3 + 16)
aad = hdr[:16] + key_id + nonce + keyed
ct = AESGCM(seal_key).encrypt(nonce, b"abc", aad)
blob = hdr + struct.pack("<I", crc32c.crc32c(ct)) + key_id + nonce + keyed + ct
print("GOLDEN_BLOB", blob.hex())

# Version-2 sealed blob (written by the first encrypting release, still read): the same,
# named by the keyed hash itself, which the associated data binds.
hdr = b"VMBKCHNK" + bytes([2, 0, 1, 0]) + struct.pack("<II", 3, 3 + 16)
aad = hdr[:16] + key_id + nonce + keyed
ct = AESGCM(seal_key).encrypt(nonce, b"abc", aad)
blob = hdr + struct.pack("<I", crc32c.crc32c(ct)) + key_id + nonce + ct
print("GOLDEN_BLOB_V2", blob.hex())

# Key file: master [0x42]*32, passphrase "correct horse", salt 0x01*16, nonce 0x02*12.
m2 = bytes([0x42])*32
kid2 = derive("vmbackup 2026-12-02 key id", m2)[:16].hex()
salt = bytes([1])*16
wk = hash_secret_raw(b"correct horse", salt, time_cost=1, memory_cost=64, parallelism=1, hash_len=32, type=Type.ID, version=19)
n2 = bytes([2])*12
sealed = n2 + AESGCM(wk).encrypt(n2, m2, b"vmbackup key wrap\0" + kid2.encode() + b"\0passphrase")
kf = {"formatVersion": 1, "keyId": kid2, "created": 1764633600000, "wraps": [{"role": "passphrase", "kdf": "argon2id", "memoryKib": 64, "iterations": 1, "parallelism": 1, "salt": salt.hex(), "sealed": sealed.hex()}]}
print("GOLDEN_KEYFILE", json.dumps(kf, separators=(",", ":")))
