//! Refcount blocks: packed refcounts of 1..64 bits.

/// Reftable entry offset mask.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Refcount table entry bits 0-8: reserved, must be zero.
pub const REFT_RESERVED_MASK: u64 = 0x1ff;

/// Read refcount `i` from a refcount block with entries of `1 << order` bits.
pub fn get(block: &[u8], i: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = i * bits;
            let byte = block[bit / 8];
            let mask = (1u16 << bits) - 1;
            ((byte as u16 >> (bit % 8)) & mask) as u64
        }
        3 => block[i] as u64,
        4 => super::be16(block, i * 2) as u64,
        5 => super::be32(block, i * 4) as u64,
        _ => super::be64(block, i * 8),
    }
}

/// Largest refcount representable with `1 << order` bits.
pub fn max(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

/// Store refcount `v` (must be <= `max(order)`) at index `i`.
pub fn set(block: &mut [u8], i: usize, order: u32, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = i * bits;
            let mask = (((1u16 << bits) - 1) << (bit % 8)) as u8;
            let b = &mut block[bit / 8];
            *b = (*b & !mask) | (((v as u16) << (bit % 8)) as u8 & mask);
        }
        3 => block[i] = v as u8,
        4 => super::put16(block, i * 2, v as u16),
        5 => super::put32(block, i * 4, v as u32),
        _ => super::put64(block, i * 8, v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn roundtrip_all_widths() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 512];
            let n = 512 * 8 / (1usize << order);
            for i in 0..n {
                set(&mut b, i, order, (i as u64 * 7) & max(order));
            }
            for i in 0..n {
                assert_eq!(
                    get(&b, i, order),
                    (i as u64 * 7) & max(order),
                    "order {order} i {i}"
                );
            }
        }
    }
}
