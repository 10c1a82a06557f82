//! Envelope encryption of seller credentials at rest, with AES-256-GCM.
//!
//! Each record gets its own random data key (DEK) that encrypts the secret; the DEK is itself
//! encrypted ("wrapped") by a versioned key-encryption key (KEK) from configuration. The record
//! id is bound as associated data to both layers, so a sealed secret copied onto another record
//! does not open. Rotation re-wraps DEKs under the current KEK without touching the secrets'
//! ciphertexts (`Keyring::rewrap`); once every record is re-wrapped the old KEK can be retired.
//!
//! Stored per record: `kek_version`, `wrapped_dek` (nonce ‖ ciphertext ‖ tag) and `ciphertext`
//! (nonce ‖ ciphertext ‖ tag). Neither holds anything usable without a KEK.

use std::collections::BTreeMap;
use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use zeroize::Zeroizing;

const NONCE_LEN: usize = 12;
const KEY_LEN: usize = 32;

/// A secret sealed for one record.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    pub kek_version: u32,
    pub wrapped_dek: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Sealed(kek v{}, {} bytes)",
            self.kek_version,
            self.ciphertext.len()
        )
    }
}

/// Why a secret could not be sealed or opened. Deliberately uninformative: no key material, no
/// plaintext, no hint which layer failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealError {
    /// The record names a KEK version this keyring does not hold.
    UnknownKek(u32),
    /// Wrong key, wrong record id, or tampered data.
    Corrupt,
    /// A KEK was not 32 bytes.
    BadKek,
}

impl fmt::Display for SealError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownKek(v) => write!(f, "key-encryption key version {v} is not configured"),
            Self::Corrupt => f.write_str("sealed secret does not open (wrong key, record or data)"),
            Self::BadKek => f.write_str("a key-encryption key must be 32 bytes"),
        }
    }
}

impl std::error::Error for SealError {}

/// The configured KEKs by version; new secrets are sealed under `current`.
pub struct Keyring {
    current: u32,
    keks: BTreeMap<u32, Aes256Gcm>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let versions: Vec<u32> = self.keks.keys().copied().collect();
        write!(
            f,
            "Keyring(current v{}, versions {versions:?})",
            self.current
        )
    }
}

impl Keyring {
    /// `keks`: (version, 32-byte key); the highest version is current.
    pub fn new(keks: &[(u32, &[u8])]) -> Result<Self, SealError> {
        let mut map = BTreeMap::new();
        for (version, key) in keks {
            let cipher = Aes256Gcm::new_from_slice(key).map_err(|_| SealError::BadKek)?;
            map.insert(*version, cipher);
        }
        let current = *map.keys().next_back().ok_or(SealError::BadKek)?;
        Ok(Self { current, keks: map })
    }

    pub fn current_version(&self) -> u32 {
        self.current
    }

    /// Seals `secret` for `record_id` under a fresh data key.
    pub fn seal(&self, record_id: &str, secret: &[u8]) -> Result<Sealed, SealError> {
        let dek = Zeroizing::new(rand::random::<[u8; KEY_LEN]>());
        let data_cipher = Aes256Gcm::new_from_slice(&dek[..]).map_err(|_| SealError::BadKek)?;
        let ciphertext = encrypt(&data_cipher, secret, record_id.as_bytes())?;
        let wrapped_dek = self.wrap(self.current, record_id, &dek[..])?;
        Ok(Sealed {
            kek_version: self.current,
            wrapped_dek,
            ciphertext,
        })
    }

    /// Opens a sealed secret of `record_id`. The plaintext is zeroed when dropped.
    pub fn open(&self, record_id: &str, sealed: &Sealed) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let dek = self.unwrap_dek(record_id, sealed)?;
        let data_cipher = Aes256Gcm::new_from_slice(&dek[..]).map_err(|_| SealError::Corrupt)?;
        decrypt(&data_cipher, &sealed.ciphertext, record_id.as_bytes()).map(Zeroizing::new)
    }

    /// Re-wraps the data key under the current KEK (key rotation); the secret's ciphertext is
    /// unchanged. Already-current records come back as they are.
    pub fn rewrap(&self, record_id: &str, sealed: &Sealed) -> Result<Sealed, SealError> {
        if sealed.kek_version == self.current {
            return Ok(sealed.clone());
        }
        let dek = self.unwrap_dek(record_id, sealed)?;
        Ok(Sealed {
            kek_version: self.current,
            wrapped_dek: self.wrap(self.current, record_id, &dek[..])?,
            ciphertext: sealed.ciphertext.clone(),
        })
    }

    fn kek(&self, version: u32) -> Result<&Aes256Gcm, SealError> {
        self.keks
            .get(&version)
            .ok_or(SealError::UnknownKek(version))
    }

    fn wrap(&self, version: u32, record_id: &str, dek: &[u8]) -> Result<Vec<u8>, SealError> {
        encrypt(self.kek(version)?, dek, &wrap_aad(record_id, version))
    }

    fn unwrap_dek(
        &self,
        record_id: &str,
        sealed: &Sealed,
    ) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let kek = self.kek(sealed.kek_version)?;
        let aad = wrap_aad(record_id, sealed.kek_version);
        decrypt(kek, &sealed.wrapped_dek, &aad).map(Zeroizing::new)
    }
}

/// The wrapped DEK is bound to its record and to the KEK version that wrapped it.
fn wrap_aad(record_id: &str, version: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(record_id.len() + 16);
    aad.extend_from_slice(b"tokn-dek:v");
    aad.extend_from_slice(version.to_string().as_bytes());
    aad.push(b':');
    aad.extend_from_slice(record_id.as_bytes());
    aad
}

fn encrypt(cipher: &Aes256Gcm, msg: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealError> {
    let nonce = rand::random::<[u8; NONCE_LEN]>();
    let sealed = cipher
        .encrypt(Nonce::from_slice(&nonce), Payload { msg, aad })
        .map_err(|_| SealError::Corrupt)?;
    let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    Ok(out)
}

fn decrypt(cipher: &Aes256Gcm, data: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealError> {
    if data.len() < NONCE_LEN {
        return Err(SealError::Corrupt);
    }
    let (nonce, sealed) = data.split_at(NONCE_LEN);
    cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad })
        .map_err(|_| SealError::Corrupt)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"sk-canary-seller-secret-0123456789";

    fn keyring(versions: &[u32]) -> Keyring {
        let keys: Vec<(u32, [u8; 32])> = versions.iter().map(|v| (*v, [*v as u8; 32])).collect();
        let refs: Vec<(u32, &[u8])> = keys.iter().map(|(v, k)| (*v, &k[..])).collect();
        Keyring::new(&refs).unwrap()
    }

    #[test]
    fn seals_and_opens_and_the_sealed_form_hides_the_secret() {
        let ring = keyring(&[1]);
        let sealed = ring.seal("cred-1", SECRET).unwrap();
        assert_eq!(&ring.open("cred-1", &sealed).unwrap()[..], SECRET);
        for bytes in [&sealed.ciphertext, &sealed.wrapped_dek] {
            assert!(!bytes.windows(8).any(|w| SECRET.windows(8).any(|s| s == w)));
        }
        assert!(!format!("{sealed:?} {ring:?}").contains("canary"));
        // Fresh data key and nonces every time.
        assert_ne!(ring.seal("cred-1", SECRET).unwrap(), sealed);
    }

    #[test]
    fn a_sealed_secret_opens_only_for_its_own_record() {
        let ring = keyring(&[1]);
        let sealed = ring.seal("cred-1", SECRET).unwrap();
        assert_eq!(ring.open("cred-2", &sealed), Err(SealError::Corrupt));
    }

    #[test]
    fn tampering_anywhere_is_detected() {
        let ring = keyring(&[1]);
        let sealed = ring.seal("cred-1", SECRET).unwrap();
        for i in 0..sealed.ciphertext.len() {
            let mut t = sealed.clone();
            t.ciphertext[i] ^= 1;
            assert_eq!(
                ring.open("cred-1", &t),
                Err(SealError::Corrupt),
                "ciphertext byte {i}"
            );
        }
        for i in 0..sealed.wrapped_dek.len() {
            let mut t = sealed.clone();
            t.wrapped_dek[i] ^= 1;
            assert_eq!(
                ring.open("cred-1", &t),
                Err(SealError::Corrupt),
                "wrapped dek byte {i}"
            );
        }
        let mut t = sealed.clone();
        t.ciphertext.truncate(5);
        assert_eq!(ring.open("cred-1", &t), Err(SealError::Corrupt));
    }

    #[test]
    fn rotation_rewraps_under_the_new_key_and_the_old_key_can_retire() {
        let old = keyring(&[1]);
        let sealed = old.seal("cred-1", SECRET).unwrap();
        let both = keyring(&[1, 2]);
        assert_eq!(both.current_version(), 2);
        let rewrapped = both.rewrap("cred-1", &sealed).unwrap();
        assert_eq!(rewrapped.kek_version, 2);
        assert_eq!(
            rewrapped.ciphertext, sealed.ciphertext,
            "secrets are not re-encrypted"
        );
        let new_only = keyring(&[2]);
        assert_eq!(&new_only.open("cred-1", &rewrapped).unwrap()[..], SECRET);
        assert_eq!(
            new_only.open("cred-1", &sealed),
            Err(SealError::UnknownKek(1))
        );
        // A DEK wrapped under v1 cannot be passed off as v2.
        let mut forged = sealed.clone();
        forged.kek_version = 2;
        assert_eq!(both.open("cred-1", &forged), Err(SealError::Corrupt));
    }

    #[test]
    fn keks_must_be_32_bytes() {
        assert_eq!(
            Keyring::new(&[(1, &[0u8; 16][..])]).err(),
            Some(SealError::BadKek)
        );
        assert_eq!(Keyring::new(&[]).err(), Some(SealError::BadKek));
    }
}
