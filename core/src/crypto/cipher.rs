//! Sector ciphers: AES in XTS or CBC mode over 512-byte sectors, with QEMU's IV generators
//! (`plain`, `plain64`, `essiv`).
//!
//! The block cipher is RustCrypto's `aes` (AES-NI where the CPU has it). The modes are written
//! here rather than taken from `xts-mode` and `cbc` because those crates run one block at a
//! time, which leaves the AES pipeline mostly idle: XTS encrypts a whole sector's 32 blocks in
//! one `encrypt_blocks` call, CBC decryption likewise, and CBC encryption (serial within a
//! sector) runs eight sectors interleaved. The tests check both modes against the crates.
//! Large buffers are split across the machine's cores.

use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::{Aes128, Aes192, Aes256, Block};

/// Sector size of every qcow2 encryption method.
pub(crate) const SECTOR: usize = 512;
const BLOCKS: usize = SECTOR / 16;
/// Sectors encrypted side by side in CBC mode.
const LANES: usize = 8;
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

fn xor_into(dst: &mut Block, a: &[u8], b: &Block) {
    for i in 0..16 {
        dst[i] = a[i] ^ b[i];
    }
}

fn xor_out(dst: &mut [u8], a: &Block, b: &Block) {
    for i in 0..16 {
        dst[i] = a[i] ^ b[i];
    }
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
        let mut ivs = [Block::default(); LANES];
        for (g, group) in buf.chunks_mut(SECTOR * LANES).enumerate() {
            let n = group.len() / SECTOR;
            let first = sector.wrapping_add((g * LANES) as u64);
            self.ivgen.ivs(first, &mut ivs[..n]);
            match (&self.mode, encrypt) {
                (Mode::Xts { data, tweak }, _) => {
                    tweak.encrypt(&mut ivs[..n]);
                    for (s, t) in group.chunks_mut(SECTOR).zip(ivs.iter()) {
                        xts_sector(data, s, *t, encrypt);
                    }
                }
                (Mode::Cbc(c), true) => cbc_encrypt_lanes(c, group, &ivs[..n]),
                (Mode::Cbc(c), false) => {
                    for (s, iv) in group.chunks_mut(SECTOR).zip(ivs.iter()) {
                        cbc_decrypt_sector(c, s, iv);
                    }
                }
            }
        }
    }
}

/// One XTS sector: the 32 tweaks, XOR in, all blocks through the cipher at once, XOR out.
/// The tweaks and XORs work on 64-bit halves (little-endian, as IEEE 1619 numbers the bits).
fn xts_sector(c: &BlockCipher, s: &mut [u8], t: Block, encrypt: bool) {
    let mut tweaks = [[0u64; 2]; BLOCKS];
    let mut blocks = [Block::default(); BLOCKS];
    let mut lo = u64::from_le_bytes(t[..8].try_into().unwrap());
    let mut hi = u64::from_le_bytes(t[8..].try_into().unwrap());
    for (i, (b, chunk)) in blocks.iter_mut().zip(s.chunks_exact(16)).enumerate() {
        tweaks[i] = [lo, hi];
        let carry = hi >> 63;
        hi = (hi << 1) | (lo >> 63);
        lo = (lo << 1) ^ (carry * 0x87);
        let a = u64::from_le_bytes(chunk[..8].try_into().unwrap()) ^ tweaks[i][0];
        let z = u64::from_le_bytes(chunk[8..].try_into().unwrap()) ^ tweaks[i][1];
        b[..8].copy_from_slice(&a.to_le_bytes());
        b[8..].copy_from_slice(&z.to_le_bytes());
    }
    if encrypt {
        c.encrypt(&mut blocks);
    } else {
        c.decrypt(&mut blocks);
    }
    for ((b, chunk), tw) in blocks.iter().zip(s.chunks_exact_mut(16)).zip(tweaks) {
        let a = u64::from_le_bytes(b[..8].try_into().unwrap()) ^ tw[0];
        let z = u64::from_le_bytes(b[8..].try_into().unwrap()) ^ tw[1];
        chunk[..8].copy_from_slice(&a.to_le_bytes());
        chunk[8..].copy_from_slice(&z.to_le_bytes());
    }
}

/// CBC encryption of up to `LANES` sectors side by side: block `i` of every sector goes
/// through the cipher in one call.
fn cbc_encrypt_lanes(c: &BlockCipher, group: &mut [u8], ivs: &[Block]) {
    let n = ivs.len();
    let mut prev = [Block::default(); LANES];
    prev[..n].copy_from_slice(ivs);
    let mut lane = [Block::default(); LANES];
    for i in 0..BLOCKS {
        for j in 0..n {
            let at = j * SECTOR + i * 16;
            xor_into(&mut lane[j], &group[at..at + 16], &prev[j]);
        }
        c.encrypt(&mut lane[..n]);
        for j in 0..n {
            let at = j * SECTOR + i * 16;
            group[at..at + 16].copy_from_slice(&lane[j]);
            prev[j] = lane[j];
        }
    }
}

/// CBC decryption of one sector: all blocks at once, then each XORed with the ciphertext
/// block before it.
fn cbc_decrypt_sector(c: &BlockCipher, s: &mut [u8], iv: &Block) {
    let mut blocks = [Block::default(); BLOCKS];
    for (b, chunk) in blocks.iter_mut().zip(s.chunks(16)) {
        b.copy_from_slice(chunk);
    }
    c.decrypt(&mut blocks);
    for i in (0..BLOCKS).rev() {
        let prev: Block = if i == 0 {
            *iv
        } else {
            *Block::from_slice(&s[(i - 1) * 16..i * 16])
        };
        xor_out(&mut s[i * 16..i * 16 + 16], &blocks[i], &prev);
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

    #[test]
    fn xts_matches_the_xts_mode_crate() {
        let key: Vec<u8> = (0..64).map(|i| i as u8 ^ 0x5a).collect();
        let ours = SectorCipher {
            mode: Mode::Xts {
                data: BlockCipher::new(&key[..32]).unwrap(),
                tweak: BlockCipher::new(&key[32..]).unwrap(),
            },
            ivgen: IvGen::Plain64,
        };
        let theirs = xts_mode::Xts128::new(
            Aes256::new(GenericArray::from_slice(&key[..32])),
            Aes256::new(GenericArray::from_slice(&key[32..])),
        );
        for sectors in [1usize, 7, 8, 9, 600] {
            let plain = pattern(sectors * SECTOR, sectors as u8);
            let mut a = plain.clone();
            ours.encrypt(&mut a, 1000);
            let mut b = plain.clone();
            theirs.encrypt_area(&mut b, SECTOR, 1000, xts_mode::get_tweak_default);
            assert_eq!(a, b, "{sectors} sectors");
            ours.decrypt(&mut a, 1000);
            assert_eq!(a, plain);
        }
    }

    #[test]
    fn cbc_matches_the_cbc_crate() {
        let key = [7u8; 16];
        let ours = SectorCipher {
            mode: Mode::Cbc(BlockCipher::new(&key).unwrap()),
            ivgen: IvGen::Plain64,
        };
        for sectors in [1usize, 3, 8, 17, 700] {
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
                assert_eq!(&a[i * SECTOR..(i + 1) * SECTOR], &b[..], "sector {i}");
                let mut dec = cbc::Decryptor::<Aes128>::new(&key.into(), &iv.into());
                for blk in b.chunks_mut(16) {
                    dec.decrypt_block_mut(GenericArray::from_mut_slice(blk));
                }
                assert_eq!(&b[..], s);
            }
            ours.decrypt(&mut a, 77);
            assert_eq!(a, plain);
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
