//! Sector kernels for qcow2rs with VAES: XTS encryption and decryption and CBC decryption of
//! 512-byte sectors, and block-by-block encryption of IVs, two AES blocks per instruction in
//! 256-bit registers.
//!
//! This crate holds the SIMD code, and so the `unsafe`, that the engine (`qcow2rs`, which keeps
//! `#![forbid(unsafe_code)]`) needs for its cipher to keep up with the page cache. Its API is
//! safe: a [`Keys`] is only made on a CPU that has AES-NI, AVX2, VAES and VPCLMULQDQ (checked
//! at run time; AMD Zen 3 and later, Intel Ice Lake and later), which is what makes the calls
//! into the `#[target_feature]` kernels sound; elsewhere [`Keys::new`] returns `None` and the
//! caller uses its portable path. The modes themselves (which sectors, which IVs, the tweak
//! encryption) stay in the engine; the kernels take each sector's IV (for XTS: the encrypted
//! tweak) ready-made.
//!
//! Why a kernel of its own rather than the `aes` crate's block calls: the XTS whitening and the
//! CBC chaining are folded into the first and last rounds (`x ^ tweak ^ k0`, then the last
//! round with `k_last ^ tweak` or `k_last ^ previous ciphertext`), so each byte goes through
//! memory once; with an ECB call in between, the whitening takes two more passes.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

#[cfg(target_arch = "x86_64")]
mod x86;

/// Sector size: every call works on whole 512-byte sectors.
pub const SECTOR: usize = 512;

/// The round keys of one AES key (128, 192 or 256 bits) for the VAES kernels. Zeroized on
/// drop; `Debug` shows nothing of them.
pub struct Keys {
    #[cfg(target_arch = "x86_64")]
    inner: Box<x86::Keys>,
    #[cfg(not(target_arch = "x86_64"))]
    never: std::convert::Infallible,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    /// Round keys for `key` (16, 24 or 32 bytes), or `None` if the key has another length or
    /// this CPU cannot run the kernels.
    pub fn new(key: &[u8]) -> Option<Keys> {
        #[cfg(target_arch = "x86_64")]
        {
            x86::Keys::new(key).map(|k| Keys { inner: k })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = key;
            None
        }
    }

    /// Whether this CPU can run the kernels.
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            x86::available()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// XTS-encrypt `buf` (whole sectors) in place with these as the data keys; `tweaks[i]` is
    /// sector `i`'s IV already encrypted with the tweak key.
    ///
    /// # Panics
    /// If `buf` is not whole sectors or there are fewer tweaks than sectors.
    pub fn xts_encrypt(&self, buf: &mut [u8], tweaks: &[[u8; 16]]) {
        check(buf, tweaks.len());
        #[cfg(target_arch = "x86_64")]
        self.inner.xts(buf, tweaks, true);
        #[cfg(not(target_arch = "x86_64"))]
        match self.never {}
    }

    /// XTS-decrypt `buf` (whole sectors) in place; `tweaks` as for [`Keys::xts_encrypt`].
    ///
    /// # Panics
    /// If `buf` is not whole sectors or there are fewer tweaks than sectors.
    pub fn xts_decrypt(&self, buf: &mut [u8], tweaks: &[[u8; 16]]) {
        check(buf, tweaks.len());
        #[cfg(target_arch = "x86_64")]
        self.inner.xts(buf, tweaks, false);
        #[cfg(not(target_arch = "x86_64"))]
        match self.never {}
    }

    /// Encrypt each 16-byte block of `buf` on its own (ECB: for IVs and XTS tweaks).
    ///
    /// # Panics
    /// If `buf` is not whole blocks.
    pub fn encrypt_blocks(&self, buf: &mut [u8]) {
        assert!(buf.len().is_multiple_of(16), "{} bytes", buf.len());
        #[cfg(target_arch = "x86_64")]
        self.inner.encrypt_blocks(buf);
        #[cfg(not(target_arch = "x86_64"))]
        match self.never {}
    }

    /// CBC-decrypt `buf` (whole sectors, one chain each) in place; `ivs[i]` is sector `i`'s IV.
    ///
    /// # Panics
    /// If `buf` is not whole sectors or there are fewer IVs than sectors.
    pub fn cbc_decrypt(&self, buf: &mut [u8], ivs: &[[u8; 16]]) {
        check(buf, ivs.len());
        #[cfg(target_arch = "x86_64")]
        self.inner.cbc_decrypt(buf, ivs);
        #[cfg(not(target_arch = "x86_64"))]
        match self.never {}
    }
}

fn check(buf: &[u8], ivs: usize) {
    assert!(
        buf.len().is_multiple_of(SECTOR) && buf.len() / SECTOR <= ivs,
        "{} bytes with {ivs} IVs",
        buf.len()
    );
}
