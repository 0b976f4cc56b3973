//! Sector ciphers: AES in XTS or CBC mode over 512-byte sectors, with QEMU's IV generators
//! (`plain`, `plain64`, `essiv`).
//!
//! Two paths, chosen per key when the cipher is made:
//! - **VAES** (`qcow2rs-vaes`, where the CPU has AES-NI, AVX2, VAES and VPCLMULQDQ: AMD Zen 3
//!   and later, Intel Ice Lake and later): XTS both ways, CBC decryption, and the encryption
//!   of IVs and tweaks run in that crate's kernels, two blocks per instruction, sixteen in
//!   flight, with the XTS whitening and the CBC chaining folded into the first and last
//!   rounds. The `unsafe` they need lives in that crate, so this one keeps
//!   `forbid(unsafe_code)`. CBC encryption, serial within a sector, stays on the portable path.
//! - **Portable:** RustCrypto's `aes` (AES-NI where the CPU has it, eight blocks in flight per
//!   call; constant-time software otherwise), with the modes written here rather than taken
//!   from `xts-mode` and `cbc` because those crates run one block at a time, which leaves the
//!   AES pipeline idle. Each mode runs inside the cipher's `encrypt_with_backend` (or
//!   `decrypt_with_backend`) closure and calls the backend's parallel routine
//!   (`proc_par_blocks`, eight blocks with AES-NI) on the caller's buffer:
//!   - XTS whitens eight blocks with their tweaks, encrypts them in place and whitens them
//!     again. The tweaks of a sector (its encrypted IV times alpha^i in GF(2^128), 64-bit
//!     integer arithmetic) are made while the sector before goes through the cipher, into the
//!     other half of a two-sector table.
//!   - CBC decryption decrypts eight blocks of the buffer into a scratch array and XORs each
//!     with the ciphertext block before it, back to front so that block is still in place.
//!   - CBC encryption runs eight sectors side by side: block `i` of each in one call, through
//!     an array of eight chain values.
//!
//!   The closure is kept out of line, so that the eight-block routine is a call of its own
//!   (inlined into the backend's function, XTS and CBC decryption ran about a quarter slower
//!   on an AMD EPYC, Zen 3).
//!
//! The IVs of 64 sectors (and XTS's encrypted tweaks) are made in one call, in a stack array:
//! nothing is allocated per call. Buffers of 256 KiB or more are split across the machine's
//! cores (scoped threads; the I/O path's 64 KiB requests stay on their own thread, which is
//! one of many serving requests in parallel).
//!
//! Single-thread rates with AES-256 on that Zen 3 machine (`tests::throughput`: one 64 KiB
//! buffer, in cache as a request is right after its read; thread CPU time, medians of
//! interleaved rounds; the machine was shared, so these move by 20% from run to run): VAES
//! XTS 6,500-8,000 MiB/s each way and CBC decryption 8,000-10,400 MiB/s, against 2,700-3,200
//! and 4,500-5,000 on the portable path (XTS there at 60-70% of `aes`'s own
//! `encrypt_blocks`, CBC decryption at its `decrypt_blocks` rate); CBC encryption about 3,500
//! MiB/s (each chain waits on the cipher's latency). The tests check both paths, every mode, key size and IV generator against the
//! `xts-mode` and `cbc` crates.

use aes::cipher::generic_array::GenericArray;
use aes::cipher::inout::InOutBuf;
use aes::cipher::typenum::Unsigned;
use aes::cipher::{
    consts::U16, BlockBackend, BlockClosure, BlockDecrypt, BlockEncrypt, BlockSizeUser, KeyInit,
};
use aes::{Aes128, Aes192, Aes256, Block};
use qcow2rs_vaes::Keys;

/// Sector size of every qcow2 encryption method.
pub(crate) const SECTOR: usize = 512;
const BLOCKS: usize = SECTOR / 16;
/// Sectors whose IVs are made in one call.
const IVS: usize = 64;
/// An IV (or an encrypted XTS tweak).
type Iv = [u8; 16];
/// Most blocks a backend takes in one parallel call (AES-NI's eight; the software backends
/// take two or four).
const MAX_PAR: usize = 8;
/// Buffers at least this large are split across cores.
const PARALLEL_MIN: usize = 256 << 10;

/// AES with a 128, 192 or 256-bit key, and its round keys for the VAES kernels where the CPU
/// runs them. The round keys are zeroized on drop (`aes/zeroize`, and `Keys`' own drop).
pub(crate) struct BlockCipher {
    aes: Aes,
    vaes: Option<Keys>,
}

enum Aes {
    Aes128(Aes128),
    Aes192(Aes192),
    Aes256(Aes256),
}

impl BlockCipher {
    /// A cipher for `key` (16, 24 or 32 bytes), with the VAES kernels if the CPU has them.
    pub(crate) fn new(key: &[u8]) -> Option<BlockCipher> {
        let mut c = BlockCipher::portable(key)?;
        c.vaes = Keys::new(key);
        Some(c)
    }

    /// A cipher for `key` that only uses the `aes` crate.
    fn portable(key: &[u8]) -> Option<BlockCipher> {
        let aes = match key.len() {
            16 => Aes::Aes128(Aes128::new(GenericArray::from_slice(key))),
            24 => Aes::Aes192(Aes192::new(GenericArray::from_slice(key))),
            32 => Aes::Aes256(Aes256::new(GenericArray::from_slice(key))),
            _ => return None,
        };
        Some(BlockCipher { aes, vaes: None })
    }

    /// Encrypt each block of `blocks` on its own.
    fn encrypt(&self, blocks: &mut [Iv]) {
        let bytes = blocks.as_flattened_mut();
        if let Some(k) = &self.vaes {
            return k.encrypt_blocks(bytes);
        }
        let (blocks, _) = InOutBuf::from(bytes).into_chunks::<U16>();
        let blocks = blocks.into_out();
        match &self.aes {
            Aes::Aes128(c) => c.encrypt_blocks(blocks),
            Aes::Aes192(c) => c.encrypt_blocks(blocks),
            Aes::Aes256(c) => c.encrypt_blocks(blocks),
        }
    }

    /// Run `op` with this cipher's encryption (or decryption) backend.
    fn run(&self, encrypt: bool, op: impl Op) {
        let f = WithBackend(op);
        match (&self.aes, encrypt) {
            (Aes::Aes128(c), true) => c.encrypt_with_backend(f),
            (Aes::Aes192(c), true) => c.encrypt_with_backend(f),
            (Aes::Aes256(c), true) => c.encrypt_with_backend(f),
            (Aes::Aes128(c), false) => c.decrypt_with_backend(f),
            (Aes::Aes192(c), false) => c.decrypt_with_backend(f),
            (Aes::Aes256(c), false) => c.decrypt_with_backend(f),
        }
    }
}

/// A mode's work on some sectors, given the block cipher one way.
trait Op {
    fn run<B: BlockBackend<BlockSize = U16>>(self, b: &mut B);
}

/// The closure the cipher calls with its backend.
struct WithBackend<O>(O);

impl<O> BlockSizeUser for WithBackend<O> {
    type BlockSize = U16;
}

impl<O: Op> BlockClosure for WithBackend<O> {
    // Out of line: see the module doc.
    #[inline(never)]
    fn call<B: BlockBackend<BlockSize = U16>>(self, backend: &mut B) {
        // The modes go through sectors `P` blocks at a time.
        const { assert!(BLOCKS.is_multiple_of(B::ParBlocksSize::USIZE)) };
        const { assert!(B::ParBlocksSize::USIZE <= MAX_PAR) };
        self.0.run(backend)
    }
}

/// The backend's parallel call on `blocks` (exactly its `ParBlocksSize`), in place.
#[inline(always)]
fn par<B: BlockBackend<BlockSize = U16>>(b: &mut B, blocks: &mut [Block]) {
    b.proc_par_blocks_inplace(GenericArray::from_mut_slice(blocks));
}

/// `n` blocks rounded up to whole sets of eight: `encrypt_blocks` runs a ragged tail one
/// block at a time, at the latency of the rounds rather than their throughput, so a short
/// call is padded with blocks whose output is dropped (a single block goes alone).
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
    fn ivs(&self, first: u64, out: &mut [Iv]) {
        for (i, iv) in out.iter_mut().enumerate() {
            let n = first.wrapping_add(i as u64);
            *iv = [0; 16];
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

impl SectorCipher {
    /// Encrypt `buf` (whole sectors), whose first sector has IV number `sector`.
    pub(crate) fn encrypt(&self, buf: &mut [u8], sector: u64) {
        self.run(buf, sector, true)
    }

    /// Decrypt `buf` (whole sectors), whose first sector has IV number `sector`.
    pub(crate) fn decrypt(&self, buf: &mut [u8], sector: u64) {
        self.run(buf, sector, false)
    }

    /// [`SectorCipher::decrypt`] on this thread only, whatever the size.
    pub(crate) fn decrypt_serial(&self, buf: &mut [u8], sector: u64) {
        debug_assert!(buf.len().is_multiple_of(SECTOR));
        self.run_serial(buf, sector, false)
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
        // The VAES kernels, where the CPU has them: XTS both ways and CBC decryption.
        let fast = match (&self.mode, encrypt) {
            (Mode::Xts { data, .. }, _) => data.vaes.as_ref(),
            (Mode::Cbc(c), false) => c.vaes.as_ref(),
            (Mode::Cbc(_), true) => None,
        };
        // The IVs (and XTS's tweaks) of up to IVS sectors are made in one call, then the
        // mode goes through those sectors.
        let mut ivs = [[0u8; 16]; IVS];
        for (g, group) in buf.chunks_mut(SECTOR * IVS).enumerate() {
            let n = group.len() / SECTOR;
            self.ivgen
                .ivs(sector.wrapping_add((g * IVS) as u64), &mut ivs[..padded(n)]);
            if let Mode::Xts { tweak, .. } = &self.mode {
                tweak.encrypt(&mut ivs[..padded(n)]);
            }
            let ivs = &ivs[..n];
            match (fast, &self.mode, encrypt) {
                (Some(k), Mode::Xts { .. }, true) => k.xts_encrypt(group, ivs),
                (Some(k), Mode::Xts { .. }, false) => k.xts_decrypt(group, ivs),
                (Some(k), Mode::Cbc(_), _) => k.cbc_decrypt(group, ivs),
                (None, mode, _) => {
                    let (blocks, _) = InOutBuf::from(group).into_chunks::<U16>();
                    let blocks = blocks.into_out();
                    match (mode, encrypt) {
                        (Mode::Xts { data, .. }, _) => data.run(encrypt, Xts { blocks, ivs }),
                        (Mode::Cbc(c), true) => c.run(true, CbcEncrypt { blocks, ivs }),
                        (Mode::Cbc(c), false) => c.run(false, CbcDecrypt { blocks, ivs }),
                    }
                }
            }
        }
    }

    /// The same cipher without the VAES kernels (the tests check both paths).
    #[cfg(test)]
    fn portable(mut self) -> SectorCipher {
        match &mut self.mode {
            Mode::Xts { data, tweak } => {
                data.vaes = None;
                tweak.vaes = None;
            }
            Mode::Cbc(c) => c.vaes = None,
        }
        if let IvGen::Essiv(c) = &mut self.ivgen {
            c.vaes = None;
        }
        self
    }

    /// Whether the data cipher has the VAES kernels.
    #[cfg(test)]
    fn has_vaes(&self) -> bool {
        match &self.mode {
            Mode::Xts { data, .. } => data.vaes.is_some(),
            Mode::Cbc(c) => c.vaes.is_some(),
        }
    }
}

/// `a ^= b` (in vector registers).
#[inline(always)]
fn xor(a: &mut Block, b: &Block) {
    let (x, y): ([u8; 16], [u8; 16]) = ((*a).into(), (*b).into());
    let mut z = [0u8; 16];
    for i in 0..16 {
        z[i] = x[i] ^ y[i];
    }
    *a = z.into();
}

/// A tweak: 16 bytes as a little-endian 128-bit number (IEEE 1619 numbers its bits so).
#[inline(always)]
fn tweak(b: &Iv) -> u128 {
    u128::from_le_bytes(*b)
}

/// Fill `out` with the tweaks from `t` on, multiplying by alpha: shift left, folding the
/// carry back in as x^7 + x^2 + x + 1. Returns the next tweak.
#[inline(always)]
fn tweaks(mut t: u128, out: &mut [Block]) -> u128 {
    for w in out {
        *w = t.to_le_bytes().into();
        t = (t << 1) ^ ((((t as i128) >> 127) as u128) & 0x87);
    }
    t
}

/// XTS on whole sectors; `ivs` holds their encrypted IVs.
struct Xts<'a> {
    blocks: &'a mut [Block],
    ivs: &'a [Iv],
}

impl Op for Xts<'_> {
    #[inline(always)]
    fn run<B: BlockBackend<BlockSize = U16>>(self, b: &mut B) {
        let p = B::ParBlocksSize::USIZE;
        // Sector s's tweaks are in table[s % 2]; those of sector s + 1 are made, P at a
        // time, while sector s goes through the cipher (they are read a sector later, well
        // after the stores).
        let mut table = [[Block::default(); BLOCKS]; 2];
        let Some(first) = self.ivs.first() else {
            return;
        };
        tweaks(tweak(first), &mut table[0]);
        for (s, sector) in self.blocks.chunks_exact_mut(BLOCKS).enumerate() {
            // Past the last sector, the chain runs from zero and is not used.
            let mut t = self.ivs.get(s + 1).map_or(0, tweak);
            let [even, odd] = &mut table;
            let (cur, next) = if s % 2 == 0 {
                (&*even, odd)
            } else {
                (&*odd, even)
            };
            for ((chunk, cur), next) in sector
                .chunks_exact_mut(p)
                .zip(cur.chunks_exact(p))
                .zip(next.chunks_exact_mut(p))
            {
                for (x, t) in chunk.iter_mut().zip(cur) {
                    xor(x, t);
                }
                t = tweaks(t, next);
                par(b, chunk);
                for (x, t) in chunk.iter_mut().zip(cur) {
                    xor(x, t);
                }
            }
        }
    }
}

/// CBC encryption of whole sectors with IVs `ivs`: `P` sectors side by side, block `i` of
/// each in one call. `lane[j]` carries sector `j`'s chain (its IV, then its last ciphertext
/// block); in a short last set, lanes past the last sector are padding.
struct CbcEncrypt<'a> {
    blocks: &'a mut [Block],
    ivs: &'a [Iv],
}

impl Op for CbcEncrypt<'_> {
    #[inline(always)]
    fn run<B: BlockBackend<BlockSize = U16>>(self, b: &mut B) {
        let p = B::ParBlocksSize::USIZE;
        let mut lanes = [Block::default(); MAX_PAR];
        let lane = &mut lanes[..p];
        for (part, ivs) in self.blocks.chunks_mut(BLOCKS * p).zip(self.ivs.chunks(p)) {
            let n = ivs.len();
            for (l, iv) in lane.iter_mut().zip(ivs) {
                *l = Block::from(*iv);
            }
            if n == p {
                for i in 0..BLOCKS {
                    for (j, l) in lane.iter_mut().enumerate() {
                        xor(l, &part[j * BLOCKS + i]);
                    }
                    par(b, lane);
                    for (j, l) in lane.iter().enumerate() {
                        part[j * BLOCKS + i] = *l;
                    }
                }
            } else {
                for i in 0..BLOCKS {
                    for (j, l) in lane[..n].iter_mut().enumerate() {
                        xor(l, &part[j * BLOCKS + i]);
                    }
                    if n == 1 {
                        b.proc_block_inplace(&mut lane[0]);
                    } else {
                        par(b, lane);
                    }
                    for (j, l) in lane[..n].iter().enumerate() {
                        part[j * BLOCKS + i] = *l;
                    }
                }
            }
        }
    }
}

/// CBC decryption of whole sectors with IVs `ivs`, `P` blocks per call.
struct CbcDecrypt<'a> {
    blocks: &'a mut [Block],
    ivs: &'a [Iv],
}

impl Op for CbcDecrypt<'_> {
    #[inline(always)]
    fn run<B: BlockBackend<BlockSize = U16>>(self, b: &mut B) {
        let p = B::ParBlocksSize::USIZE;
        let mut scratch = [Block::default(); MAX_PAR];
        let out = &mut scratch[..p];
        for (sector, iv) in self.blocks.chunks_exact_mut(BLOCKS).zip(self.ivs) {
            // The ciphertext block before the chunk (overwritten by then).
            let mut prev = Block::from(*iv);
            for chunk in sector.chunks_exact_mut(p) {
                let input = GenericArray::from_slice(chunk);
                b.proc_par_blocks((input, GenericArray::from_mut_slice(out)).into());
                let last = chunk[p - 1];
                // Back to front, so that the ciphertext block before each is still there.
                for k in (1..p).rev() {
                    let mut o = out[k];
                    xor(&mut o, &chunk[k - 1]);
                    chunk[k] = o;
                }
                let mut o = out[0];
                xor(&mut o, &prev);
                chunk[0] = o;
                prev = last;
            }
        }
    }
}

/// Threads a large request is split over (the cores, at most 8); also used by the compressed
/// read path (`datapath.rs`).
pub(crate) fn parallelism() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(8)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::{BlockCipher as Cipher, BlockDecryptMut, BlockEncryptMut, KeyIvInit};

    /// `n` pseudo-random bytes (xorshift64), different in every block of every sector.
    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(seed);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Sector counts around every boundary: one sector, the XTS tweak pipeline (one sector
    /// ahead), a set of eight CBC chains, an IV group (64), and several of each with ragged
    /// tails; then two that cross the cores threshold, with odd pieces.
    fn sizes() -> impl Iterator<Item = usize> {
        let n = PARALLEL_MIN / SECTOR;
        [
            1, 2, 3, 7, 8, 9, 15, 16, 17, 24, 25, 31, 33, 63, 64, 65, 72, 79, 127, 128, 129,
        ]
        .into_iter()
        .chain([n + 67, 2 * n + 131])
    }

    #[derive(Clone, Copy, Debug)]
    enum Gen {
        Plain,
        Plain64,
        Essiv,
    }

    const ESSIV_KEY: [u8; 32] = [0xe5; 32];

    /// The IV of sector `n`, made here without `IvGen`.
    fn iv(gen: Gen, n: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match gen {
            Gen::Plain => iv[..4].copy_from_slice(&(n as u32).to_le_bytes()),
            Gen::Plain64 | Gen::Essiv => iv[..8].copy_from_slice(&n.to_le_bytes()),
        }
        if let Gen::Essiv = gen {
            let mut b = Block::from(iv);
            Aes256::new(&ESSIV_KEY.into()).encrypt_block(&mut b);
            iv = b.into();
        }
        iv
    }

    /// The `xts-mode` crate over `buf`, sector by sector (it encrypts the IV itself).
    fn xts_ref<C>(key: &[u8], gen: Gen, first: u64, buf: &mut [u8], encrypt: bool)
    where
        C: Cipher + KeyInit + BlockEncrypt + BlockDecrypt,
    {
        let h = key.len() / 2;
        let xts = xts_mode::Xts128::new(
            C::new_from_slice(&key[..h]).unwrap(),
            C::new_from_slice(&key[h..]).unwrap(),
        );
        for (i, s) in buf.chunks_mut(SECTOR).enumerate() {
            let iv = iv(gen, first + i as u64);
            if encrypt {
                xts.encrypt_sector(s, iv);
            } else {
                xts.decrypt_sector(s, iv);
            }
        }
    }

    /// The `cbc` crate over `buf`, one chain per sector.
    fn cbc_ref<C>(key: &[u8], gen: Gen, first: u64, buf: &mut [u8], encrypt: bool)
    where
        C: Cipher + KeyInit + BlockEncryptMut + BlockDecryptMut,
    {
        for (i, s) in buf.chunks_mut(SECTOR).enumerate() {
            let iv = iv(gen, first + i as u64);
            if encrypt {
                let mut c = cbc::Encryptor::<C>::new_from_slices(key, &iv).unwrap();
                for b in s.chunks_mut(16) {
                    c.encrypt_block_mut(GenericArray::from_mut_slice(b));
                }
            } else {
                let mut c = cbc::Decryptor::<C>::new_from_slices(key, &iv).unwrap();
                for b in s.chunks_mut(16) {
                    c.decrypt_block_mut(GenericArray::from_mut_slice(b));
                }
            }
        }
    }

    /// Every mode, key size and IV generator against the crates, with the VAES kernels (where
    /// the CPU has them) and without: encryption of a pattern and decryption of unrelated
    /// bytes, in place, in buffers at an even and an odd address, for every size in `sizes()`
    /// (the larger ones split across cores).
    #[test]
    fn modes_match_the_crates() {
        for xts in [true, false] {
            for aes_len in [16usize, 24, 32] {
                let key_len = if xts { 2 * aes_len } else { aes_len };
                let key: Vec<u8> = (0..key_len).map(|i| i as u8 ^ 0x5a).collect();
                for (gen, vaes) in [Gen::Plain, Gen::Plain64, Gen::Essiv]
                    .into_iter()
                    .flat_map(|g| [(g, true), (g, false)])
                {
                    let ours = SectorCipher {
                        mode: if xts {
                            Mode::Xts {
                                data: BlockCipher::new(&key[..aes_len]).unwrap(),
                                tweak: BlockCipher::new(&key[aes_len..]).unwrap(),
                            }
                        } else {
                            Mode::Cbc(BlockCipher::new(&key).unwrap())
                        },
                        ivgen: match gen {
                            Gen::Plain => IvGen::Plain,
                            Gen::Plain64 => IvGen::Plain64,
                            Gen::Essiv => IvGen::Essiv(BlockCipher::new(&ESSIV_KEY).unwrap()),
                        },
                    };
                    let ours = if vaes { ours } else { ours.portable() };
                    let theirs = |first, buf: &mut [u8], encrypt| {
                        let f = match (xts, aes_len) {
                            (true, 16) => xts_ref::<Aes128>,
                            (true, 24) => xts_ref::<Aes192>,
                            (true, _) => xts_ref::<Aes256>,
                            (false, 16) => cbc_ref::<Aes128>,
                            (false, 24) => cbc_ref::<Aes192>,
                            (false, _) => cbc_ref::<Aes256>,
                        };
                        f(&key, gen, first, buf, encrypt)
                    };
                    // `plain` wraps at 2^32 within the larger buffers.
                    let first = match gen {
                        Gen::Essiv => 1000,
                        _ => (1 << 32) - 300,
                    };
                    for sectors in sizes() {
                        let what = format!(
                            "xts {xts}, {aes_len}-byte AES, {gen:?}, vaes {vaes}, {sectors}"
                        );
                        let len = sectors * SECTOR;
                        let mut store = vec![0u8; len + 1];
                        for (data, encrypt) in [(pattern(len, 1), true), (pattern(len, 99), false)]
                        {
                            let mut want = data.clone();
                            theirs(first, &mut want, encrypt);
                            for at in [0, 1] {
                                let buf = &mut store[at..at + len];
                                buf.copy_from_slice(&data);
                                if encrypt {
                                    ours.encrypt(buf, first);
                                } else {
                                    ours.decrypt(buf, first);
                                }
                                assert!(buf == want, "{what}, encrypt {encrypt}, offset {at}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Both paths (the VAES kernels and the `aes` crate's backend) against the crates on
    /// random keys (XTS with 128 and 256-bit AES, CBC with 128, 192 and 256), random data and
    /// random first sectors, for every buffer of 1 to 70 sectors, at a random address
    /// (mostly unaligned). The seed is in every failure message.
    #[test]
    fn random_keys_both_paths() {
        let mut seed = [0u8; 8];
        getrandom::getrandom(&mut seed).unwrap();
        let seed = u64::from_le_bytes(seed) | 1;
        let mut x = seed;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        if !Keys::available() {
            eprintln!("this CPU has no VAES: only the portable path is tested");
        }
        let mut store = vec![0u8; 70 * SECTOR + 64];
        for (xts, aes_len) in [
            (true, 16),
            (true, 32),
            (false, 16),
            (false, 24),
            (false, 32),
        ] {
            for sectors in 1..=70 {
                let key_len = if xts { 2 * aes_len } else { aes_len };
                let key: Vec<u8> = (0..key_len).map(|_| next() as u8).collect();
                let make = || SectorCipher {
                    mode: if xts {
                        Mode::Xts {
                            data: BlockCipher::new(&key[..aes_len]).unwrap(),
                            tweak: BlockCipher::new(&key[aes_len..]).unwrap(),
                        }
                    } else {
                        Mode::Cbc(BlockCipher::new(&key).unwrap())
                    },
                    ivgen: IvGen::Plain64,
                };
                let vaes = make();
                assert_eq!(vaes.has_vaes(), Keys::available());
                let portable = make().portable();
                let first = next() >> (next() % 64);
                let len = sectors * SECTOR;
                let at = (next() % 64) as usize;
                let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                for encrypt in [true, false] {
                    let mut want = data.clone();
                    let f = match (xts, aes_len) {
                        (true, 16) => xts_ref::<Aes128>,
                        (true, _) => xts_ref::<Aes256>,
                        (false, 16) => cbc_ref::<Aes128>,
                        (false, 24) => cbc_ref::<Aes192>,
                        (false, _) => cbc_ref::<Aes256>,
                    };
                    f(&key, Gen::Plain64, first, &mut want, encrypt);
                    for (name, ours) in [("vaes", &vaes), ("portable", &portable)] {
                        let buf = &mut store[at..at + len];
                        buf.copy_from_slice(&data);
                        if encrypt {
                            ours.encrypt(buf, first);
                        } else {
                            ours.decrypt(buf, first);
                        }
                        assert!(
                            buf == want,
                            "seed {seed:#x}: {name}, xts {xts}, {aes_len}-byte AES, \
                             {sectors} sectors from {first} at +{at}, encrypt {encrypt}"
                        );
                    }
                }
            }
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

    /// Single-thread throughput of the modes with AES-256 (with the VAES kernels where the CPU
    /// has them, and without) and of `aes` alone, in MiB/s of the thread's CPU time (medians
    /// of interleaved rounds):
    /// `cargo test --release -p qcow2rs --lib cipher::tests::throughput -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore]
    fn throughput() {
        const SIZE: usize = 64 << 20;
        // One 64 KiB buffer over and over, as the I/O path decrypts a request right after
        // reading it (in cache; a 64 MiB buffer measured the memory instead). Below
        // PARALLEL_MIN: one thread.
        const CHUNK: usize = 64 << 10;
        let key: Vec<u8> = (0..64).collect();
        let mk_xts = || SectorCipher {
            mode: Mode::Xts {
                data: BlockCipher::new(&key[..32]).unwrap(),
                tweak: BlockCipher::new(&key[32..]).unwrap(),
            },
            ivgen: IvGen::Plain64,
        };
        let mk_cbc = || SectorCipher {
            mode: Mode::Cbc(BlockCipher::new(&key[..32]).unwrap()),
            ivgen: IvGen::Essiv(BlockCipher::new(&key[32..]).unwrap()),
        };
        let (xts_p, cbc_p) = (mk_xts().portable(), mk_cbc().portable());
        let (xts, cbc) = (mk_xts(), mk_cbc());
        let aes = Aes256::new(GenericArray::from_slice(&key[..32]));
        let mut buf = pattern(CHUNK, 5);
        // The thread's CPU time where Linux gives it (so that other load on the machine
        // matters less), else wall time.
        let cpu = || {
            std::fs::read_to_string("/proc/thread-self/schedstat")
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
                .map(|ns| ns / 1e9)
        };
        let rate = |buf: &mut [u8], f: &dyn Fn(&mut [u8], u64)| {
            let (t, c0) = (std::time::Instant::now(), cpu());
            for i in 0..SIZE / CHUNK {
                f(buf, (i * CHUNK / SECTOR) as u64);
            }
            let secs = match (c0, cpu()) {
                (Some(a), Some(b)) => b - a,
                _ => t.elapsed().as_secs_f64(),
            };
            SIZE as f64 / (1 << 20) as f64 / secs
        };
        fn blocks(c: &mut [u8]) -> &mut [Block] {
            InOutBuf::from(c).into_chunks::<U16>().0.into_out()
        }
        type Run<'a> = &'a dyn Fn(&mut [u8], u64);
        let ops: [(&str, Run); 9] = [
            ("XTS-AES-256 encrypt", &|c: &mut [u8], s| xts.encrypt(c, s)),
            ("XTS-AES-256 decrypt", &|c: &mut [u8], s| xts.decrypt(c, s)),
            ("CBC-AES-256 encrypt", &|c: &mut [u8], s| cbc.encrypt(c, s)),
            ("CBC-AES-256 decrypt", &|c: &mut [u8], s| cbc.decrypt(c, s)),
            ("XTS-AES-256 encrypt, portable", &|c: &mut [u8], s| {
                xts_p.encrypt(c, s)
            }),
            ("XTS-AES-256 decrypt, portable", &|c: &mut [u8], s| {
                xts_p.decrypt(c, s)
            }),
            ("CBC-AES-256 decrypt, portable", &|c: &mut [u8], s| {
                cbc_p.decrypt(c, s)
            }),
            ("AES-256 encrypt_blocks", &|c: &mut [u8], _| {
                aes.encrypt_blocks(blocks(c))
            }),
            ("AES-256 decrypt_blocks", &|c: &mut [u8], _| {
                aes.decrypt_blocks(blocks(c))
            }),
        ];
        // Rounds of every operation in turn (the machine may be busy), then medians.
        let mut runs = vec![Vec::new(); ops.len()];
        for _ in 0..9 {
            for ((_, f), runs) in ops.iter().zip(&mut runs) {
                runs.push(rate(&mut buf, *f));
            }
        }
        for ((name, _), mut runs) in ops.iter().zip(runs) {
            runs.sort_by(f64::total_cmp);
            println!("{name}: {:.0} MiB/s", runs[runs.len() / 2]);
        }
    }
}
