//! The x86_64 kernels.
//!
//! Every kernel is a `#[target_feature]` function; the only way to reach one is through a
//! [`Keys`], which [`Keys::new`] makes only after checking the CPU (see `available`). The
//! `unsafe` blocks are those calls and the unaligned loads and stores of the caller's sectors,
//! each inside the bounds of a `chunks_exact_mut(SECTOR)` piece.
//!
//! A sector is two halves of sixteen blocks, each half eight 256-bit registers (two blocks
//! each), so sixteen blocks are in flight: enough to cover the AES instructions' latency on
//! the two AES units of a Zen core.

use std::arch::x86_64::*;

use zeroize::Zeroize;

use crate::SECTOR;

/// Registers per half sector.
const REGS: usize = 8;

/// Whether the CPU has every feature the kernels use.
pub(crate) fn available() -> bool {
    std::is_x86_feature_detected!("aes")
        && std::is_x86_feature_detected!("avx")
        && std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("vaes")
        && std::is_x86_feature_detected!("vpclmulqdq")
}

/// Round keys broadcast to both 128-bit halves: `enc` for the cipher, `dec` for the
/// equivalent inverse cipher (`aesdec`), `rounds` + 1 of each.
pub(crate) struct Keys {
    enc: [__m256i; 15],
    dec: [__m256i; 15],
    rounds: usize,
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.enc.zeroize();
        self.dec.zeroize();
    }
}

impl Keys {
    pub(crate) fn new(key: &[u8]) -> Option<Box<Keys>> {
        if !matches!(key.len(), 16 | 24 | 32) || !available() {
            return None;
        }
        let mut k = Box::new(Keys {
            enc: [zero(); 15],
            dec: [zero(); 15],
            rounds: key.len() / 4 + 6,
        });
        // SAFETY: `available()` said the CPU has the features `expand` enables.
        unsafe { expand(key, &mut k) };
        Some(k)
    }

    pub(crate) fn xts(&self, buf: &mut [u8], tweaks: &[[u8; 16]], encrypt: bool) {
        let keys = if encrypt { &self.enc } else { &self.dec };
        // SAFETY: a `Keys` exists only where `available()` holds, and `xts` enables no
        // feature beyond those.
        unsafe {
            match (self.rounds, encrypt) {
                (10, true) => xts::<10, true>(keys, buf, tweaks),
                (12, true) => xts::<12, true>(keys, buf, tweaks),
                (_, true) => xts::<14, true>(keys, buf, tweaks),
                (10, false) => xts::<10, false>(keys, buf, tweaks),
                (12, false) => xts::<12, false>(keys, buf, tweaks),
                (_, false) => xts::<14, false>(keys, buf, tweaks),
            }
        }
    }

    pub(crate) fn encrypt_blocks(&self, blocks: &mut [u8]) {
        // SAFETY: as in `xts`.
        unsafe {
            match self.rounds {
                10 => ecb_encrypt::<10>(&self.enc, blocks),
                12 => ecb_encrypt::<12>(&self.enc, blocks),
                _ => ecb_encrypt::<14>(&self.enc, blocks),
            }
        }
    }

    pub(crate) fn cbc_decrypt(&self, buf: &mut [u8], ivs: &[[u8; 16]]) {
        // SAFETY: as in `xts`.
        unsafe {
            match self.rounds {
                10 => cbc_decrypt::<10>(&self.dec, buf, ivs),
                12 => cbc_decrypt::<12>(&self.dec, buf, ivs),
                _ => cbc_decrypt::<14>(&self.dec, buf, ivs),
            }
        }
    }
}

/// A round key, read from memory at each use: held in registers across the loop over sectors
/// (all 15 do not fit beside the data), LLVM's scheduler runs each register through all the
/// rounds before the next, which leaves the AES units waiting on latency; loaded per round, the
/// rounds stay interleaved across the eight registers.
#[inline(always)]
fn round_key(k: &__m256i) -> __m256i {
    // SAFETY: a reference is valid for reads.
    unsafe { std::ptr::read_volatile(k) }
}

#[inline]
fn zero() -> __m256i {
    // SAFETY: an all-zero __m256i is a valid value (plain bits).
    unsafe { std::mem::zeroed() }
}

/// SubWord (the S-box on each byte) of `w`, with the AES instructions: `aeskeygenassist`'s
/// first lane is SubWord of the source's second lane. Constant time, unlike a table.
#[target_feature(enable = "aes")]
fn sub_word(w: u32) -> u32 {
    let v = _mm_set_epi32(0, 0, w as i32, 0);
    _mm_cvtsi128_si32(_mm_aeskeygenassist_si128::<0>(v)) as u32
}

/// FIPS-197's key expansion (words as little-endian `u32`s of the key bytes, so RotWord is a
/// right rotation by a byte and Rcon goes into the low byte), then the decryption keys
/// (InvMixColumns of the inner ones, in reverse order), each broadcast to 256 bits.
#[target_feature(enable = "aes,avx,avx2")]
fn expand(key: &[u8], k: &mut Keys) {
    let nk = key.len() / 4;
    let nr = k.rounds;
    let mut w = [0u32; 60];
    for (w, b) in w.iter_mut().zip(key.chunks_exact(4)) {
        *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    let mut rcon = 1u8;
    for i in nk..4 * (nr + 1) {
        let mut t = w[i - 1];
        if i % nk == 0 {
            t = sub_word(t.rotate_right(8)) ^ u32::from(rcon);
            rcon = (rcon << 1) ^ if rcon & 0x80 != 0 { 0x1b } else { 0 };
        } else if nk > 6 && i % nk == 4 {
            t = sub_word(t);
        }
        w[i] = w[i - nk] ^ t;
    }
    let mut rk = [_mm_setzero_si128(); 15];
    for (r, rk) in rk.iter_mut().enumerate().take(nr + 1) {
        let q = &w[4 * r..4 * r + 4];
        *rk = _mm_set_epi32(q[3] as i32, q[2] as i32, q[1] as i32, q[0] as i32);
    }
    for r in 0..=nr {
        k.enc[r] = _mm256_broadcastsi128_si256(rk[r]);
        let d = if r == 0 || r == nr {
            rk[nr - r]
        } else {
            _mm_aesimc_si128(rk[nr - r])
        };
        k.dec[r] = _mm256_broadcastsi128_si256(d);
    }
    w.zeroize();
    rk.zeroize();
}

/// Constants for multiplying XTS tweaks by powers of x in GF(2^128) modulo
/// x^128 + x^7 + x^2 + x + 1 (IEEE 1619 reads a tweak as a little-endian number), two tweaks
/// per register.
#[derive(Clone, Copy)]
struct Gf {
    /// 0x87 in the low 64 bits of each half: a carry out of bit 127 comes back as this.
    poly: __m256i,
    /// All ones in the high 64 bits of each half.
    high: __m256i,
}

/// Each half of `t` times x^K, K < 57 (`L` is 64 - K): each 64-bit lane shifts left; the bits
/// that leave the low lane enter the high one, and those that leave bit 127 come back into
/// the low lane times 0x87 (a carry-less product).
#[inline]
#[target_feature(enable = "avx2,vpclmulqdq")]
fn mul_bits<const K: i32, const L: i32>(t: __m256i, gf: Gf) -> __m256i {
    let carry = _mm256_shuffle_epi32::<0x4e>(_mm256_srli_epi64::<L>(t));
    let up = _mm256_and_si256(carry, gf.high);
    let folded = _mm256_clmulepi64_epi128::<0x00>(carry, gf.poly);
    _mm256_xor_si256(_mm256_xor_si256(_mm256_slli_epi64::<K>(t), up), folded)
}

/// Each half of `t` times x^(8B): a byte shift, and the B bytes that leave come back times
/// 0x87.
#[inline]
#[target_feature(enable = "avx2,vpclmulqdq")]
fn mul_bytes<const B: i32, const L: i32>(t: __m256i, gf: Gf) -> __m256i {
    let out = _mm256_bsrli_epi128::<L>(t);
    let folded = _mm256_clmulepi64_epi128::<0x00>(out, gf.poly);
    _mm256_xor_si256(_mm256_bslli_epi128::<B>(t), folded)
}

/// XTS over whole sectors: each block `j` of a sector is whitened with `T * x^j` (`T` the
/// sector's encrypted tweak) before and after the cipher, both folded into the first and last
/// round keys. `keys` are the encryption keys when `ENC`, else the decryption ones.
///
/// The tweaks are made in vector registers, two per register: blocks 0 and 1 (`T`, `T * x`),
/// then the other pairs of the first half times x^2, x^4, x^6 and x^8 from those, and the
/// second half's times x^16 (byte shifts).
#[target_feature(enable = "aes,avx,avx2,vaes,vpclmulqdq")]
fn xts<const R: usize, const ENC: bool>(keys: &[__m256i; 15], buf: &mut [u8], tweaks: &[[u8; 16]]) {
    let gf = Gf {
        poly: _mm256_set_epi64x(0, 0x87, 0, 0x87),
        high: _mm256_set_epi64x(-1, 0, -1, 0),
    };
    let sectors = (buf.len() / SECTOR).min(tweaks.len());
    let Some(first) = tweaks.first() else {
        return;
    };
    // The first half's tweaks of the next sector are made while this sector's second half goes
    // through the rounds.
    let mut next = first_tweaks(first, gf);
    for (s, sector) in buf.chunks_exact_mut(SECTOR).take(sectors).enumerate() {
        let (a, b) = sector.split_at_mut(SECTOR / 2);
        let tw = next;
        xts_half::<R, ENC>(keys, a, &tw);
        let mut tw2 = [zero(); REGS];
        for (t2, t) in tw2.iter_mut().zip(&tw) {
            *t2 = mul_bytes::<2, 14>(*t, gf);
        }
        if let Some(t) = tweaks.get(s + 1) {
            next = first_tweaks(t, gf);
        }
        xts_half::<R, ENC>(keys, b, &tw2);
    }
}

/// The tweaks of a sector's first sixteen blocks from its encrypted IV `t`: blocks 0 and 1
/// (`T`, `T * x`), then the other pairs times x^2, x^4, x^6 and x^8 from those.
#[inline]
#[target_feature(enable = "avx2,vpclmulqdq")]
fn first_tweaks(t: &[u8; 16], gf: Gf) -> [__m256i; REGS] {
    // SAFETY: 16 bytes read from a `[u8; 16]`.
    let t = unsafe { _mm_loadu_si128(t.as_ptr().cast()) };
    let t = _mm256_broadcastsi128_si256(t);
    let mut tw = [zero(); REGS];
    tw[0] = _mm256_blend_epi32::<0xf0>(t, mul_bits::<1, 63>(t, gf));
    tw[1] = mul_bits::<2, 62>(tw[0], gf);
    tw[2] = mul_bits::<4, 60>(tw[0], gf);
    tw[3] = mul_bits::<6, 58>(tw[0], gf);
    for j in 4..REGS {
        tw[j] = mul_bytes::<1, 15>(tw[j - 4], gf);
    }
    tw
}

/// XTS of half a sector (256 bytes) with its tweaks, two blocks per register.
#[inline]
#[target_feature(enable = "aes,avx,avx2,vaes")]
fn xts_half<const R: usize, const ENC: bool>(
    keys: &[__m256i; 15],
    blocks: &mut [u8],
    tw: &[__m256i; REGS],
) {
    assert_eq!(blocks.len(), SECTOR / 2);
    let p = blocks.as_mut_ptr().cast::<__m256i>();
    let mut x = [zero(); REGS];
    for (j, x) in x.iter_mut().enumerate() {
        // SAFETY: register j is bytes 32j..32j+32 of the 256 bytes.
        let v = unsafe { _mm256_loadu_si256(p.add(j)) };
        *x = _mm256_xor_si256(v, _mm256_xor_si256(tw[j], keys[0]));
    }
    for k in &keys[1..R] {
        let k = &round_key(k);
        for x in &mut x {
            *x = if ENC {
                _mm256_aesenc_epi128(*x, *k)
            } else {
                _mm256_aesdec_epi128(*x, *k)
            };
        }
    }
    for (j, x) in x.iter().enumerate() {
        let last = _mm256_xor_si256(keys[R], tw[j]);
        let v = if ENC {
            _mm256_aesenclast_epi128(*x, last)
        } else {
            _mm256_aesdeclast_epi128(*x, last)
        };
        // SAFETY: as for the load.
        unsafe { _mm256_storeu_si256(p.add(j), v) };
    }
}

/// Encryption of each 16-byte block of `buf` on its own (for IVs and tweaks): sixteen blocks
/// at a time, then two, then one.
#[target_feature(enable = "aes,avx,avx2,vaes")]
fn ecb_encrypt<const R: usize>(keys: &[__m256i; 15], buf: &mut [u8]) {
    let mut wide = buf.chunks_exact_mut(SECTOR / 2);
    for blocks in &mut wide {
        let p = blocks.as_mut_ptr().cast::<__m256i>();
        let mut x = [zero(); REGS];
        for (j, x) in x.iter_mut().enumerate() {
            // SAFETY: register j is bytes 32j..32j+32 of the 256 bytes.
            *x = _mm256_xor_si256(unsafe { _mm256_loadu_si256(p.add(j)) }, keys[0]);
        }
        for k in &keys[1..R] {
            let k = &round_key(k);
            for x in &mut x {
                *x = _mm256_aesenc_epi128(*x, *k);
            }
        }
        for (j, x) in x.iter().enumerate() {
            // SAFETY: as for the load.
            unsafe { _mm256_storeu_si256(p.add(j), _mm256_aesenclast_epi128(*x, keys[R])) };
        }
    }
    let mut pairs = wide.into_remainder().chunks_exact_mut(32);
    for pair in &mut pairs {
        let p = pair.as_mut_ptr().cast::<__m256i>();
        // SAFETY: 32 bytes.
        let mut x = _mm256_xor_si256(unsafe { _mm256_loadu_si256(p) }, keys[0]);
        for k in &keys[1..R] {
            x = _mm256_aesenc_epi128(x, *k);
        }
        // SAFETY: as for the load.
        unsafe { _mm256_storeu_si256(p, _mm256_aesenclast_epi128(x, keys[R])) };
    }
    for one in pairs.into_remainder().chunks_exact_mut(16) {
        let p = one.as_mut_ptr().cast::<__m128i>();
        let lo = |k: __m256i| _mm256_castsi256_si128(k);
        // SAFETY: 16 bytes.
        let mut x = _mm_xor_si128(unsafe { _mm_loadu_si128(p) }, lo(keys[0]));
        for k in &keys[1..R] {
            x = _mm_aesenc_si128(x, lo(*k));
        }
        // SAFETY: as for the load.
        unsafe { _mm_storeu_si128(p, _mm_aesenclast_si128(x, lo(keys[R]))) };
    }
}

/// CBC decryption of whole sectors, one chain each starting from `ivs[i]`: plaintext block `i`
/// is D(c_i) ^ c_(i-1), the XOR folded into the last round key. Sixteen blocks at a time;
/// the ciphertext a half needs is loaded before that half is overwritten, and the half's last
/// ciphertext block is carried to the next.
#[target_feature(enable = "aes,avx,avx2,vaes")]
fn cbc_decrypt<const R: usize>(keys: &[__m256i; 15], buf: &mut [u8], ivs: &[[u8; 16]]) {
    for (sector, iv) in buf.chunks_exact_mut(SECTOR).zip(ivs) {
        // SAFETY: 16 bytes read from a `[u8; 16]`.
        let mut prev = unsafe { _mm_loadu_si128(iv.as_ptr().cast()) };
        for blocks in sector.chunks_exact_mut(SECTOR / 2) {
            let b = blocks.as_mut_ptr();
            let p = b.cast::<__m256i>();
            let mut x = [zero(); REGS];
            for (j, x) in x.iter_mut().enumerate() {
                // SAFETY: register j is bytes 32j..32j+32 of the 256-byte half.
                *x = unsafe { _mm256_loadu_si256(p.add(j)) };
            }
            // The ciphertext blocks before each pair: the carried one and block 0, then
            // blocks 2j - 1 and 2j.
            let mut c = [zero(); REGS];
            c[0] = _mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(prev),
                _mm256_castsi256_si128(x[0]),
            );
            for (j, c) in c.iter_mut().enumerate().skip(1) {
                // SAFETY: bytes 32j-16..32j+16 of the half, j >= 1.
                *c = unsafe { _mm256_loadu_si256(b.add(32 * j - 16).cast()) };
            }
            prev = _mm256_extracti128_si256::<1>(x[REGS - 1]);
            for x in &mut x {
                *x = _mm256_xor_si256(*x, keys[0]);
            }
            for k in &keys[1..R] {
                let k = &round_key(k);
                for x in &mut x {
                    *x = _mm256_aesdec_epi128(*x, *k);
                }
            }
            for (j, x) in x.iter().enumerate() {
                let v = _mm256_aesdeclast_epi128(*x, _mm256_xor_si256(keys[R], c[j]));
                // SAFETY: as for the loads of x.
                unsafe { _mm256_storeu_si256(p.add(j), v) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::{generic_array::GenericArray, BlockEncrypt, KeyInit};

    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// The expanded keys, used one block at a time with AES-NI, encrypt as the `aes` crate
    /// does, and the decryption keys undo it, for random keys of each size.
    #[test]
    fn key_schedule_matches_the_aes_crate() {
        if !available() {
            eprintln!("no VAES on this CPU: skipped");
            return;
        }
        for len in [16, 24, 32] {
            for seed in 1..20 {
                let key = bytes(len, seed * 7 + len as u64);
                let k = Keys::new(&key).unwrap();
                let data = bytes(16 * 8, seed);
                for b in data.chunks(16) {
                    let mut want = GenericArray::clone_from_slice(b);
                    match len {
                        16 => aes::Aes128::new_from_slice(&key)
                            .unwrap()
                            .encrypt_block(&mut want),
                        24 => aes::Aes192::new_from_slice(&key)
                            .unwrap()
                            .encrypt_block(&mut want),
                        _ => aes::Aes256::new_from_slice(&key)
                            .unwrap()
                            .encrypt_block(&mut want),
                    }
                    // SAFETY: `Keys::new` succeeded, so the CPU has AES-NI and AVX2.
                    let (enc, dec) = unsafe { one_block(&k, b) };
                    assert_eq!(&enc[..], &want[..], "{len}-byte key, seed {seed}");
                    assert_eq!(&dec[..], b, "{len}-byte key, seed {seed}");
                }
            }
        }
    }

    /// `encrypt_blocks` (sixteen, two and one block at a time) against the `aes` crate, for
    /// every count of blocks from 0 to 40 and each key size.
    #[test]
    fn ecb_matches_the_aes_crate() {
        if !available() {
            eprintln!("no VAES on this CPU: skipped");
            return;
        }
        for len in [16, 24, 32] {
            let key = bytes(len, len as u64);
            let k = crate::Keys::new(&key).unwrap();
            for n in 0..=40 {
                let data = bytes(16 * n, n as u64 + 100);
                let mut want = data.clone();
                for b in want.chunks_mut(16) {
                    let b = GenericArray::from_mut_slice(b);
                    match len {
                        16 => aes::Aes128::new_from_slice(&key).unwrap().encrypt_block(b),
                        24 => aes::Aes192::new_from_slice(&key).unwrap().encrypt_block(b),
                        _ => aes::Aes256::new_from_slice(&key).unwrap().encrypt_block(b),
                    }
                }
                let mut got = data.clone();
                k.encrypt_blocks(&mut got);
                assert_eq!(got, want, "{len}-byte key, {n} blocks");
            }
        }
    }

    /// Encrypt `b` with the low halves of the round keys, then decrypt the result.
    #[target_feature(enable = "aes,avx,avx2")]
    fn one_block(k: &Keys, b: &[u8]) -> ([u8; 16], [u8; 16]) {
        let lo = |v: __m256i| _mm256_castsi256_si128(v);
        let r = k.rounds;
        // SAFETY: 16 bytes.
        let mut x = unsafe { _mm_loadu_si128(b.as_ptr().cast()) };
        x = _mm_xor_si128(x, lo(k.enc[0]));
        for i in 1..r {
            x = _mm_aesenc_si128(x, lo(k.enc[i]));
        }
        x = _mm_aesenclast_si128(x, lo(k.enc[r]));
        let mut enc = [0u8; 16];
        // SAFETY: 16 bytes.
        unsafe { _mm_storeu_si128(enc.as_mut_ptr().cast(), x) };
        x = _mm_xor_si128(x, lo(k.dec[0]));
        for i in 1..r {
            x = _mm_aesdec_si128(x, lo(k.dec[i]));
        }
        x = _mm_aesdeclast_si128(x, lo(k.dec[r]));
        let mut dec = [0u8; 16];
        // SAFETY: 16 bytes.
        unsafe { _mm_storeu_si128(dec.as_mut_ptr().cast(), x) };
        (enc, dec)
    }
}
