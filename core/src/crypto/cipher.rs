//! Sector ciphers: AES in XTS or CBC mode over 512-byte sectors, with QEMU's IV generators
//! (`plain`, `plain64`, `essiv`).
//!
//! The block cipher is RustCrypto's `aes` (AES-NI where the CPU has it, eight blocks in
//! flight per call; constant-time software otherwise). The modes are written here rather
//! than taken from `xts-mode` and `cbc` because those crates run one block at a time, which
//! leaves the AES pipeline idle: XTS and CBC decryption put eight sectors (256 blocks)
//! through the cipher in one call, CBC encryption (serial within a sector) runs eight sectors
//! side by side, block `i` of each in one call, and the IVs (XTS's encrypted tweaks too) of
//! 64 sectors are made in one call. The tests check both modes against the crates. Large
//! buffers are split across the machine's cores.
//!
//! (`aes` 0.9's VAES-512 backend was measured here too, on a CPU that has it: no faster for
//! these modes than AES-NI eight blocks wide, and slower for CBC encryption.)

use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::{Aes128, Aes192, Aes256, Block};

/// Sector size of every qcow2 encryption method.
pub(crate) const SECTOR: usize = 512;
const BLOCKS: usize = SECTOR / 16;
/// Sectors per cipher call in XTS and in CBC decryption (256 blocks).
const BATCH: usize = 8;
/// Sectors encrypted side by side in CBC mode: AES-NI's eight blocks in flight.
const LANES: usize = 8;
/// Sectors whose IVs are made in one call.
const IVS: usize = 64;
/// Buffers at least this large are split across cores.
const PARALLEL_MIN: usize = 256 << 10;

/// AES with a 128, 192 or 256-bit key. The round keys are zeroized on drop (`aes/zeroize`).
pub(crate) enum BlockCipher {
    Aes128(Aes128),
    Aes192(Aes192),
    Aes256(Aes256),
}

impl BlockCipher {
    /// A cipher for `key` (16, 24 or 32 bytes).
    pub(crate) fn new(key: &[u8]) -> Option<BlockCipher> {
        Some(match key.len() {
            16 => BlockCipher::Aes128(Aes128::new(GenericArray::from_slice(key))),
            24 => BlockCipher::Aes192(Aes192::new(GenericArray::from_slice(key))),
            32 => BlockCipher::Aes256(Aes256::new(GenericArray::from_slice(key))),
            _ => return None,
        })
    }
    fn encrypt(&self, blocks: &mut [Block]) {
        match self {
            BlockCipher::Aes128(c) => c.encrypt_blocks(blocks),
            BlockCipher::Aes192(c) => c.encrypt_blocks(blocks),
            BlockCipher::Aes256(c) => c.encrypt_blocks(blocks),
        }
    }
    fn decrypt(&self, blocks: &mut [Block]) {
        match self {
            BlockCipher::Aes128(c) => c.decrypt_blocks(blocks),
            BlockCipher::Aes192(c) => c.decrypt_blocks(blocks),
            BlockCipher::Aes256(c) => c.decrypt_blocks(blocks),
        }
    }
}

/// `n` blocks rounded up to whole sets of eight: `cipher` runs a ragged tail one block at a
/// time, at the latency of the rounds rather than their throughput, so a short call is padded
/// with blocks whose output is dropped (a single block goes alone).
fn padded(n: usize) -> usize {
    if n < 2 {
        n
    } else {
        n.next_multiple_of(8)
    }
}

/// How the IV of a sector is made from its number.
// One per open image, used on every sector: no box, whatever the size of the variants.
#[allow(clippy::large_enum_variant)]
pub(crate) enum IvGen {
    /// Low 32 bits of the sector number, little-endian.
    Plain,
    /// The 64-bit sector number, little-endian.
    Plain64,
    /// `plain64` encrypted with a cipher keyed by the hash of the key.
    Essiv(BlockCipher),
}

impl IvGen {
    fn ivs(&self, first: u64, out: &mut [Block]) {
        for (i, iv) in out.iter_mut().enumerate() {
            let n = first.wrapping_add(i as u64);
            *iv = Block::default();
            match self {
                IvGen::Plain => iv[..4].copy_from_slice(&(n as u32).to_le_bytes()),
                IvGen::Plain64 | IvGen::Essiv(_) => iv[..8].copy_from_slice(&n.to_le_bytes()),
            }
        }
        if let IvGen::Essiv(c) = self {
            c.encrypt(out);
        }
    }
}

/// The chaining mode.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Mode {
    /// XTS: `data` encrypts the blocks, `tweak` the IV.
    Xts {
        data: BlockCipher,
        tweak: BlockCipher,
    },
    /// CBC, one chain per sector.
    Cbc(BlockCipher),
}

/// A cipher for whole 512-byte sectors, each with its own IV.
pub(crate) struct SectorCipher {
    pub(crate) mode: Mode,
    pub(crate) ivgen: IvGen,
}

/// 16 bytes as a little-endian 128-bit number (IEEE 1619 numbers the bits of a tweak so).
fn le(b: &[u8]) -> u128 {
    u128::from_le_bytes(b.try_into().expect("a 16-byte block"))
}

impl SectorCipher {
    /// Encrypt `buf` (whole sectors), whose first sector has IV number `sector`.
    pub(crate) fn encrypt(&self, buf: &mut [u8], sector: u64) {
        self.run(buf, sector, true)
    }

    /// Decrypt `buf` (whole sectors), whose first sector has IV number `sector`.
    pub(crate) fn decrypt(&self, buf: &mut [u8], sector: u64) {
        self.run(buf, sector, false)
    }

    fn run(&self, buf: &mut [u8], sector: u64, encrypt: bool) {
        debug_assert!(buf.len().is_multiple_of(SECTOR));
        let threads = parallelism();
        if buf.len() < PARALLEL_MIN || threads < 2 {
            return self.run_serial(buf, sector, encrypt);
        }
        let sectors = buf.len() / SECTOR;
        let per = sectors.div_ceil(threads);
        std::thread::scope(|scope| {
            let mut rest = buf;
            let mut first = sector;
            while !rest.is_empty() {
                let n = (per * SECTOR).min(rest.len());
                let (part, tail) = rest.split_at_mut(n);
                rest = tail;
                let at = first;
                first += (n / SECTOR) as u64;
                if rest.is_empty() {
                    // The last piece runs on this thread.
                    self.run_serial(part, at, encrypt);
                } else {
                    scope.spawn(move || self.run_serial(part, at, encrypt));
                }
            }
        });
    }

    fn run_serial(&self, buf: &mut [u8], sector: u64, encrypt: bool) {
        // The IVs (and XTS's tweaks) of up to IVS sectors are made in one call; the data
        // then goes through in batches of BATCH sectors, or LANES side by side for CBC
        // encryption.
        let mut ivs = [Block::default(); IVS];
        for (g, group) in buf.chunks_mut(SECTOR * IVS).enumerate() {
            let n = group.len() / SECTOR;
            self.ivgen
                .ivs(sector.wrapping_add((g * IVS) as u64), &mut ivs[..padded(n)]);
            if let Mode::Xts { tweak, .. } = &self.mode {
                tweak.encrypt(&mut ivs[..padded(n)]);
            }
            let ivs = &ivs[..n];
            match (&self.mode, encrypt) {
                (Mode::Xts { data, .. }, _) => {
                    for (part, ivs) in group.chunks_mut(SECTOR * BATCH).zip(ivs.chunks(BATCH)) {
                        xts_batch(data, part, ivs, encrypt);
                    }
                }
                (Mode::Cbc(c), true) => {
                    for (part, ivs) in group.chunks_mut(SECTOR * LANES).zip(ivs.chunks(LANES)) {
                        cbc_encrypt_lanes(c, part, ivs);
                    }
                }
                (Mode::Cbc(c), false) => {
                    for (part, ivs) in group.chunks_mut(SECTOR * BATCH).zip(ivs.chunks(BATCH)) {
                        cbc_decrypt_batch(c, part, ivs);
                    }
                }
            }
        }
    }
}

/// Up to `BATCH` XTS sectors: each block XORed with its tweak (the sector's encrypted IV
/// times alpha^i in GF(2^128)) on its way into a local batch, all of them through the
/// cipher at once, XORed again on the way back.
fn xts_batch(c: &BlockCipher, part: &mut [u8], tweaks: &[Block], encrypt: bool) {
    // The tweaks of a sector form a chain; four sectors' chains run interleaved, so that the
    // shifts of one do not wait on those of another, and stay in registers (a missing
    // sector's chain runs from zero and is not used).
    let n = tweaks.len();
    let mut tw = [0u128; BATCH * BLOCKS];
    for (tw, ivs) in tw.chunks_exact_mut(4 * BLOCKS).zip(tweaks.chunks(4)) {
        let mut t = [0u128; 4];
        for (t, iv) in t.iter_mut().zip(ivs) {
            *t = le(iv);
        }
        for i in 0..BLOCKS {
            for (s, t) in t.iter_mut().enumerate() {
                tw[s * BLOCKS + i] = *t;
                // Times alpha: shift left, folding the carry back in as x^7 + x^2 + x + 1.
                *t = (*t << 1) ^ ((((*t as i128) >> 127) as u128) & 0x87);
            }
        }
    }
    let mut blocks = [Block::default(); BATCH * BLOCKS];
    let blocks = &mut blocks[..n * BLOCKS];
    for ((b, chunk), t) in blocks.iter_mut().zip(part.chunks_exact(16)).zip(&tw) {
        *b = (le(chunk) ^ t).to_le_bytes().into();
    }
    if encrypt {
        c.encrypt(blocks);
    } else {
        c.decrypt(blocks);
    }
    for ((b, chunk), t) in blocks.iter().zip(part.chunks_exact_mut(16)).zip(&tw) {
        chunk.copy_from_slice(&(le(b) ^ t).to_le_bytes());
    }
}

/// CBC encryption of up to `LANES` sectors side by side: block `i` of every sector goes
/// through the cipher in one call. `lane[j]` carries sector `j`'s chain (its IV, then its
/// last ciphertext block); lanes past the last sector are padding.
fn cbc_encrypt_lanes(c: &BlockCipher, part: &mut [u8], ivs: &[Block]) {
    let n = ivs.len();
    let mut lane = [Block::default(); LANES];
    lane[..n].copy_from_slice(ivs);
    for i in 0..BLOCKS {
        for (j, l) in lane[..n].iter_mut().enumerate() {
            let at = j * SECTOR + i * 16;
            *l = (le(l) ^ le(&part[at..at + 16])).to_le_bytes().into();
        }
        c.encrypt(&mut lane[..padded(n)]);
        for (j, l) in lane[..n].iter().enumerate() {
            let at = j * SECTOR + i * 16;
            part[at..at + 16].copy_from_slice(l);
        }
    }
}

/// CBC decryption of up to `BATCH` sectors: all blocks through the cipher at once, then each
/// XORed with the ciphertext block before it (still in `part`) or the sector's IV.
fn cbc_decrypt_batch(c: &BlockCipher, part: &mut [u8], ivs: &[Block]) {
    let mut blocks = [Block::default(); BATCH * BLOCKS];
    let blocks = &mut blocks[..ivs.len() * BLOCKS];
    for (b, chunk) in blocks.iter_mut().zip(part.chunks_exact(16)) {
        b.copy_from_slice(chunk);
    }
    c.decrypt(blocks);
    // Back to front, so that the ciphertext block before each is still there.
    for i in (0..blocks.len()).rev() {
        let prev = if i % BLOCKS == 0 {
            le(&ivs[i / BLOCKS])
        } else {
            le(&part[(i - 1) * 16..i * 16])
        };
        part[i * 16..i * 16 + 16].copy_from_slice(&(le(&blocks[i]) ^ prev).to_le_bytes());
    }
}

fn parallelism() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(8)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Sector counts around every batch boundary: one sector, a batch and a lane set (8), an
    /// IV group (64), and several of each with ragged tails; 600 and 700 cross the cores
    /// threshold.
    const SIZES: [usize; 12] = [1, 2, 3, 7, 8, 9, 17, 63, 64, 65, 129, 600];

    #[test]
    fn xts_matches_the_xts_mode_crate() {
        for key_len in [32usize, 64] {
            let key: Vec<u8> = (0..key_len).map(|i| i as u8 ^ 0x5a).collect();
            let half = key_len / 2;
            let ours = SectorCipher {
                mode: Mode::Xts {
                    data: BlockCipher::new(&key[..half]).unwrap(),
                    tweak: BlockCipher::new(&key[half..]).unwrap(),
                },
                ivgen: IvGen::Plain64,
            };
            let theirs_128;
            let theirs_256;
            let theirs: &dyn Fn(&mut [u8]) = if half == 16 {
                theirs_128 = xts_mode::Xts128::new(
                    Aes128::new(GenericArray::from_slice(&key[..half])),
                    Aes128::new(GenericArray::from_slice(&key[half..])),
                );
                &|b| theirs_128.encrypt_area(b, SECTOR, 1000, xts_mode::get_tweak_default)
            } else {
                theirs_256 = xts_mode::Xts128::new(
                    Aes256::new(GenericArray::from_slice(&key[..half])),
                    Aes256::new(GenericArray::from_slice(&key[half..])),
                );
                &|b| theirs_256.encrypt_area(b, SECTOR, 1000, xts_mode::get_tweak_default)
            };
            for sectors in SIZES {
                let plain = pattern(sectors * SECTOR, sectors as u8);
                let mut a = plain.clone();
                ours.encrypt(&mut a, 1000);
                let mut b = plain.clone();
                theirs(&mut b);
                assert_eq!(a, b, "{key_len}-byte key, {sectors} sectors");
                ours.decrypt(&mut a, 1000);
                assert_eq!(a, plain);
            }
        }
    }

    #[test]
    fn cbc_matches_the_cbc_crate() {
        let key = [7u8; 16];
        let ours = SectorCipher {
            mode: Mode::Cbc(BlockCipher::new(&key).unwrap()),
            ivgen: IvGen::Plain64,
        };
        for sectors in SIZES.into_iter().chain([700]) {
            let plain = pattern(sectors * SECTOR, 3);
            let mut a = plain.clone();
            ours.encrypt(&mut a, 77);
            for (i, s) in plain.chunks(SECTOR).enumerate() {
                let mut iv = [0u8; 16];
                iv[..8].copy_from_slice(&(77 + i as u64).to_le_bytes());
                let mut b = s.to_vec();
                let mut enc = cbc::Encryptor::<Aes128>::new(&key.into(), &iv.into());
                for blk in b.chunks_mut(16) {
                    enc.encrypt_block_mut(GenericArray::from_mut_slice(blk));
                }
                assert_eq!(
                    &a[i * SECTOR..(i + 1) * SECTOR],
                    &b[..],
                    "sector {i} of {sectors}"
                );
                let mut dec = cbc::Decryptor::<Aes128>::new(&key.into(), &iv.into());
                for blk in b.chunks_mut(16) {
                    dec.decrypt_block_mut(GenericArray::from_mut_slice(blk));
                }
                assert_eq!(&b[..], s);
            }
            ours.decrypt(&mut a, 77);
            assert_eq!(a, plain, "{sectors} sectors");
        }
    }

    #[test]
    fn plain_truncates_and_essiv_differs() {
        let key = [1u8; 32];
        let mk = |ivgen| SectorCipher {
            mode: Mode::Cbc(BlockCipher::new(&key).unwrap()),
            ivgen,
        };
        let plain = mk(IvGen::Plain);
        let plain64 = mk(IvGen::Plain64);
        let essiv = mk(IvGen::Essiv(BlockCipher::new(&[9u8; 32]).unwrap()));
        let data = pattern(SECTOR, 1);
        let enc = |c: &SectorCipher, n| {
            let mut b = data.clone();
            c.encrypt(&mut b, n);
            b
        };
        assert_eq!(enc(&plain, 5), enc(&plain64, 5));
        assert_eq!(enc(&plain, 5 + (1 << 32)), enc(&plain64, 5));
        assert_ne!(enc(&plain64, 5 + (1 << 32)), enc(&plain64, 5));
        assert_ne!(enc(&essiv, 5), enc(&plain64, 5));
        let mut b = enc(&essiv, 5);
        essiv.decrypt(&mut b, 5);
        assert_eq!(b, data);
    }
}
