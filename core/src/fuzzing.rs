//! The bodies of the fuzz targets (feature `testing`). `fuzz/` runs them under libFuzzer and
//! `tests/tests/fuzz_regressions.rs` replays the inputs kept in `tests/fuzz-regressions/`
//! through the same functions, in the ordinary `cargo test`.
//!
//! Each function takes any bytes. It returns normally when the library behaved (an error for
//! bad input is fine) and panics when it did not: a panic inside the library, or a broken
//! promise checked here (a repair that reports a clean image must leave one that checks clean).
//! Hangs and huge allocations are found by libFuzzer's `-timeout` and `-malloc_limit_mb`.
//!
//! Encrypted images are opened with the password [`PASSWORD`]; the seeds made by
//! `fuzz/make-seeds.sh` use it.

use std::sync::Arc;

use crate::format::header::{self, Header, EXT_CRYPTO};
use crate::format::{l2, refcount, snapshot};
use crate::{CacheMode, Image, MemStorage, OpenOptions, Password, RepairMode};

/// The password of the encrypted seed images.
pub const PASSWORD: &str = "fuzz";

/// PBKDF2 iteration counts above this are refused while fuzzing (the seeds hold about 1000):
/// eight slots at this count take well under the one-second limit.
const FUZZ_MAX_ITERATIONS: u32 = 1 << 14;

/// Guest bytes read per input at most (reads follow `map`, allocated ranges only).
const READ_BUDGET: u64 = 4 << 20;
/// `map` looks at this much of the virtual disk at most.
const MAP_SPAN: u64 = 1 << 30;

fn setup() {
    crate::crypto::luks::FUZZ_MAX_ITERATIONS
        .store(FUZZ_MAX_ITERATIONS, std::sync::atomic::Ordering::Relaxed);
}

fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at.saturating_add(4))
        .map_or(0, |s| u32::from_be_bytes(s.try_into().unwrap()))
}

fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at.saturating_add(8))
        .map_or(0, |s| u64::from_be_bytes(s.try_into().unwrap()))
}

/// Target `header`: the pure codecs of `format/` and the LUKS header. The first byte picks
/// the codec, the rest is its input. What parses must serialize and parse back to the same.
pub fn header(data: &[u8]) {
    setup();
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            if let Ok(h) = Header::parse(rest) {
                let _ = h.cluster_size();
                let _ = h.l2_entries();
                let _ = h.l1_entries_for(h.size);
                let _ = h.backing_format();
                let _ = h.feature_names(0, h.incompatible_features);
                let _ = h.feature_names(1, h.compatible_features);
                let _ = h.feature_names(2, h.autoclear_features);
                if let Ok(bytes) = h.serialize() {
                    let mut first = bytes.clone();
                    first.resize((h.cluster_size() as usize).max(bytes.len()), 0);
                    let again = Header::parse(&first).unwrap_or_else(|e| {
                        panic!("a serialized header does not parse: {e:?}\n{h:?}")
                    });
                    // serialize lays the backing file name out anew, right after the
                    // extensions: its offset may change, and without a name its length
                    // field is written as zero; nothing else may change.
                    let mut want = h.clone();
                    want.backing_file_offset = again.backing_file_offset;
                    if h.backing_file.is_none() {
                        want.backing_file_size = 0;
                    }
                    // A name that is not UTF-8 is held lossily (the whole header is only
                    // serialized at creation, from a UTF-8 name).
                    if h.backing_file
                        .as_ref()
                        .is_some_and(|n| n.contains('\u{fffd}'))
                    {
                        want.backing_file_size = again.backing_file_size;
                        want.backing_file.clone_from(&again.backing_file);
                    }
                    assert_eq!(again, want, "a header changed through serialize and parse");
                }
            }
        }
        1 => {
            let count = u32::from(rest.first().copied().unwrap_or(0)) % 64;
            let table = rest.get(1..).unwrap_or(&[]);
            if let Ok(list) = snapshot::parse(table, count) {
                for s in &list {
                    let _ = (s.disk_size(), s.vm_state_size_large(), s.id_bytes());
                }
                let bytes = snapshot::serialize(&list);
                assert_eq!(bytes.len() as u64, snapshot::table_size(&list));
                let again = snapshot::parse(&bytes, count).unwrap_or_else(|e| {
                    panic!("a serialized snapshot table does not parse: {e:?}")
                });
                assert_eq!(again, list, "snapshots changed through serialize and parse");
            }
        }
        2 => {
            let region = u64::from(be32(rest, 0));
            let b = rest.get(4..).unwrap_or(&[]);
            if let Ok(h) = crate::crypto::luks::Header::parse(b, region) {
                let again = crate::crypto::luks::Header::parse(&h.serialize(), region);
                assert!(again.is_ok(), "a serialized LUKS header does not parse");
            }
        }
        _ => {
            let bits = 9 + u32::from(rest.first().copied().unwrap_or(0)) % 13;
            let order = u32::from(rest.get(1).copied().unwrap_or(0)) % 7;
            let body = rest.get(2..).unwrap_or(&[]);
            let mut block = body.to_vec();
            for (i, c) in body.chunks_exact(8).enumerate() {
                let e = u64::from_be_bytes(c.try_into().unwrap());
                let _ = l2::decode(e, bits, false);
                let _ = l2::decode(e, bits, true);
                let _ = l2::sub::invalid(e);
                let _ = l2::compressed_fits(e & l2::L2E_OFFSET_MASK, e >> 48, bits);
                let entries = (block.len() * 8) >> order;
                if entries > 0 {
                    let j = i % entries;
                    let v = refcount::get(&block, j, order);
                    let nv = e & refcount::max(order);
                    refcount::set(&mut block, j, order, nv);
                    assert_eq!(refcount::get(&block, j, order), nv);
                    refcount::set(&mut block, j, order, v);
                }
            }
            assert_eq!(block, body, "refcount set/get changed other entries");
        }
    }
}

/// How the targets open an image: with the password, or without the key (for inspection:
/// check and repair need no key, and no PBKDF2 then costs time).
#[derive(Clone, Copy)]
enum Key {
    Password,
    Without,
}

fn mem_open(bytes: Vec<u8>, read_only: bool, key: Key) -> (Arc<MemStorage>, crate::Result<Image>) {
    let mem = Arc::new(MemStorage::from_vec(bytes));
    let opts = OpenOptions {
        read_only,
        cache: CacheMode::Writeback,
        open_backing: false,
        password: match key {
            Key::Password => Some(Password::new(PASSWORD)),
            Key::Without => None,
        },
        without_key: matches!(key, Key::Without),
        // Small caches: evictions are exercised and a crafted L1 size costs nothing.
        l2_cache_size: Some(64 << 10),
        refcount_cache_size: Some(64 << 10),
        ..OpenOptions::default()
    };
    let img = Image::open_storage(mem.clone(), "fuzz.qcow2", &opts);
    (mem, img)
}

/// Read what `map` says is allocated, up to the budgets; info, snapshots, map.
fn read_some(img: &Image) {
    let _ = img.info();
    let _ = img.snapshots();
    let size = img.virtual_size();
    let Ok(map) = img.map(0, size.min(MAP_SPAN)) else {
        return;
    };
    let mut budget = READ_BUDGET;
    let mut buf = Vec::new();
    for e in map.iter().filter(|e| e.data || e.compressed).take(256) {
        let len = e.length.min(budget).min(256 << 10);
        if len == 0 {
            break;
        }
        budget -= len;
        buf.resize(len as usize, 0);
        if img.read_at(&mut buf, e.start).is_err() {
            // A bad cluster: keep going with the next one.
            continue;
        }
        // Unaligned reads take other paths (sector widening for encrypted images).
        if len > 3 {
            let _ = img.read_at(&mut buf[..len as usize - 3], e.start + 1);
        }
    }
    let tail = size.saturating_sub(700);
    buf.resize(700.min(size) as usize, 0);
    let _ = img.read_at(&mut buf, tail);
}

/// Target `open_read`: open the bytes read-only (with the password), read what is allocated.
pub fn open_read(data: &[u8]) {
    setup();
    let (_mem, img) = mem_open(data.to_vec(), true, Key::Password);
    if let Ok(img) = img {
        read_some(&img);
        let _ = img.close();
    }
}

/// Check, repair (`check -r all`), check again (without the key of an encrypted image). A repair that reports no corruption and no
/// leak left must leave an image that checks clean, now and after reopening.
pub fn check_repair(data: &[u8]) {
    setup();
    let (mem, img) = mem_open(data.to_vec(), false, Key::Without);
    let Ok(img) = img else { return };
    let _ = img.check(None);
    let repaired = img.check(Some(RepairMode::All));
    let Ok(repaired) = repaired else {
        let _ = img.close();
        return;
    };
    if !repaired.is_clean() {
        let _ = img.close();
        return;
    }
    match img.check(None) {
        Ok(again) => assert!(
            again.is_clean(),
            "repair reported a clean image but check then finds: {:?}",
            again.messages
        ),
        Err(e) => panic!("repair reported a clean image but check then fails: {e}"),
    }
    read_some(&img);
    if img.close().is_err() {
        return;
    }
    let (_m, img) = mem_open(mem.to_vec(), false, Key::Without);
    let img = img.unwrap_or_else(|e| panic!("a repaired image does not open again: {e}"));
    let again = img
        .check(None)
        .unwrap_or_else(|e| panic!("check after reopen fails: {e}"));
    assert!(
        again.is_clean(),
        "a repaired image reopened checks: {:?}",
        again.messages
    );
    let _ = img.close();
}

/// The layout of an image, as far as its bytes tell (no validation: offsets may be nonsense).
struct Layout {
    cluster: u64,
    header_len: u64,
    l1: (u64, u64),
    reftable: (u64, u64),
    snapshots: u64,
    luks: Option<u64>,
}

impl Layout {
    fn of(img: &[u8]) -> Layout {
        let cb = be32(img, 20).clamp(9, 21);
        let cluster = 1u64 << cb;
        let version = be32(img, 4);
        let header_len = if version >= 3 {
            u64::from(be32(img, 100)).clamp(72, cluster)
        } else {
            72
        };
        let mut luks = None;
        let mut at = header_len as usize;
        for _ in 0..64 {
            let kind = be32(img, at);
            let len = be32(img, at + 4) as usize;
            if kind == header::EXT_END || at + 8 + len > img.len().min(cluster as usize) {
                break;
            }
            if kind == EXT_CRYPTO {
                luks = Some(be64(img, at + 8));
            }
            at += 8 + len.div_ceil(8) * 8;
        }
        Layout {
            cluster,
            header_len,
            l1: (be64(img, 40), u64::from(be32(img, 36))),
            reftable: (be64(img, 48), u64::from(be32(img, 56)) * cluster / 8),
            snapshots: be64(img, 64),
            luks,
        }
    }
}

/// Writes `v`'s low `width` bytes big-endian at `at`, when they fit in the image.
fn poke(img: &mut [u8], at: u64, width: usize, v: u64) {
    let Ok(at) = usize::try_from(at) else { return };
    if let Some(dst) = img.get_mut(at..at.saturating_add(width)) {
        dst.copy_from_slice(&v.to_be_bytes()[8 - width..]);
    }
}

/// Applies one mutation: `kind` picks the structure and how the value is made, `sel` the
/// place in it, `value` the raw value.
fn mutate_one(img: &mut [u8], kind: u8, sel: u16, value: u64) {
    let lay = Layout::of(img);
    let len = img.len() as u64;
    let sel = u64::from(sel);
    let cs = lay.cluster;
    let entry = |base: u64, n: u64| base.saturating_add(8 * (sel % n.max(1)));
    // Where, and how wide.
    let (at, width) = match kind % 8 {
        // Header fields and extensions (the first cluster).
        0 => (
            sel % cs.min(len).max(1),
            [1, 2, 4, 8][(kind as usize >> 3) & 3],
        ),
        1 => (entry(lay.l1.0, lay.l1.1), 8),
        2 => {
            // An L2 entry: the sel-th L1 entry's table (first one that is set).
            let n = lay.l1.1.clamp(1, 4096);
            let l2 = (0..n)
                .map(|i| {
                    let at = lay.l1.0.saturating_add(8 * ((sel + i) % n));
                    be64(img, at as usize) & l2::L1E_OFFSET_MASK
                })
                .find(|&o| o != 0)
                .unwrap_or(0);
            (l2.saturating_add(8 * ((sel >> 4) % (cs / 8))), 8)
        }
        3 => (entry(lay.reftable.0, lay.reftable.1), 8),
        4 => {
            let rb = be64(img, lay.reftable.0 as usize) & refcount::REFT_OFFSET_MASK;
            (
                rb.saturating_add(2 * (sel % (cs / 2))),
                [1, 2, 4, 8][(kind as usize >> 3) & 3],
            )
        }
        5 => (
            lay.snapshots.saturating_add(sel % 512),
            [1, 2, 4, 8][(kind as usize >> 3) & 3],
        ),
        6 => match lay.luks {
            Some(o) => (
                o.saturating_add(sel % 592),
                [1, 2, 4, 8][(kind as usize >> 3) & 3],
            ),
            None => (lay.header_len + sel % 64, 8),
        },
        _ => ((len.max(1) / 65536 + 1) * sel % len.max(1), 8),
    };
    let old = if width == 8 {
        be64(img, at as usize)
    } else {
        u64::from(be32(img, at as usize)) >> (32 - 8 * width.min(4))
    };
    let end_cluster = len.div_ceil(cs) * cs;
    let v = match kind >> 5 {
        0 => value,
        1 => old ^ value,
        2 => old.wrapping_add(value % 512).wrapping_sub(256),
        // A cluster-aligned offset near the end of the file, with the flags kept.
        3 => (old & 0xff00_0000_0000_01ff) | (end_cluster + cs * (value % 4)).wrapping_sub(cs * 2),
        4 => 0,
        5 => old | 1 << (value % 64),
        // Another cluster of the image, flags kept: double references, metadata as data.
        6 => (old & 0xff00_0000_0000_01ff) | ((value % (len / cs).max(1)) * cs),
        _ => old & !(1 << (value % 64)),
    };
    poke(img, at, width, v);
}

/// Target `mutate`: structure-aware. The input is an image followed by `n` mutations of 11
/// bytes each (kind, sel u16, value u64) and then the byte `n` (mod 16): the image comes first
/// so that libFuzzer's own byte mutations of it keep it in place. The seeds are images made by
/// qemu-img and by us, plain and encrypted, each followed by a 0 byte. The mutations hit header
/// fields, L1 and L2 entries, the refcount table and blocks, the snapshot table and the LUKS
/// header; then the image is opened (with the password), read, written a little, flushed,
/// checked and reopened.
pub fn mutate(data: &[u8]) {
    setup();
    let Some((&n, rest)) = data.split_last() else {
        return;
    };
    let n = usize::from(n % 16);
    let Some((image, ops)) = rest.split_at_checked(rest.len().saturating_sub(n * 11)) else {
        return;
    };
    let mut img = image.to_vec();
    for op in ops.chunks_exact(11) {
        let sel = u16::from_be_bytes([op[1], op[2]]);
        let value = u64::from_be_bytes(op[3..11].try_into().unwrap());
        mutate_one(&mut img, op[0], sel, value);
    }
    let (mem, opened) = mem_open(img, false, Key::Password);
    let Ok(im) = opened else { return };
    read_some(&im);
    let size = im.virtual_size();
    if size > 0 {
        let at = (u64::from(data.len() as u32) * 4099) % size;
        let buf = vec![0x5a; (size - at).min(9000) as usize];
        let _ = im.write_at(&buf, at);
        let _ = im.write_zeroes(0, size.min(1024));
        let _ = im.discard(size / 2, size.min(4096) / 2);
    }
    let _ = im.flush();
    let _ = im.check(None);
    let _ = im.close();
    // What we wrote must open again (or fail with an error).
    let (_m, again) = mem_open(mem.to_vec(), true, Key::Password);
    if let Ok(again) = again {
        read_some(&again);
    }
}
