//! Encryption of guest data: LUKS (crypt_method 2) and legacy AES (crypt_method 1).
//!
//! Only guest data is encrypted; metadata, zero and unallocated clusters are plaintext. Every
//! 512-byte sector of guest data is encrypted on its own, with an IV made from a sector
//! number, and the two methods take that number from different places:
//!
//! * LUKS: the HOST sector (host file offset / 512). A cluster that moves (copy-on-write,
//!   reallocation) must be decrypted at its old place and encrypted again at its new one.
//! * legacy AES: the GUEST sector (guest offset / 512), AES-128-CBC, the key being the
//!   password's bytes in 16 zeroed bytes. There is no key check: a wrong password reads
//!   garbage. QEMU deprecated it (no KDF, no salt, a key that is the password, a
//!   predictable IV, and the guest-sector IV leaks which sectors hold equal data); it is here
//!   so that old images can be read and converted to LUKS.
//!
//! The data path (`datapath.rs`) calls [`Crypto::encrypt`] and [`Crypto::decrypt`] with both
//! offsets of the bytes it moves; this module picks the right one.

mod cipher;
pub(crate) mod luks;

use std::fmt;

use zeroize::Zeroizing;

pub use luks::{CipherAlg, CipherMode, HashAlg, IvGenAlg};

use crate::error::{Error, Result};
use crate::offset::{GuestOffset, HostOffset};
pub(crate) use cipher::{parallelism, SECTOR};
use cipher::{BlockCipher, IvGen, Mode, SectorCipher};

/// A password or key: bytes, wiped from memory when dropped, never shown by `Debug`.
#[derive(Clone)]
pub struct Password(Zeroizing<Vec<u8>>);

impl Password {
    /// A password from bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Password {
        Password(Zeroizing::new(bytes.into()))
    }
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

impl From<&str> for Password {
    fn from(s: &str) -> Password {
        Password::new(s.as_bytes())
    }
}
impl From<String> for Password {
    fn from(s: String) -> Password {
        Password::new(s.into_bytes())
    }
}
impl From<&[u8]> for Password {
    fn from(s: &[u8]) -> Password {
        Password::new(s)
    }
}
impl From<Vec<u8>> for Password {
    fn from(s: Vec<u8>) -> Password {
        Password::new(s)
    }
}

/// Encryption format of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncryptionFormat {
    /// LUKS (qcow2 crypt_method 2): PBKDF2 key slots, AES-XTS by default. The choice.
    Luks,
    /// Legacy AES-128-CBC (crypt_method 1): no key check, deprecated by QEMU; for old images.
    Aes,
}

impl EncryptionFormat {
    /// Parse `luks` or `aes` (qemu's `encrypt.format`).
    pub fn parse(s: &str) -> Result<EncryptionFormat> {
        match s {
            "luks" => Ok(EncryptionFormat::Luks),
            "aes" => Ok(EncryptionFormat::Aes),
            _ => Err(Error::invalid(format!(
                "Invalid encryption format '{s}' (use luks or aes)"
            ))),
        }
    }
    /// `luks` or `aes`.
    pub fn as_str(self) -> &'static str {
        match self {
            EncryptionFormat::Luks => "luks",
            EncryptionFormat::Aes => "aes",
        }
    }
}

/// How to encrypt a new image (`qemu-img create -o encrypt.*`).
#[derive(Debug, Clone)]
pub struct EncryptionOptions {
    /// LUKS or legacy AES.
    pub format: EncryptionFormat,
    /// The password (`encrypt.key-secret`).
    pub password: Password,
    /// LUKS: `encrypt.cipher-alg` (default aes-256).
    pub cipher_alg: CipherAlg,
    /// LUKS: `encrypt.cipher-mode` (default xts).
    pub cipher_mode: CipherMode,
    /// LUKS: `encrypt.ivgen-alg` (default plain64).
    pub ivgen_alg: IvGenAlg,
    /// LUKS: `encrypt.ivgen-hash-alg`, for ESSIV (default sha256).
    pub ivgen_hash_alg: HashAlg,
    /// LUKS: `encrypt.hash-alg`, for PBKDF2 and the AF splitter (default sha256).
    pub hash_alg: HashAlg,
    /// LUKS: `encrypt.iter-time`, milliseconds of PBKDF2 per key slot (default 2000).
    pub iter_time_ms: u64,
}

impl EncryptionOptions {
    /// LUKS with qemu-img's defaults: aes-256, xts, plain64, sha256, 2 s of PBKDF2.
    pub fn luks(password: impl Into<Password>) -> EncryptionOptions {
        EncryptionOptions {
            format: EncryptionFormat::Luks,
            password: password.into(),
            cipher_alg: CipherAlg::Aes256,
            cipher_mode: CipherMode::Xts,
            ivgen_alg: IvGenAlg::Plain64,
            ivgen_hash_alg: HashAlg::Sha256,
            hash_alg: HashAlg::Sha256,
            iter_time_ms: 2000,
        }
    }
    /// Legacy AES (for compatibility only: prefer [`EncryptionOptions::luks`]).
    pub fn aes(password: impl Into<Password>) -> EncryptionOptions {
        EncryptionOptions {
            format: EncryptionFormat::Aes,
            ..EncryptionOptions::luks(password)
        }
    }
}

/// One LUKS key slot, as `info` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksSlotInfo {
    /// Whether the slot holds a password.
    pub active: bool,
    /// PBKDF2 iterations (active slots).
    pub iters: Option<u32>,
    /// Anti-forensic stripes (active slots).
    pub stripes: Option<u32>,
    /// Offset of the key material in the LUKS header area, in bytes.
    pub key_offset: u64,
}

/// The LUKS header, as `info` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksInfo {
    /// `aes-128`, `aes-192` or `aes-256`.
    pub cipher_alg: CipherAlg,
    /// `xts` or `cbc`.
    pub cipher_mode: CipherMode,
    /// `plain`, `plain64` or `essiv`.
    pub ivgen_alg: IvGenAlg,
    /// The ESSIV hash (ESSIV only).
    pub ivgen_hash_alg: Option<HashAlg>,
    /// PBKDF2 / AF hash.
    pub hash_alg: HashAlg,
    /// The volume UUID.
    pub uuid: String,
    /// The header's payload offset, in bytes (the size of the LUKS header area).
    pub payload_offset: u64,
    /// PBKDF2 iterations of the master key digest.
    pub master_key_iters: u32,
    /// The eight key slots.
    pub slots: Vec<LuksSlotInfo>,
}

/// How an image is encrypted, for `info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptionInfo {
    /// LUKS or AES.
    pub format: EncryptionFormat,
    /// The LUKS header (LUKS only).
    pub luks: Option<LuksInfo>,
}

/// Where the LUKS header area is in the host file.
#[derive(Clone)]
pub(crate) struct LuksArea {
    pub header: luks::Header,
    pub offset: HostOffset,
    pub len: u64,
}

/// The encryption of an open image.
pub(crate) struct Crypto {
    /// None when opened without a password, for inspection only.
    cipher: Option<SectorCipher>,
    /// LUKS: IVs from host sectors; AES: from guest sectors.
    by_host: bool,
    pub(crate) luks: Option<LuksArea>,
    /// The master key (LUKS, when unlocked), for adding key slots.
    master_key: Option<luks::Secret>,
}

impl Crypto {
    /// Legacy AES with `password` (`None`: inspection only).
    pub(crate) fn aes(password: Option<&Password>) -> Crypto {
        Crypto {
            cipher: password.map(|p| aes_cipher(p.as_bytes())),
            by_host: false,
            luks: None,
            master_key: None,
        }
    }

    /// LUKS with a master key (`None`: inspection only).
    pub(crate) fn luks(area: LuksArea, master_key: Option<luks::Secret>) -> Crypto {
        Crypto {
            cipher: master_key.as_ref().map(|k| area.header.spec.cipher(k)),
            by_host: true,
            luks: Some(area),
            master_key,
        }
    }

    /// Whether data can be read and written (a key was given).
    pub(crate) fn unlocked(&self) -> bool {
        self.cipher.is_some()
    }

    pub(crate) fn master_key(&self) -> Option<&[u8]> {
        self.master_key.as_deref().map(|v| v.as_slice())
    }

    fn sector(&self, host: HostOffset, guest: GuestOffset) -> u64 {
        if self.by_host {
            host.sector()
        } else {
            guest.sector()
        }
    }

    fn cipher(&self, file: &str) -> Result<&SectorCipher> {
        self.cipher.as_ref().ok_or_else(|| Error::NeedKey {
            file: file.to_string(),
        })
    }

    /// Encrypt `buf` (whole sectors), the guest bytes at `guest`, stored at `host`.
    pub(crate) fn encrypt(
        &self,
        file: &str,
        buf: &mut [u8],
        host: HostOffset,
        guest: GuestOffset,
    ) -> Result<()> {
        self.run(file, buf, host, guest, true)
    }

    /// Decrypt `buf` (whole sectors), read from `host`, the guest bytes at `guest`.
    pub(crate) fn decrypt(
        &self,
        file: &str,
        buf: &mut [u8],
        host: HostOffset,
        guest: GuestOffset,
    ) -> Result<()> {
        self.run(file, buf, host, guest, false)
    }

    /// [`Crypto::decrypt`] on this thread only, whatever the size (for a caller that already
    /// spreads a request over the cores).
    pub(crate) fn decrypt_here(
        &self,
        file: &str,
        buf: &mut [u8],
        host: HostOffset,
        guest: GuestOffset,
    ) -> Result<()> {
        check_aligned(file, buf.len(), host, guest)?;
        let (cipher, sector) = (self.cipher(file)?, self.sector(host, guest));
        cipher.decrypt_serial(buf, sector);
        Ok(())
    }

    fn run(
        &self,
        file: &str,
        buf: &mut [u8],
        host: HostOffset,
        guest: GuestOffset,
        encrypt: bool,
    ) -> Result<()> {
        check_aligned(file, buf.len(), host, guest)?;
        let (cipher, sector) = (self.cipher(file)?, self.sector(host, guest));
        if encrypt {
            cipher.encrypt(buf, sector)
        } else {
            cipher.decrypt(buf, sector)
        }
        Ok(())
    }

    /// What `info` shows.
    pub(crate) fn info(&self) -> EncryptionInfo {
        match &self.luks {
            None => EncryptionInfo {
                format: EncryptionFormat::Aes,
                luks: None,
            },
            Some(a) => {
                let h = &a.header;
                EncryptionInfo {
                    format: EncryptionFormat::Luks,
                    luks: Some(LuksInfo {
                        cipher_alg: h.spec.alg,
                        cipher_mode: h.spec.mode,
                        ivgen_alg: h.spec.ivgen,
                        ivgen_hash_alg: h.spec.ivgen_hash,
                        hash_alg: h.hash,
                        uuid: h.uuid.clone(),
                        payload_offset: h.payload_offset as u64 * SECTOR as u64,
                        master_key_iters: h.mk_iterations,
                        slots: h
                            .slots
                            .iter()
                            .map(|s| LuksSlotInfo {
                                active: s.active,
                                iters: s.active.then_some(s.iterations),
                                stripes: s.active.then_some(s.stripes),
                                key_offset: s.key_offset as u64 * SECTOR as u64,
                            })
                            .collect(),
                    }),
                }
            }
        }
    }
}

fn check_aligned(file: &str, len: usize, host: HostOffset, guest: GuestOffset) -> Result<()> {
    if !len.is_multiple_of(SECTOR)
        || !host.get().is_multiple_of(SECTOR as u64)
        || !guest.get().is_multiple_of(SECTOR as u64)
    {
        // The data path widens every request to whole sectors first; this is a bug guard.
        return Err(Error::invalid(format!(
            "{file}: encrypted I/O of {len} bytes at guest {:#x} / host {:#x} is not sector-aligned",
            guest.get(),
            host.get()
        )));
    }
    Ok(())
}

/// The legacy AES cipher: AES-128-CBC keyed by the password's first 16 bytes (zero-padded),
/// IV = the 64-bit sector number.
fn aes_cipher(password: &[u8]) -> SectorCipher {
    let mut key = Zeroizing::new([0u8; 16]);
    let n = password.len().min(16);
    key[..n].copy_from_slice(&password[..n]);
    SectorCipher {
        mode: Mode::Cbc(BlockCipher::new(&key[..]).expect("16-byte key")),
        ivgen: IvGen::Plain64,
    }
}

/// The LUKS cipher spec of creation options.
pub(crate) fn spec_of(opts: &EncryptionOptions) -> luks::CipherSpec {
    luks::CipherSpec {
        alg: opts.cipher_alg,
        mode: opts.cipher_mode,
        ivgen: opts.ivgen_alg,
        ivgen_hash: (opts.ivgen_alg == IvGenAlg::Essiv).then_some(opts.ivgen_hash_alg),
    }
}

/// Largest LUKS header area accepted (QEMU's default is 2 MiB; key material of 64-byte keys
/// for eight slots needs about that).
const MAX_LUKS_AREA: u64 = 64 << 20;

/// Set up the encryption of an image being opened: `None` for a plain image. Without a
/// password the image opens only with `without_key` (inspection: no guest data I/O).
pub(crate) fn open(
    name: &str,
    h: &crate::format::header::Header,
    storage: &dyn crate::storage::Storage,
    file_len: u64,
    password: Option<&Password>,
    without_key: bool,
) -> Result<Option<Crypto>> {
    use crate::format::{self as fmt, header};
    let need_key = || {
        if password.is_none() && !without_key {
            Err(Error::NeedKey {
                file: name.to_string(),
            })
        } else {
            Ok(())
        }
    };
    match h.crypt_method {
        0 => Ok(None),
        1 => {
            need_key()?;
            Ok(Some(Crypto::aes(password)))
        }
        2 => {
            let ext = h.extension(header::EXT_CRYPTO).unwrap_or_default();
            let (off, len) = (fmt::be64(ext, 0), fmt::be64(ext, 8));
            let cs = h.cluster_size();
            if !off.is_multiple_of(cs) || off == 0 {
                return Err(Error::corrupt(
                    name,
                    format!("LUKS header area offset {off:#x} is not a non-zero multiple of the cluster size"),
                    h.header_length as u64,
                ));
            }
            if len < luks::HEADER_LEN as u64 || len > MAX_LUKS_AREA {
                return Err(Error::corrupt(
                    name,
                    format!("LUKS header area length {len} is out of range"),
                    h.header_length as u64,
                ));
            }
            if off.checked_add(len).is_none_or(|e| e > file_len) {
                return Err(Error::corrupt(
                    name,
                    format!(
                        "LUKS header area at {off:#x} ({len} bytes) lies past the end of the file"
                    ),
                    h.header_length as u64,
                ));
            }
            let mut b = vec![0u8; luks::HEADER_LEN];
            storage
                .read_at(&mut b, off)
                .map_err(|e| Error::io(name, "read LUKS header", e))?;
            let header = luks::Header::parse(&b, len).map_err(|e| match e {
                luks::HeaderError::Corrupt(w) => Error::corrupt(name, w, off),
                luks::HeaderError::Unsupported(w) => Error::unsupported(name, w),
            })?;
            let area = LuksArea {
                header,
                offset: HostOffset::new(off),
                len,
            };
            need_key()?;
            let key = match password {
                Some(p) => Some(unlock(name, &area, storage, p.as_bytes())?),
                None => None,
            };
            Ok(Some(Crypto::luks(area, key)))
        }
        m => Err(Error::unsupported(name, format!("encryption method {m}"))),
    }
}

/// The master key, from the first active slot that `password` opens.
fn unlock(
    name: &str,
    area: &LuksArea,
    storage: &dyn crate::storage::Storage,
    password: &[u8],
) -> Result<luks::Secret> {
    let h = &area.header;
    let mut material = Zeroizing::new(vec![0u8; h.material_len()]);
    for i in 0..luks::SLOTS {
        if !h.slots[i].active {
            continue;
        }
        let (at, _) = h.material_range(i);
        storage
            .read_at(&mut material, area.offset.get() + at)
            .map_err(|e| Error::io(name, format!("read LUKS key slot {i}"), e))?;
        if let Some(k) = h.try_slot(i, password, &material) {
            return Ok(k);
        }
    }
    Err(Error::BadKey {
        file: name.to_string(),
    })
}

/// A new LUKS header area for `opts`: (its bytes, to be written at a cluster-aligned offset,
/// and the crypto for the image).
pub(crate) fn new_luks(
    name: &str,
    opts: &EncryptionOptions,
) -> Result<(Vec<u8>, luks::Header, luks::Secret)> {
    let (mut header, mk, len) = luks::Header::new(spec_of(opts), opts.hash_alg, opts.iter_time_ms)
        .map_err(|e| Error::invalid(format!("{name}: {e}")))?;
    let material = header
        .set_slot(0, opts.password.as_bytes(), &mk, opts.iter_time_ms)
        .map_err(|e| Error::invalid(format!("{name}: {e}")))?;
    let mut area = vec![0u8; len as usize];
    let (at, n) = header.material_range(0);
    area[at as usize..at as usize + n].copy_from_slice(&material);
    area[..luks::HEADER_LEN].copy_from_slice(&header.serialize());
    Ok((area, header, mk))
}

/// The sector cipher's own speed on this machine (for `qcow2rs bench --cipher-speed`): bytes
/// per second for (encrypt, decrypt) on one thread, of one 64 KiB buffer over and over (a
/// request as the I/O path sees it, in cache), then (encrypt, decrypt) of one buffer of
/// `bytes` bytes (rounded to sectors) split across the cores.
#[doc(hidden)]
pub fn cipher_speed(opts: &EncryptionOptions, bytes: usize) -> [f64; 4] {
    let cipher = match opts.format {
        EncryptionFormat::Aes => aes_cipher(opts.password.as_bytes()),
        EncryptionFormat::Luks => {
            let spec = spec_of(opts);
            let key = vec![0x5au8; spec.key_bytes()];
            spec.cipher(&key)
        }
    };
    let mut buf = vec![0x33u8; bytes.max(SECTOR) / SECTOR * SECTOR];
    let n = buf.len() as f64;
    let mut time = |f: &mut dyn FnMut(&mut [u8])| {
        let t = std::time::Instant::now();
        f(&mut buf);
        n / t.elapsed().as_secs_f64().max(1e-9)
    };
    let chunk = 64 << 10;
    let mut one = vec![0x33u8; chunk];
    let mut serial = |b: &mut [u8], encrypt: bool| {
        for i in 0..b.len().div_ceil(chunk) {
            let sector = (i * chunk / SECTOR) as u64;
            if encrypt {
                cipher.encrypt(&mut one, sector)
            } else {
                cipher.decrypt(&mut one, sector)
            }
        }
    };
    let serial_enc = time(&mut |b: &mut [u8]| serial(b, true));
    let serial_dec = time(&mut |b: &mut [u8]| serial(b, false));
    let par_enc = time(&mut |b: &mut [u8]| cipher.encrypt(b, 0));
    let par_dec = time(&mut |b: &mut [u8]| cipher.decrypt(b, 0));
    [serial_enc, serial_dec, par_enc, par_dec]
}
