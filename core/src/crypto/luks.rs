//! The LUKS1 header that qcow2 keeps in the clusters named by header extension 0x0537be77:
//! its codec, the anti-forensic splitter, PBKDF2 key slots, unlocking and making one.
//!
//! Layout (all integers big-endian; 592 bytes): magic `LUKS\xba\xbe`, version 1, cipher name,
//! cipher mode (`xts-plain64`, `cbc-essiv:sha256`, ...), hash spec, payload offset (ignored in
//! qcow2), key bytes, the master key's PBKDF2 digest (20 bytes), its salt and iterations, the
//! UUID, then eight key slots of {active, iterations, salt, key-material offset in sectors,
//! stripes}. A slot's key material is the master key split into 4000 stripes (the AF
//! splitter), encrypted with the payload cipher keyed by PBKDF2(password, slot salt), sector
//! numbers starting at 0 where the material starts.

use std::time::{Duration, Instant};

use hmac::digest::{Digest, DynDigest};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::cipher::{BlockCipher, IvGen, Mode, SectorCipher, SECTOR};

pub(crate) const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
pub(crate) const HEADER_LEN: usize = 592;
pub(crate) const SLOTS: usize = 8;
pub(crate) const STRIPES: u32 = 4000;
const SLOT_ACTIVE: u32 = 0x00ac_71f3;
const SLOT_INACTIVE: u32 = 0x0000_dead;
const SALT_LEN: usize = 32;
const DIGEST_LEN: usize = 20;
/// Key material of each slot starts on a 4 KiB boundary, as QEMU and cryptsetup lay it out.
const ALIGN: u64 = 4096;
const MIN_ITERATIONS: u64 = 1000;
/// PBKDF2 iteration counts above this are refused: a crafted header must not make an open
/// run for hours (2^28 is minutes of SHA-256 here; real headers hold a few million).
pub(crate) const MAX_ITERATIONS: u32 = 1 << 28;

/// A lower iteration limit for the fuzz targets (feature `testing`; 0 = none): a mutated
/// header may hold any count up to [`MAX_ITERATIONS`], which is legitimate work for whoever
/// holds the password but minutes per input for a fuzzer that must finish each in a second.
#[cfg(feature = "testing")]
pub(crate) static FUZZ_MAX_ITERATIONS: std::sync::atomic::AtomicU32 =
    std::sync::atomic::AtomicU32::new(0);

/// The highest PBKDF2 iteration count a header may hold.
fn max_iterations() -> u32 {
    #[cfg(feature = "testing")]
    {
        let cap = FUZZ_MAX_ITERATIONS.load(std::sync::atomic::Ordering::Relaxed);
        if cap != 0 {
            return cap.min(MAX_ITERATIONS);
        }
    }
    MAX_ITERATIONS
}

/// A secret byte string, wiped when dropped.
pub(crate) type Secret = Zeroizing<Vec<u8>>;

/// Hash algorithms for PBKDF2, the AF splitter and ESSIV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    /// SHA-1.
    Sha1,
    /// SHA-224.
    Sha224,
    /// SHA-256 (the default).
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl HashAlg {
    /// Parse qemu's spelling (`sha1`, `sha256`, ...).
    pub fn parse(s: &str) -> Option<HashAlg> {
        Some(match s {
            "sha1" => HashAlg::Sha1,
            "sha224" => HashAlg::Sha224,
            "sha256" => HashAlg::Sha256,
            "sha384" => HashAlg::Sha384,
            "sha512" => HashAlg::Sha512,
            _ => return None,
        })
    }
    /// qemu's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
        }
    }
    fn hasher(self) -> Box<dyn DynDigest> {
        match self {
            HashAlg::Sha1 => Box::new(sha1::Sha1::new()),
            HashAlg::Sha224 => Box::new(sha2::Sha224::new()),
            HashAlg::Sha256 => Box::new(sha2::Sha256::new()),
            HashAlg::Sha384 => Box::new(sha2::Sha384::new()),
            HashAlg::Sha512 => Box::new(sha2::Sha512::new()),
        }
    }
    pub(crate) fn digest_len(self) -> usize {
        self.hasher().output_size()
    }
    /// The digest of the concatenation of `parts`.
    pub(crate) fn hash(self, parts: &[&[u8]]) -> Secret {
        let mut h = self.hasher();
        for p in parts {
            h.update(p);
        }
        Zeroizing::new(h.finalize().into_vec())
    }
    /// PBKDF2-HMAC with this hash.
    pub(crate) fn pbkdf2(self, password: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
        use pbkdf2::pbkdf2_hmac;
        match self {
            HashAlg::Sha1 => pbkdf2_hmac::<sha1::Sha1>(password, salt, rounds, out),
            HashAlg::Sha224 => pbkdf2_hmac::<sha2::Sha224>(password, salt, rounds, out),
            HashAlg::Sha256 => pbkdf2_hmac::<sha2::Sha256>(password, salt, rounds, out),
            HashAlg::Sha384 => pbkdf2_hmac::<sha2::Sha384>(password, salt, rounds, out),
            HashAlg::Sha512 => pbkdf2_hmac::<sha2::Sha512>(password, salt, rounds, out),
        }
    }
    /// PBKDF2 iterations per second on this machine for a key of `key_len` bytes. The rate of
    /// one output block is measured once per process and hash (no heap: nothing to free).
    fn iterations_per_second(self, key_len: usize) -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static RATES: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];
        let slot = &RATES[self as usize];
        let mut per_block = slot.load(Ordering::Relaxed);
        if per_block == 0 {
            let mut rounds = 1024u32;
            let mut out = vec![0u8; self.digest_len()];
            per_block = loop {
                let t = Instant::now();
                self.pbkdf2(b"calibrate", &[0u8; SALT_LEN], rounds, &mut out);
                let el = t.elapsed();
                if el >= Duration::from_millis(40) || rounds >= 1 << 26 {
                    break ((rounds as f64 / el.as_secs_f64().max(1e-9)) as u64).max(1);
                }
                rounds *= 2;
            };
            slot.store(per_block, Ordering::Relaxed);
        }
        (per_block / key_len.div_ceil(self.digest_len()) as u64).max(1)
    }
}

/// The block cipher of a LUKS header (AES is the one implemented).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherAlg {
    /// AES-128.
    Aes128,
    /// AES-192.
    Aes192,
    /// AES-256 (the default).
    Aes256,
}

impl CipherAlg {
    /// Parse qemu's spelling (`aes-128`, `aes-192`, `aes-256`).
    pub fn parse(s: &str) -> Option<CipherAlg> {
        Some(match s {
            "aes-128" | "aes128" => CipherAlg::Aes128,
            "aes-192" | "aes192" => CipherAlg::Aes192,
            "aes-256" | "aes256" => CipherAlg::Aes256,
            _ => return None,
        })
    }
    /// qemu's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CipherAlg::Aes128 => "aes-128",
            CipherAlg::Aes192 => "aes-192",
            CipherAlg::Aes256 => "aes-256",
        }
    }
    fn key_len(self) -> usize {
        match self {
            CipherAlg::Aes128 => 16,
            CipherAlg::Aes192 => 24,
            CipherAlg::Aes256 => 32,
        }
    }
    fn from_key_len(n: usize) -> Option<CipherAlg> {
        Some(match n {
            16 => CipherAlg::Aes128,
            24 => CipherAlg::Aes192,
            32 => CipherAlg::Aes256,
            _ => return None,
        })
    }
}

/// The chaining mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherMode {
    /// XTS (the default).
    Xts,
    /// CBC.
    Cbc,
}

impl CipherMode {
    /// Parse `xts` or `cbc`.
    pub fn parse(s: &str) -> Option<CipherMode> {
        Some(match s {
            "xts" => CipherMode::Xts,
            "cbc" => CipherMode::Cbc,
            _ => return None,
        })
    }
    /// `xts` or `cbc`.
    pub fn as_str(self) -> &'static str {
        match self {
            CipherMode::Xts => "xts",
            CipherMode::Cbc => "cbc",
        }
    }
}

/// How each sector's IV is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvGenAlg {
    /// 32-bit sector number.
    Plain,
    /// 64-bit sector number (the default).
    Plain64,
    /// Encrypted sector number (ESSIV), keyed by a hash of the key.
    Essiv,
}

impl IvGenAlg {
    /// Parse `plain`, `plain64` or `essiv`.
    pub fn parse(s: &str) -> Option<IvGenAlg> {
        Some(match s {
            "plain" => IvGenAlg::Plain,
            "plain64" => IvGenAlg::Plain64,
            "essiv" => IvGenAlg::Essiv,
            _ => return None,
        })
    }
    /// qemu's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            IvGenAlg::Plain => "plain",
            IvGenAlg::Plain64 => "plain64",
            IvGenAlg::Essiv => "essiv",
        }
    }
}

/// The payload cipher a header names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CipherSpec {
    pub alg: CipherAlg,
    pub mode: CipherMode,
    pub ivgen: IvGenAlg,
    /// The ESSIV hash (ESSIV only).
    pub ivgen_hash: Option<HashAlg>,
}

impl CipherSpec {
    /// Master key length in bytes (twice the AES key for XTS).
    pub(crate) fn key_bytes(&self) -> usize {
        match self.mode {
            CipherMode::Xts => 2 * self.alg.key_len(),
            CipherMode::Cbc => self.alg.key_len(),
        }
    }

    /// Check that the combination can be built (ESSIV needs a hash whose digest is an AES key).
    pub(crate) fn validate(&self) -> Result<(), String> {
        if let Some(h) = self.ivgen_hash {
            if self.ivgen == IvGenAlg::Essiv && CipherAlg::from_key_len(h.digest_len()).is_none() {
                return Err(format!(
                    "No AES cipher with key size {} available (the ESSIV hash {} does not make an AES key)",
                    h.digest_len(),
                    h.as_str()
                ));
            }
        }
        if self.ivgen == IvGenAlg::Essiv && self.ivgen_hash.is_none() {
            return Err("ESSIV needs a hash".into());
        }
        Ok(())
    }

    /// The `cipher_mode` string of the header: `xts-plain64`, `cbc-essiv:sha256`, ...
    fn mode_string(&self) -> String {
        let mut s = format!("{}-{}", self.mode.as_str(), self.ivgen.as_str());
        if self.ivgen == IvGenAlg::Essiv {
            s.push(':');
            s.push_str(self.ivgen_hash.unwrap_or(HashAlg::Sha256).as_str());
        }
        s
    }

    /// Parse the header's cipher name and mode; `key_bytes` gives the AES key size.
    fn parse(name: &str, mode: &str, key_bytes: usize) -> Result<CipherSpec, String> {
        if name != "aes" {
            return Err(format!(
                "LUKS cipher '{name}' (only aes is implemented; convert the image with qemu-img to an aes cipher)"
            ));
        }
        let (m, iv) = mode
            .split_once('-')
            .ok_or_else(|| format!("LUKS cipher mode '{mode}'"))?;
        let mode_alg =
            CipherMode::parse(m).ok_or_else(|| format!("LUKS cipher mode '{m}' in '{mode}'"))?;
        let (iv_name, iv_hash) = match iv.split_once(':') {
            Some((a, h)) => (
                a,
                Some(HashAlg::parse(h).ok_or_else(|| format!("LUKS ESSIV hash '{h}'"))?),
            ),
            None => (iv, None),
        };
        let ivgen =
            IvGenAlg::parse(iv_name).ok_or_else(|| format!("LUKS IV generator '{iv_name}'"))?;
        let aes_len = match mode_alg {
            CipherMode::Xts if key_bytes.is_multiple_of(2) => key_bytes / 2,
            CipherMode::Xts => 0,
            CipherMode::Cbc => key_bytes,
        };
        let alg = CipherAlg::from_key_len(aes_len)
            .ok_or_else(|| format!("LUKS key size {key_bytes} for aes-{mode}"))?;
        let spec = CipherSpec {
            alg,
            mode: mode_alg,
            ivgen,
            ivgen_hash: if ivgen == IvGenAlg::Essiv {
                iv_hash
            } else {
                None
            },
        };
        spec.validate()?;
        Ok(spec)
    }

    /// The sector cipher for `key` (the master key, or a slot's derived key).
    pub(crate) fn cipher(&self, key: &[u8]) -> SectorCipher {
        let aes = self.alg.key_len();
        let mode = match self.mode {
            CipherMode::Xts => Mode::Xts {
                data: BlockCipher::new(&key[..aes]).expect("AES key length"),
                tweak: BlockCipher::new(&key[aes..2 * aes]).expect("AES key length"),
            },
            CipherMode::Cbc => Mode::Cbc(BlockCipher::new(&key[..aes]).expect("AES key length")),
        };
        let ivgen = match self.ivgen {
            IvGenAlg::Plain => IvGen::Plain,
            IvGenAlg::Plain64 => IvGen::Plain64,
            IvGenAlg::Essiv => {
                let h = self.ivgen_hash.unwrap_or(HashAlg::Sha256).hash(&[key]);
                IvGen::Essiv(BlockCipher::new(&h).expect("validated ESSIV hash length"))
            }
        };
        SectorCipher { mode, ivgen }
    }
}

/// One key slot.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Slot {
    pub active: bool,
    pub iterations: u32,
    pub salt: [u8; SALT_LEN],
    /// Start of the key material, in sectors from the start of the LUKS region.
    pub key_offset: u32,
    pub stripes: u32,
}

/// A parsed LUKS1 header.
#[derive(Clone)]
pub(crate) struct Header {
    pub cipher_name: String,
    pub cipher_mode: String,
    pub hash_spec: String,
    pub payload_offset: u32,
    pub key_bytes: u32,
    pub mk_digest: [u8; DIGEST_LEN],
    pub mk_salt: [u8; SALT_LEN],
    pub mk_iterations: u32,
    pub uuid: String,
    pub slots: [Slot; SLOTS],
    // Parsed from the strings above.
    pub spec: CipherSpec,
    pub hash: HashAlg,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn put_str(b: &mut [u8], s: &str) {
    let n = s.len().min(b.len() - 1);
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// How a header is wrong: the header is corrupt, or it names something not implemented.
pub(crate) enum HeaderError {
    Corrupt(String),
    Unsupported(String),
}

impl Header {
    /// Parse and validate the 592-byte header at the start of a LUKS region of `region_len`
    /// bytes.
    pub(crate) fn parse(b: &[u8], region_len: u64) -> Result<Header, HeaderError> {
        let corrupt = |m: String| Err(HeaderError::Corrupt(m));
        if b.len() < HEADER_LEN || b[..6] != MAGIC {
            return corrupt("Volume is not in LUKS format (bad magic in the LUKS header)".into());
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(HeaderError::Unsupported(format!(
                "LUKS version {version} (only LUKS1 is used in qcow2)"
            )));
        }
        let cipher_name = cstr(&b[8..40]);
        let cipher_mode = cstr(&b[40..72]);
        let hash_spec = cstr(&b[72..104]);
        let payload_offset = be32(b, 104);
        let key_bytes = be32(b, 108);
        if key_bytes == 0 || key_bytes > 64 {
            return corrupt(format!("LUKS key size {key_bytes} is out of range"));
        }
        let spec = CipherSpec::parse(&cipher_name, &cipher_mode, key_bytes as usize)
            .map_err(HeaderError::Unsupported)?;
        let hash = HashAlg::parse(&hash_spec)
            .ok_or_else(|| HeaderError::Unsupported(format!("LUKS hash '{hash_spec}'")))?;
        let mut h = Header {
            cipher_name,
            cipher_mode,
            hash_spec,
            payload_offset,
            key_bytes,
            mk_digest: b[112..132].try_into().unwrap(),
            mk_salt: b[132..164].try_into().unwrap(),
            mk_iterations: be32(b, 164),
            uuid: cstr(&b[168..208]),
            slots: std::array::from_fn(|_| Slot {
                active: false,
                iterations: 0,
                salt: [0; SALT_LEN],
                key_offset: 0,
                stripes: 0,
            }),
            spec,
            hash,
        };
        if h.mk_iterations == 0 || h.mk_iterations > max_iterations() {
            return corrupt(format!(
                "LUKS master key iteration count {} is out of range",
                h.mk_iterations
            ));
        }
        let material = h.material_len() as u64;
        let mut ranges: Vec<(u64, u64, usize)> = Vec::new();
        for i in 0..SLOTS {
            let at = 208 + i * 48;
            let state = be32(b, at);
            let slot = Slot {
                active: state == SLOT_ACTIVE,
                iterations: be32(b, at + 4),
                salt: b[at + 8..at + 40].try_into().unwrap(),
                key_offset: be32(b, at + 40),
                stripes: be32(b, at + 44),
            };
            if state != SLOT_ACTIVE && state != SLOT_INACTIVE {
                return corrupt(format!("LUKS key slot {i} has an invalid state {state:#x}"));
            }
            if slot.stripes != STRIPES {
                return corrupt(format!(
                    "LUKS key slot {i} is corrupted (stripes {} != {STRIPES})",
                    slot.stripes
                ));
            }
            let start = slot.key_offset as u64 * SECTOR as u64;
            if start < HEADER_LEN as u64 || start + material > region_len {
                return corrupt(format!(
                    "LUKS key slot {i} key material at {start:#x} lies outside the LUKS header area ({region_len} bytes)"
                ));
            }
            if slot.active && (slot.iterations == 0 || slot.iterations > max_iterations()) {
                return corrupt(format!(
                    "LUKS key slot {i} iteration count {} is out of range",
                    slot.iterations
                ));
            }
            for &(s, e, j) in &ranges {
                if start < e && s < start + material {
                    return corrupt(format!(
                        "LUKS key slots {j} and {i} have overlapping key material"
                    ));
                }
            }
            ranges.push((start, start + material, i));
            h.slots[i] = slot;
        }
        Ok(h)
    }

    /// The 592 header bytes.
    pub(crate) fn serialize(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[..6].copy_from_slice(&MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        put_str(&mut b[8..40], &self.cipher_name);
        put_str(&mut b[40..72], &self.cipher_mode);
        put_str(&mut b[72..104], &self.hash_spec);
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_salt);
        b[164..168].copy_from_slice(&self.mk_iterations.to_be_bytes());
        put_str(&mut b[168..208], &self.uuid);
        for (i, s) in self.slots.iter().enumerate() {
            let at = 208 + i * 48;
            let state = if s.active { SLOT_ACTIVE } else { SLOT_INACTIVE };
            b[at..at + 4].copy_from_slice(&state.to_be_bytes());
            b[at + 4..at + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[at + 8..at + 40].copy_from_slice(&s.salt);
            b[at + 40..at + 44].copy_from_slice(&s.key_offset.to_be_bytes());
            b[at + 44..at + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }

    /// Bytes of one slot's key material.
    pub(crate) fn material_len(&self) -> usize {
        self.key_bytes as usize * STRIPES as usize
    }

    /// Where slot `i`'s key material lies in the region: (byte offset, length).
    pub(crate) fn material_range(&self, i: usize) -> (u64, usize) {
        (
            self.slots[i].key_offset as u64 * SECTOR as u64,
            self.material_len(),
        )
    }

    /// The master key if `password` opens slot `i` (whose key material is `material`).
    pub(crate) fn try_slot(&self, i: usize, password: &[u8], material: &[u8]) -> Option<Secret> {
        let slot = &self.slots[i];
        let kb = self.key_bytes as usize;
        let mut derived = Zeroizing::new(vec![0u8; kb]);
        self.hash
            .pbkdf2(password, &slot.salt, slot.iterations, &mut derived);
        let mut split = Zeroizing::new(material.to_vec());
        decrypt_material(&self.spec.cipher(&derived), &mut split);
        let mk = af_merge(&split, kb, STRIPES as usize, self.hash);
        self.verify_master_key(&mk).then_some(mk)
    }

    /// Whether `mk` is the master key (its PBKDF2 digest matches, compared in constant time).
    pub(crate) fn verify_master_key(&self, mk: &[u8]) -> bool {
        let mut digest = [0u8; DIGEST_LEN];
        self.hash
            .pbkdf2(mk, &self.mk_salt, self.mk_iterations, &mut digest);
        digest.ct_eq(&self.mk_digest).into()
    }

    /// Fill slot `i` with `password` for master key `mk`: returns the encrypted key material to
    /// write at `material_range(i)` (the header's slot is updated in memory; the caller writes
    /// material first, then the header).
    pub(crate) fn set_slot(
        &mut self,
        i: usize,
        password: &[u8],
        mk: &[u8],
        iter_time_ms: u64,
    ) -> Result<Vec<u8>, String> {
        let kb = self.key_bytes as usize;
        let mut salt = [0u8; SALT_LEN];
        random(&mut salt)?;
        let iterations = iterations_for(self.hash, kb, iter_time_ms, 1)?;
        let mut derived = Zeroizing::new(vec![0u8; kb]);
        self.hash.pbkdf2(password, &salt, iterations, &mut derived);
        let mut split = af_split(mk, STRIPES as usize, self.hash)?;
        encrypt_material(&self.spec.cipher(&derived), &mut split);
        let slot = &mut self.slots[i];
        slot.active = true;
        slot.iterations = iterations;
        slot.salt = salt;
        Ok(split.to_vec())
    }

    /// Mark slot `i` inactive (its material is to be overwritten by the caller).
    pub(crate) fn clear_slot(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        slot.active = false;
        slot.iterations = 0;
        slot.salt = [0; SALT_LEN];
    }

    /// A new header for `spec` and `hash` with a random master key (returned). No slot is
    /// active yet. The layout is QEMU's: slot material from 4 KiB on, each slot's material
    /// rounded up to 4 KiB; returns the region length too.
    pub(crate) fn new(
        spec: CipherSpec,
        hash: HashAlg,
        iter_time_ms: u64,
    ) -> Result<(Header, Secret, u64), String> {
        spec.validate()?;
        let kb = spec.key_bytes();
        let mut mk = Zeroizing::new(vec![0u8; kb]);
        random(&mut mk)?;
        let mut mk_salt = [0u8; SALT_LEN];
        random(&mut mk_salt)?;
        let mk_iterations = iterations_for(hash, DIGEST_LEN, iter_time_ms, 8)?;
        let material = (kb as u64 * STRIPES as u64).div_ceil(ALIGN) * ALIGN;
        let first = ALIGN / SECTOR as u64;
        let per = material / SECTOR as u64;
        let slots = std::array::from_fn(|i| Slot {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            key_offset: (first + i as u64 * per) as u32,
            stripes: STRIPES,
        });
        let payload = first + SLOTS as u64 * per;
        let mut h = Header {
            cipher_name: "aes".into(),
            cipher_mode: spec.mode_string(),
            hash_spec: hash.as_str().into(),
            payload_offset: payload as u32,
            key_bytes: kb as u32,
            mk_digest: [0; DIGEST_LEN],
            mk_salt,
            mk_iterations,
            uuid: uuid_v4()?,
            slots,
            spec,
            hash,
        };
        hash.pbkdf2(&mk, &h.mk_salt, h.mk_iterations, &mut h.mk_digest);
        Ok((h, mk, payload * SECTOR as u64))
    }
}

/// PBKDF2 iterations for `iter_time_ms` (QEMU's rule: the measured rate times the time, divided
/// by `divisor` (8 for the master key digest), at least 1000).
fn iterations_for(
    hash: HashAlg,
    key_len: usize,
    iter_time_ms: u64,
    divisor: u64,
) -> Result<u32, String> {
    let rate = hash.iterations_per_second(key_len);
    let n = (rate as u128 * iter_time_ms as u128 / 1000 / divisor as u128) as u64;
    let n = n.max(MIN_ITERATIONS);
    if n > MAX_ITERATIONS as u64 {
        return Err(format!(
            "PBKDF2 iteration count {n} for an iteration time of {iter_time_ms} ms is too large"
        ));
    }
    Ok(n as u32)
}

fn random(buf: &mut [u8]) -> Result<(), String> {
    getrandom::getrandom(buf).map_err(|e| format!("cannot get random bytes: {e}"))
}

fn uuid_v4() -> Result<String, String> {
    let mut b = [0u8; 16];
    random(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

/// Encrypt key material (any multiple of 16 bytes; a last partial sector is encrypted as the
/// start of a whole one, which is what QEMU's sector helper does).
pub(crate) fn encrypt_material(c: &SectorCipher, buf: &mut [u8]) {
    crypt_partial(c, buf, true)
}

fn decrypt_material(c: &SectorCipher, buf: &mut [u8]) {
    crypt_partial(c, buf, false)
}

fn crypt_partial(c: &SectorCipher, buf: &mut [u8], encrypt: bool) {
    let whole = buf.len() / SECTOR * SECTOR;
    let (head, tail) = buf.split_at_mut(whole);
    let sectors = (whole / SECTOR) as u64;
    if encrypt {
        c.encrypt(head, 0)
    } else {
        c.decrypt(head, 0)
    }
    if !tail.is_empty() {
        let mut s = Zeroizing::new([0u8; SECTOR]);
        s[..tail.len()].copy_from_slice(tail);
        if encrypt {
            c.encrypt(&mut s[..], sectors)
        } else {
            c.decrypt(&mut s[..], sectors)
        }
        let n = tail.len();
        tail.copy_from_slice(&s[..n]);
    }
}

/// The LUKS1 diffuser: each digest-sized piece of `buf` replaced by H(be32(index) || piece).
fn diffuse(buf: &mut [u8], hash: HashAlg) {
    let ds = hash.digest_len();
    for (i, chunk) in buf.chunks_mut(ds).enumerate() {
        let d = hash.hash(&[&(i as u32).to_be_bytes(), chunk]);
        let n = chunk.len();
        chunk.copy_from_slice(&d[..n]);
    }
}

/// Split `key` into `stripes` stripes (random, except the last).
fn af_split(key: &[u8], stripes: usize, hash: HashAlg) -> Result<Secret, String> {
    let n = key.len();
    let mut out = Zeroizing::new(vec![0u8; n * stripes]);
    random(&mut out[..n * (stripes - 1)])?;
    let mut d = Zeroizing::new(vec![0u8; n]);
    for s in out[..n * (stripes - 1)].chunks(n) {
        for (x, y) in d.iter_mut().zip(s) {
            *x ^= y;
        }
        diffuse(&mut d, hash);
    }
    for ((o, x), k) in out[n * (stripes - 1)..].iter_mut().zip(d.iter()).zip(key) {
        *o = x ^ k;
    }
    Ok(out)
}

/// Merge stripes back into the key.
fn af_merge(split: &[u8], n: usize, stripes: usize, hash: HashAlg) -> Secret {
    let mut d = Zeroizing::new(vec![0u8; n]);
    for s in split[..n * (stripes - 1)].chunks(n) {
        for (x, y) in d.iter_mut().zip(s) {
            *x ^= y;
        }
        diffuse(&mut d, hash);
    }
    for (x, y) in d.iter_mut().zip(&split[n * (stripes - 1)..n * stripes]) {
        *x ^= y;
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn af_round_trip() {
        for hash in [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512] {
            let key: Vec<u8> = (0..64).collect();
            let split = af_split(&key, 40, hash).unwrap();
            assert_eq!(&af_merge(&split, 64, 40, hash)[..], &key[..]);
            let mut bad = split.to_vec();
            bad[3] ^= 1;
            assert_ne!(&af_merge(&bad, 64, 40, hash)[..], &key[..]);
        }
    }

    #[test]
    fn header_round_trip_and_unlock() {
        for (mode, ivgen, alg) in [
            (CipherMode::Xts, IvGenAlg::Plain64, CipherAlg::Aes256),
            (CipherMode::Cbc, IvGenAlg::Essiv, CipherAlg::Aes192),
            (CipherMode::Cbc, IvGenAlg::Plain, CipherAlg::Aes128),
        ] {
            let spec = CipherSpec {
                alg,
                mode,
                ivgen,
                ivgen_hash: (ivgen == IvGenAlg::Essiv).then_some(HashAlg::Sha256),
            };
            let (mut h, mk, len) = Header::new(spec, HashAlg::Sha256, 1).unwrap();
            let material = h.set_slot(0, b"pw", &mk, 1).unwrap();
            let parsed = Header::parse(&h.serialize(), len).ok().unwrap();
            assert_eq!(parsed.serialize(), h.serialize());
            assert_eq!(parsed.spec, spec);
            assert_eq!(&parsed.try_slot(0, b"pw", &material).unwrap()[..], &mk[..]);
            assert!(parsed.try_slot(0, b"wrong", &material).is_none());
        }
    }
}
