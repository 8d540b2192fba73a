//! Key file: an encrypted backup storage's master key, wrapped by one or more passphrases.
//! Pure: the caller reads and writes the file (0600) and supplies passphrases.
//!
//! JSON, camelCase, fields in this order:
//!
//! ```json
//! {"formatVersion": 1, "keyId": "<32 hex>", "created": 1764000000000,
//!  "wraps": [{"role": "passphrase", "kdf": "argon2id", "memoryKib": 65536, "iterations": 3,
//!             "parallelism": 1, "salt": "<32 hex>", "sealed": "<120 hex>"}]}
//! ```
//!
//! - `keyId` is the master key's public id ([`crate::seal::KeyId`]); unlocking checks that
//!   the unwrapped key derives it, so an edited id is caught.
//! - Each wrap seals the 32-byte master key with AES-256-GCM under a key derived from a
//!   passphrase by Argon2id (version 0x13) with the wrap's own random 16-byte salt and
//!   costs. `sealed` is `nonce (12) ‖ ciphertext (32) ‖ tag (16)`; the associated data is
//!   `vmbackup key wrap\0<keyId>\0<role>`, so a wrap cannot be moved to another key or role.
//! - Roles: `passphrase` (the one the agent unlocks with) and optionally `recovery` (kept
//!   offline by whoever must be able to restore when the first is lost). Any role unlocks
//!   the same master key.
//! - Changing a passphrase replaces its wrap and nothing else: the master key, and so every
//!   backup written with it, stays as it was. Nothing is re-encrypted.
//!
//! Unknown fields are refused; costs are bounded so a hostile file cannot make the agent
//! allocate more than [`MAX_MEMORY_KIB`].

use argon2::{Algorithm, Argon2, Params, Version};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
pub use zeroize::Zeroizing;

use crate::format_error::FormatError;
use crate::seal::{ChunkKey, KeyId, MASTER_KEY_LEN, SEAL_NONCE_LEN, TAG_LEN, hex_decode, hex_encode};

/// Format version written by this build.
pub const FORMAT_VERSION: u32 = 1;
/// Largest key file accepted, bytes.
pub const MAX_KEY_FILE_BYTES: usize = 64 << 10;
/// Most wraps in one file.
pub const MAX_WRAPS: usize = 8;
/// Most memory a wrap may ask Argon2id for: 1 GiB.
pub const MAX_MEMORY_KIB: u32 = 1 << 20;
/// Role of the agent's passphrase.
pub const ROLE_PASSPHRASE: &str = "passphrase";
/// Role of the recovery passphrase.
pub const ROLE_RECOVERY: &str = "recovery";
const SALT_LEN: usize = 16;

/// Argon2id costs of a wrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfCost {
    /// Memory, KiB.
    pub memory_kib: u32,
    /// Passes.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl Default for KdfCost {
    /// 64 MiB, 3 passes, 1 lane: above OWASP's recommended minimum for Argon2id, about a
    /// quarter of a second on one core.
    fn default() -> Self {
        Self { memory_kib: 64 << 10, iterations: 3, parallelism: 1 }
    }
}

/// A key file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyFile {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// The master key's id.
    pub key_id: String,
    /// Unix milliseconds.
    pub created: i64,
    /// The passphrase wraps.
    pub wraps: Vec<Wrap>,
}

/// The master key sealed under one passphrase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Wrap {
    /// `passphrase` or `recovery`.
    pub role: String,
    /// `argon2id`.
    pub kdf: String,
    /// Argon2id memory, KiB.
    pub memory_kib: u32,
    /// Argon2id passes.
    pub iterations: u32,
    /// Argon2id lanes.
    pub parallelism: u32,
    /// 16 random bytes, hex.
    pub salt: String,
    /// Nonce, wrapped key and tag, hex.
    pub sealed: String,
}

fn err(field: &'static str, message: impl Into<String>) -> FormatError {
    FormatError::new("key file", field, None, message)
}

fn random<const N: usize>() -> Result<[u8; N], FormatError> {
    let mut b = [0u8; N];
    SystemRandom::new().fill(&mut b).map_err(|_| err("random", "the system's random source failed"))?;
    Ok(b)
}

/// A master key in memory: zeroed when dropped.
pub type MasterKey = Zeroizing<[u8; MASTER_KEY_LEN]>;

/// A new random master key.
pub fn generate_master() -> Result<MasterKey, FormatError> {
    Ok(Zeroizing::new(random()?))
}

fn wrap_aad(key_id: &str, role: &str) -> Vec<u8> {
    format!("vmbackup key wrap\0{key_id}\0{role}").into_bytes()
}

fn check_role(role: &str) -> Result<(), FormatError> {
    if role.is_empty()
        || role.len() > 32
        || !role.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(err("role", format!("{role:?} is not 1 to 32 of a-z, 0-9 and -")));
    }
    Ok(())
}

impl KdfCost {
    fn check(&self) -> Result<Params, FormatError> {
        if self.memory_kib > MAX_MEMORY_KIB {
            return Err(err(
                "memoryKib",
                format!("{} KiB is more than the {MAX_MEMORY_KIB} KiB allowed", self.memory_kib),
            ));
        }
        if !(1..=64).contains(&self.iterations) {
            return Err(err("iterations", format!("{} is not 1 to 64", self.iterations)));
        }
        if !(1..=16).contains(&self.parallelism) {
            return Err(err("parallelism", format!("{} is not 1 to 16", self.parallelism)));
        }
        Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32))
            .map_err(|e| err("memoryKib", format!("Argon2id refuses these costs: {e}")))
    }

    /// The 32-byte wrapping key of `passphrase` and `salt`.
    fn derive(&self, passphrase: &[u8], salt: &[u8]) -> Result<Zeroizing<[u8; 32]>, FormatError> {
        let params = self.check()?;
        let mut out = Zeroizing::new([0u8; 32]);
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into(passphrase, salt, out.as_mut())
            .map_err(|e| err("kdf", format!("Argon2id: {e}")))?;
        Ok(out)
    }
}

fn aead(wrapping: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, wrapping).unwrap_or_else(|_| unreachable!("32-byte AES key")))
}

impl Wrap {
    fn new(
        key_id: &str,
        role: &str,
        master: &[u8; MASTER_KEY_LEN],
        passphrase: &[u8],
        cost: KdfCost,
    ) -> Result<Wrap, FormatError> {
        check_role(role)?;
        if passphrase.is_empty() {
            return Err(err("passphrase", "an empty passphrase protects nothing"));
        }
        let salt: [u8; SALT_LEN] = random()?;
        let nonce: [u8; SEAL_NONCE_LEN] = random()?;
        let wrapping = cost.derive(passphrase, &salt)?;
        let mut body = master.to_vec();
        let tag = aead(&wrapping)
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(wrap_aad(key_id, role)),
                &mut body,
            )
            .map_err(|_| err("sealed", "AES-GCM refused to seal"))?;
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&body);
        sealed.extend_from_slice(tag.as_ref());
        Ok(Wrap {
            role: role.to_string(),
            kdf: "argon2id".into(),
            memory_kib: cost.memory_kib,
            iterations: cost.iterations,
            parallelism: cost.parallelism,
            salt: hex_encode(&salt),
            sealed: hex_encode(&sealed),
        })
    }

    fn cost(&self) -> KdfCost {
        KdfCost { memory_kib: self.memory_kib, iterations: self.iterations, parallelism: self.parallelism }
    }

    fn unwrap_master(&self, key_id: &str, passphrase: &[u8]) -> Result<MasterKey, FormatError> {
        if self.kdf != "argon2id" {
            return Err(err("kdf", format!("{:?} is not argon2id", self.kdf)));
        }
        let salt = hex_decode(&self.salt, "key file")?;
        if salt.len() < 8 {
            return Err(err("salt", format!("{} bytes, at least 8 needed", salt.len())));
        }
        let sealed = hex_decode(&self.sealed, "key file")?;
        if sealed.len() != SEAL_NONCE_LEN + MASTER_KEY_LEN + TAG_LEN {
            return Err(err(
                "sealed",
                format!("{} bytes, expected {}", sealed.len(), SEAL_NONCE_LEN + MASTER_KEY_LEN + TAG_LEN),
            ));
        }
        let wrapping = self.cost().derive(passphrase, &salt)?;
        let mut nonce = [0u8; SEAL_NONCE_LEN];
        nonce.copy_from_slice(&sealed[..SEAL_NONCE_LEN]);
        let mut body = Zeroizing::new(sealed[SEAL_NONCE_LEN..].to_vec());
        let plain = aead(&wrapping)
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(wrap_aad(key_id, &self.role)), &mut body)
            .map_err(|_| {
                err("passphrase", format!("wrong passphrase for the {} wrap (or the file was altered)", self.role))
            })?;
        let mut master = Zeroizing::new([0u8; MASTER_KEY_LEN]);
        master.copy_from_slice(plain);
        Ok(master)
    }
}

impl KeyFile {
    /// A key file for `master`, wrapped under `passphrase` (role `passphrase`).
    pub fn new(
        master: &[u8; MASTER_KEY_LEN],
        created: i64,
        passphrase: &[u8],
        cost: KdfCost,
    ) -> Result<KeyFile, FormatError> {
        let key_id = ChunkKey::new(master).id().to_string();
        let wrap = Wrap::new(&key_id, ROLE_PASSPHRASE, master, passphrase, cost)?;
        Ok(KeyFile { format_version: FORMAT_VERSION, key_id, created, wraps: vec![wrap] })
    }

    /// The master key, unwrapped from the `role` wrap by `passphrase` and checked against
    /// the key id.
    pub fn unlock(&self, role: &str, passphrase: &[u8]) -> Result<MasterKey, FormatError> {
        let wrap = self
            .wraps
            .iter()
            .find(|w| w.role == role)
            .ok_or_else(|| err("role", format!("the key file has no {role} wrap")))?;
        let master = wrap.unwrap_master(&self.key_id, passphrase)?;
        let id = ChunkKey::new(&master).id().to_string();
        if id != self.key_id {
            return Err(err("keyId", format!("the unwrapped key has id {id}, the file says {}", self.key_id)));
        }
        Ok(master)
    }

    /// Wraps `master` (unlocked from this file) under `passphrase` for `role`, replacing
    /// that role's wrap if there is one: how a passphrase is changed and a recovery
    /// passphrase added. The master key does not change.
    pub fn set_wrap(
        &mut self,
        master: &[u8; MASTER_KEY_LEN],
        role: &str,
        passphrase: &[u8],
        cost: KdfCost,
    ) -> Result<(), FormatError> {
        let id = ChunkKey::new(master).id().to_string();
        if id != self.key_id {
            return Err(err("keyId", format!("key {id} is not this file's key {}", self.key_id)));
        }
        let wrap = Wrap::new(&self.key_id, role, master, passphrase, cost)?;
        let full = self.wraps.len() >= MAX_WRAPS;
        match self.wraps.iter_mut().find(|w| w.role == role) {
            Some(w) => *w = wrap,
            None if full => return Err(err("wraps", format!("a key file holds at most {MAX_WRAPS} wraps"))),
            None => self.wraps.push(wrap),
        }
        Ok(())
    }

    /// Removes `role`'s wrap; the last one cannot go (the key would be lost).
    pub fn remove_wrap(&mut self, role: &str) -> Result<(), FormatError> {
        let before = self.wraps.len();
        if !self.wraps.iter().any(|w| w.role == role) {
            return Err(err("role", format!("the key file has no {role} wrap")));
        }
        if before == 1 {
            return Err(err("wraps", "the last wrap cannot be removed: the key would be lost"));
        }
        self.wraps.retain(|w| w.role != role);
        Ok(())
    }

    /// Pretty JSON, newline-terminated.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        let mut out = serde_json::to_vec_pretty(self).map_err(|e| err("json", e.to_string()))?;
        out.push(b'\n');
        Ok(out)
    }

    /// Parses and checks a key file (not its passphrases).
    pub fn decode(bytes: &[u8]) -> Result<KeyFile, FormatError> {
        if bytes.len() > MAX_KEY_FILE_BYTES {
            return Err(err("size", format!("{} bytes is more than {MAX_KEY_FILE_BYTES}", bytes.len())));
        }
        let f: KeyFile = serde_json::from_slice(bytes).map_err(|e| err("json", e.to_string()))?;
        if f.format_version != FORMAT_VERSION {
            return Err(err(
                "formatVersion",
                format!("version {} is not supported (this build reads {FORMAT_VERSION})", f.format_version),
            ));
        }
        f.key_id.parse::<KeyId>().map_err(|e| err("keyId", e.message))?;
        if f.wraps.is_empty() || f.wraps.len() > MAX_WRAPS {
            return Err(err("wraps", format!("{} wraps; 1 to {MAX_WRAPS} expected", f.wraps.len())));
        }
        for (i, w) in f.wraps.iter().enumerate() {
            check_role(&w.role)?;
            if f.wraps[..i].iter().any(|o| o.role == w.role) {
                return Err(err("role", format!("two {} wraps", w.role)));
            }
            w.cost().check()?;
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHEAP: KdfCost = KdfCost { memory_kib: 64, iterations: 1, parallelism: 1 };

    #[test]
    fn unlock_rotate_and_recover() {
        let master = generate_master().expect("random");
        let mut f = KeyFile::new(&master, 1, b"first", CHEAP).expect("new");
        assert_eq!(f.unlock(ROLE_PASSPHRASE, b"first").expect("unlock"), master);
        let e = f.unlock(ROLE_PASSPHRASE, b"wrong").expect_err("wrong passphrase");
        assert_eq!(e.field, "passphrase");
        assert!(f.unlock(ROLE_RECOVERY, b"first").is_err(), "no recovery wrap yet");
        f.set_wrap(&master, ROLE_RECOVERY, b"offline", CHEAP).expect("recovery");
        f.set_wrap(&master, ROLE_PASSPHRASE, b"second", CHEAP).expect("rotate");
        let f = KeyFile::decode(&f.encode().expect("encode")).expect("decode");
        assert!(f.unlock(ROLE_PASSPHRASE, b"first").is_err(), "the old passphrase is gone");
        assert_eq!(f.unlock(ROLE_PASSPHRASE, b"second").expect("new passphrase"), master);
        assert_eq!(f.unlock(ROLE_RECOVERY, b"offline").expect("recovery"), master);
        assert_eq!(f.key_id, ChunkKey::new(&master).id().to_string(), "the key never changed");
        let mut f2 = f.clone();
        assert!(f2.set_wrap(&generate_master().expect("random"), ROLE_RECOVERY, b"x", CHEAP).is_err());
        f2.remove_wrap(ROLE_RECOVERY).expect("remove");
        assert_eq!(f2.remove_wrap(ROLE_PASSPHRASE).expect_err("last").field, "wraps");
    }

    #[test]
    fn tampering_is_caught() {
        let master = [9u8; 32];
        let f = KeyFile::new(&master, 1, b"pw", CHEAP).expect("new");
        // A wrap moved to another role does not open.
        let mut moved = f.clone();
        moved.wraps[0].role = ROLE_RECOVERY.into();
        assert!(moved.unlock(ROLE_RECOVERY, b"pw").is_err());
        // An edited key id does not open either.
        let mut edited = f.clone();
        edited.key_id = "00".repeat(16);
        assert!(edited.unlock(ROLE_PASSPHRASE, b"pw").is_err());
        // Hostile costs are refused before anything is allocated.
        let mut greedy = f.clone();
        greedy.wraps[0].memory_kib = u32::MAX;
        let e = KeyFile::decode(&greedy.encode().expect("encode")).expect_err("greedy");
        assert_eq!(e.field, "memoryKib");
        let e = KeyFile::decode(b"{\"formatVersion\":1,\"keyId\":\"x\",\"created\":1,\"wraps\":[],\"extra\":1}")
            .expect_err("x");
        assert_eq!(e.field, "json");
        assert_eq!(KeyFile::new(&master, 1, b"", CHEAP).expect_err("empty").field, "passphrase");
    }

    #[test]
    fn golden_wrap_opens() {
        // Frozen: written by an independent implementation (proto/golden/encryption_vectors.py);
        // a key file of this format version must open forever.
        let f = KeyFile::decode(GOLDEN.as_bytes()).expect("golden decodes");
        assert_eq!(*f.unlock(ROLE_PASSPHRASE, b"correct horse").expect("unlock"), [0x42u8; 32]);
    }

    const GOLDEN: &str = "{\"formatVersion\":1,\"keyId\":\"78404370557320c5ca655dd192eb21c7\",\"created\":1764633600000,\"wraps\":[{\"role\":\"passphrase\",\"kdf\":\"argon2id\",\"memoryKib\":64,\"iterations\":1,\"parallelism\":1,\"salt\":\"01010101010101010101010101010101\",\"sealed\":\"0202020202020202020202025c38d65f12282e5c0afd98872187f439fe47c3b4202c09ab16bdebcca898d2f4a926ffaa96c0daafbb0c7cd2e0ac61c2\"}]}";
}
