//! Client-side encryption: the chunk key of an encrypted backup storage, keyed chunk names,
//! and the AEAD that seals chunk payloads and manifests. Pure: the caller supplies the
//! master key (from a key file, [`crate::keyfile`]); only nonces come from the system's
//! random source.
//!
//! One 32-byte master key per encrypted backup storage. Every key in use is derived from
//! it with BLAKE3's `derive_key`, each under its own context, so no two uses share a key:
//!
//! | context string                         | what the derived 32 bytes are                       |
//! |----------------------------------------|-----------------------------------------------------|
//! | `vmbackup 2026-12-02 chunk name key`   | key of the keyed BLAKE3 that names chunks           |
//! | `vmbackup 2026-12-02 seal key`         | AES-256-GCM key of chunk payloads and manifests     |
//! | `vmbackup 2026-12-02 key id`           | its first 16 bytes are the key id, written in clear |
//!
//! - **Chunk names**: a sealed chunk's keyed hash is `BLAKE3-keyed(name key, plaintext)`, and
//!   its name (in indexes, on the wire, on the store) is
//!   `BLAKE3-derive_key("vmbackup 2026-12-02 sealed chunk name", key id ‖ keyed hash)`
//!   ([`sealed_name`]). A store without the key cannot confirm a guess about a chunk's content
//!   by hashing it, and deduplication still works between everything written with one key.
//!   The keyed hash travels in the sealed blob's header, so a store checks that a sealed
//!   blob's name is derived from it: sealed names live in their own name space, apart from
//!   plain chunks' BLAKE3 names (a writer cannot plant a sealed blob, which the store cannot
//!   open, under the name of a plain chunk another writer will then skip uploading) and
//!   apart from every other key's.
//! - **Sealing** is AES-256-GCM with a fresh random 96-bit nonce per blob (`ring`, whose
//!   AES-GCM uses AES-NI/CLMUL where the CPU has them). Random nonces stay safe up to about
//!   2^32 seals per key (NIST SP 800-38D), i.e. 16 PiB of new 4 MiB chunks; deduplicated
//!   chunks are not sealed again.
//! - **The key id** names a key without revealing it (a one-way derivation), so a blob sealed
//!   with another key is reported as such instead of as damage.

use std::fmt;
use std::str::FromStr;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::digest::Digest;
use crate::format_error::FormatError;

/// Length of a master key.
pub const MASTER_KEY_LEN: usize = 32;
/// Length of a key id.
pub const KEY_ID_LEN: usize = 16;
/// Length of an AES-GCM nonce.
pub const SEAL_NONCE_LEN: usize = NONCE_LEN;
/// Length of an AES-GCM tag.
pub const TAG_LEN: usize = 16;

const NAME_KEY_CONTEXT: &str = "vmbackup 2026-12-02 chunk name key";
const SEAL_KEY_CONTEXT: &str = "vmbackup 2026-12-02 seal key";
const KEY_ID_CONTEXT: &str = "vmbackup 2026-12-02 key id";
const SEALED_NAME_CONTEXT: &str = "vmbackup 2026-12-02 sealed chunk name";

/// The name of a sealed chunk: derived from its key's id and its keyed hash (see the module
/// doc). Public: a store computes it from a sealed blob's header.
pub fn sealed_name(id: KeyId, keyed: &Digest) -> Digest {
    let mut h = blake3::Hasher::new_derive_key(SEALED_NAME_CONTEXT);
    h.update(&id.0);
    h.update(&keyed.0);
    Digest(*h.finalize().as_bytes())
}

/// The public name of a master key: 16 bytes derived from it, 32 hex digits in text.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex_encode(&self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl FromStr for KeyId {
    type Err = FormatError;

    fn from_str(s: &str) -> Result<KeyId, FormatError> {
        let bytes = hex_decode(s, "key id")?;
        let arr: [u8; KEY_ID_LEN] = bytes.try_into().map_err(|_| {
            FormatError::new("key id", "hex", None, format!("{} characters, expected {}", s.len(), KEY_ID_LEN * 2))
        })?;
        Ok(KeyId(arr))
    }
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes of lowercase (or uppercase) hex text.
pub(crate) fn hex_decode(s: &str, format: &'static str) -> Result<Vec<u8>, FormatError> {
    if !s.len().is_multiple_of(2) {
        return Err(FormatError::new(
            format,
            "hex",
            None,
            format!("{} characters is not a whole number of bytes", s.len()),
        ));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or_else(|| {
                FormatError::new(format, "hex", Some(i), format!("{:?} is not hex", s.get(i..i + 2).unwrap_or("")))
            })
        })
        .collect()
}

/// The keys of one encrypted backup storage, derived from its master key.
pub struct ChunkKey {
    name_key: [u8; 32],
    seal: LessSafeKey,
    id: KeyId,
}

/// The name key is zeroed when the key is dropped (an agent drops its keys on reload).
/// `ring` keeps the AES key schedule and offers no way to zero it; that copy stays until
/// its memory is reused.
impl Drop for ChunkKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.name_key);
    }
}

impl fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key material.
        f.debug_struct("ChunkKey").field("id", &self.id).finish_non_exhaustive()
    }
}

impl ChunkKey {
    /// The keys derived from `master`.
    pub fn new(master: &[u8; MASTER_KEY_LEN]) -> ChunkKey {
        let name_key = blake3::derive_key(NAME_KEY_CONTEXT, master);
        let seal_key = zeroize::Zeroizing::new(blake3::derive_key(SEAL_KEY_CONTEXT, master));
        let id_bytes = blake3::derive_key(KEY_ID_CONTEXT, master);
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&id_bytes[..KEY_ID_LEN]);
        // AES-256 takes any 32 bytes; the length is fixed above, so this cannot fail.
        let unbound =
            UnboundKey::new(&AES_256_GCM, seal_key.as_ref()).unwrap_or_else(|_| unreachable!("32-byte AES key"));
        ChunkKey { name_key, seal: LessSafeKey::new(unbound), id: KeyId(id) }
    }

    /// This key's id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The keyed hash of a chunk of plaintext `plain` under this key: keyed BLAKE3.
    pub fn keyed_hash(&self, plain: &[u8]) -> Digest {
        Digest(*blake3::keyed_hash(&self.name_key, plain).as_bytes())
    }

    /// The name of a chunk of plaintext `plain` under this key ([`sealed_name`] of its keyed
    /// hash).
    pub fn digest(&self, plain: &[u8]) -> Digest {
        sealed_name(self.id, &self.keyed_hash(plain))
    }

    /// A fresh random nonce.
    pub fn nonce() -> Result<[u8; SEAL_NONCE_LEN], FormatError> {
        let mut n = [0u8; SEAL_NONCE_LEN];
        SystemRandom::new()
            .fill(&mut n)
            .map_err(|_| FormatError::new("sealed data", "nonce", None, "the system's random source failed"))?;
        Ok(n)
    }

    /// Encrypts `in_out[from..]` (what follows a header) in place under `nonce`, binding
    /// `aad`, and appends the tag.
    pub(crate) fn seal_in_place(&self, nonce: [u8; SEAL_NONCE_LEN], aad: &[u8], in_out: &mut Vec<u8>, from: usize) {
        let from = from.min(in_out.len());
        let tag = self
            .seal
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut in_out[from..])
            // ring fails only past 2^36 bytes per message; blobs are at most 16 MiB.
            .unwrap_or_else(|_| unreachable!("AES-GCM input under its length limit"));
        in_out.extend_from_slice(tag.as_ref());
    }

    /// Checks the tag of `in_out` (ciphertext then tag) and decrypts it in place; returns
    /// the plaintext's length. A wrong key, nonce, AAD or any flipped bit is an error.
    pub(crate) fn open_in_place(&self, nonce: [u8; SEAL_NONCE_LEN], aad: &[u8], in_out: &mut [u8]) -> Option<usize> {
        self.seal
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), in_out)
            .ok()
            .map(|plain| plain.len())
    }

    /// Seals a small document (a manifest's private fields): `nonce ‖ ciphertext ‖ tag`,
    /// binding `aad`.
    pub fn seal_bytes(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, FormatError> {
        let nonce = Self::nonce()?;
        Ok(self.seal_bytes_with(nonce, aad, plain))
    }

    pub(crate) fn seal_bytes_with(&self, nonce: [u8; SEAL_NONCE_LEN], aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(SEAL_NONCE_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        self.seal_in_place(nonce, aad, &mut out, SEAL_NONCE_LEN);
        out
    }

    /// Opens what [`Self::seal_bytes`] sealed with the same `aad`.
    pub fn open_bytes(&self, aad: &[u8], sealed: &[u8], format: &'static str) -> Result<Vec<u8>, FormatError> {
        if sealed.len() < SEAL_NONCE_LEN + TAG_LEN {
            return Err(FormatError::new(format, "sealed", None, format!("{} bytes is too short", sealed.len())));
        }
        let mut nonce = [0u8; SEAL_NONCE_LEN];
        nonce.copy_from_slice(&sealed[..SEAL_NONCE_LEN]);
        let mut body = sealed[SEAL_NONCE_LEN..].to_vec();
        let n = self.open_in_place(nonce, aad, &mut body).ok_or_else(|| {
            FormatError::new(format, "sealed", None, "the authentication tag does not match: altered, or another key")
        })?;
        body.truncate(n);
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_derivations() {
        // Frozen (proto/golden/encryption_vectors.py computes them independently): changing a context string or the derivation makes every encrypted
        // storage unreadable.
        let key = ChunkKey::new(&[7u8; 32]);
        assert_eq!(key.id().to_string(), key.id().to_string().parse::<KeyId>().expect("hex").to_string());
        let frozen_id = key.id().to_string();
        let frozen_keyed = key.keyed_hash(b"abc").to_hex();
        let frozen_name = key.digest(b"abc").to_hex();
        assert_eq!(
            (frozen_id.as_str(), frozen_keyed.as_str(), frozen_name.as_str()),
            (GOLDEN_ID, GOLDEN_KEYED, GOLDEN_SEALED_NAME)
        );
        // Sealed names differ from plain BLAKE3, from the keyed hash, and between keys.
        assert_ne!(key.digest(b"abc"), Digest::of(b"abc"));
        assert_ne!(key.digest(b"abc"), key.keyed_hash(b"abc"));
        assert_ne!(key.digest(b"abc"), ChunkKey::new(&[8u8; 32]).digest(b"abc"));
        // The same keyed hash under another key id is another name.
        let keyed = key.keyed_hash(b"abc");
        assert_ne!(sealed_name(key.id(), &keyed), sealed_name(ChunkKey::new(&[8u8; 32]).id(), &keyed));
    }

    const GOLDEN_ID: &str = "25b5623c53f732fb0ef5278f2de3145a";
    const GOLDEN_KEYED: &str = "727a982cfe41669592b070715391dd4dbe0200b83a28bb9d89d1a8e55b718245";
    const GOLDEN_SEALED_NAME: &str = "92b2cff658c9747d63e894a101c792e82130f4d383bbba68ed31ca97efde0cef";

    #[test]
    fn sealed_bytes_open_only_with_their_key_and_aad() {
        let key = ChunkKey::new(&[1u8; 32]);
        let sealed = key.seal_bytes(b"group 1", b"secret name").expect("seal");
        assert!(!sealed.windows(11).any(|w| w == b"secret name"));
        assert_eq!(key.open_bytes(b"group 1", &sealed, "manifest").expect("open"), b"secret name");
        assert!(key.open_bytes(b"group 2", &sealed, "manifest").is_err());
        assert!(ChunkKey::new(&[2u8; 32]).open_bytes(b"group 1", &sealed, "manifest").is_err());
        let mut flipped = sealed.clone();
        flipped[SEAL_NONCE_LEN] ^= 1;
        assert!(key.open_bytes(b"group 1", &flipped, "manifest").is_err());
        assert!(key.open_bytes(b"group 1", &sealed[..20], "manifest").is_err());
        // Fresh nonces: the same input seals differently.
        assert_ne!(key.seal_bytes(b"group 1", b"secret name").expect("seal"), sealed);
    }

    #[test]
    fn key_id_hex_errors() {
        assert!("zz".repeat(16).parse::<KeyId>().is_err());
        assert!("ab".parse::<KeyId>().is_err());
        assert!("abc".parse::<KeyId>().is_err());
    }
}
