//! The data path: every byte of guest data that moves between the guest and the host file
//! passes through this module: allocated clusters, compressed clusters, backing-file reads,
//! copy-on-write, zero fill, subclusters, discard, and the lock-free read and overwrite paths.
//! Nothing else reads or writes guest data in the host file.
//!
//! The cipher sits here, at the four places where guest data meets the host file:
//! [`host_read`] and [`State::host_read`] (decrypt after reading), [`State::host_write`] and the
//! unlocked overwrite in [`write`] (encrypt before writing). Each of them passes both the guest
//! offset and the host offset of the bytes it moves, and `crypto/` takes the IV from the right
//! one: the HOST sector for LUKS, the GUEST sector for legacy AES. The cipher works on whole
//! 512-byte sectors: requests that are not sector-aligned are widened first
//! ([`read_unaligned`], [`State::write_unaligned`]), and two things that are right for plain
//! images are not for encrypted ones: a never-written cluster reads as zeros on disk but not
//! after decryption, so it gets whole encrypted clusters and its L2 entry always waits for
//! the data (mutant `crypt-virgin`).
//!
//! A write to guest cluster `c` (see `mapping.rs` for the tables, `flush.rs` for the ordering):
//! an in-place overwrite of a cluster we own exclusively goes straight to its host cluster;
//! anything else allocates a new host cluster from the run, fills in what the guest did not
//! write (copy-on-write from the old cluster, the backing file, or zeros), writes the data, and
//! then points the L2 entry at it ([`State::link`]), recording what the entry must wait for.
//! The old cluster's reference is dropped afterwards (deferred until the change is stable).
//!
//! # Crash analysis of the unlocked paths
//!
//! Overwrites of owned clusters and the data of allocating writes ([`write_allocating`]) are
//! written without the state lock. What keeps that crash-consistent:
//! * An entry is only ever changed to name a new cluster under the lock, after the data write
//!   into that cluster returned, and with `link`'s dependencies (a barrier before the L2 table
//!   is written, unless the cluster was never written and the guest cluster read as zeros). A
//!   flush that runs while the data is being written finds no entry naming it; one that begins
//!   after the write returned writes the entry behind a barrier that follows the data. The
//!   data-written flag is set after the pwrite, so the next flush syncs it even when no entry
//!   changed. Mutant `par-early-link`.
//! * A reserved cluster is never free while it is written (its refcount was raised under the
//!   lock), so neither reuse nor a hole punch (`host.rs`; punches are issued before any free
//!   cluster's refcount rises) can reach it; the in-place pieces hold the I/O gate, which a flush
//!   takes exclusively before applying frees and punching. A reserved cluster that is not linked
//!   (the entry changed, the write failed, the disk shrank) is given back at once: nothing ever
//!   named it, and the written extent of the file covers it, so its next user never takes it for
//!   zeros.
//! * Copy-on-write data is read under the lock in the first phase; it is used only if no entry
//!   change touched the guest cluster since (intents, [`Reservations::entry_changed`]; snapshot
//!   operations, resize and check change everything). Otherwise the cluster is redone under the
//!   lock, so that a concurrent write, discard or zero into the same guest cluster is never
//!   undone. Mutant `par-stale-link`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::compress;
use crate::crypto::{Crypto, SECTOR};
use crate::error::{Error, Result};
use crate::format::l2;
use crate::mapping::{Desc, L2Entry};
use crate::mutants::active as mutant;
use crate::offset::{GuestCluster, GuestOffset, HostOffset};
use crate::state::State;

/// The last decompressed cluster: (host offset of the compressed data, the cluster, or the
/// first part of it that a read decompressed: see [`CompPiece::decode`]). Dropped whenever a
/// cluster is freed (the bytes at that offset may be rewritten).
///
/// Readers decompress outside the state lock ([`read`]) and store what they decompressed
/// afterwards, without the state lock; the epoch, bumped by every `clear`, tells them whether
/// a cluster was freed since they looked the mapping up (then they store nothing: the bytes
/// they read may since have been rewritten).
#[derive(Default)]
pub(crate) struct Decompressed(Arc<Mutex<Slot>>);

#[derive(Default)]
struct Slot {
    epoch: u64,
    last: Option<(HostOffset, Arc<Vec<u8>>)>,
}

impl Decompressed {
    pub(crate) fn clear(&mut self) {
        let mut s = self.slot();
        s.epoch += 1;
        s.last = None;
    }

    fn slot(&self) -> MutexGuard<'_, Slot> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cluster compressed at `offset` (or its first part), if it is the one kept.
    fn get(&self, offset: HostOffset) -> Option<Arc<Vec<u8>>> {
        match &self.slot().last {
            Some((o, d)) if *o == offset => Some(d.clone()),
            _ => None,
        }
    }

    fn epoch(&self) -> u64 {
        self.slot().epoch
    }

    /// Keep `data`, decompressed from `offset` by a reader that looked the mapping up at
    /// `epoch`, unless a cluster was freed since.
    fn store(&self, epoch: u64, offset: HostOffset, data: Vec<u8>) {
        let mut s = self.slot();
        if s.epoch == epoch {
            s.last = Some((offset, Arc::new(data)));
        }
    }
}

/// A compressed cluster that [`read`] decompresses outside the state lock: `len` bytes at
/// `start` in the caller's buffer are the bytes at `in_cluster` of guest cluster `guest`
/// (its offset), stored as `comp_len` bytes of compressed data at `host`.
struct CompPiece {
    start: usize,
    len: usize,
    in_cluster: usize,
    guest: u64,
    host: HostOffset,
    comp_len: usize,
    /// Bytes of the cluster to decompress when only a part of it is asked for: up to the end
    /// of that part (a random 4 KiB read inflates half a cluster on average, not all of it),
    /// or the whole cluster when the part starts it or continues the part kept in the cache
    /// (sequential small reads then inflate each cluster once).
    decode: usize,
}

/// What the unlocked compressed read needs from the state.
struct CompCtx<'a> {
    storage: &'a dyn crate::storage::Storage,
    name: &'a str,
    kind: crate::options::CompressionType,
    cluster_size: usize,
}

/// Compressed output below which a request is decompressed on the calling thread only.
const PARALLEL_DECOMPRESS_MIN: usize = 256 << 10;

/// Largest span of the file read in one call for several compressed clusters.
const COMP_SPAN_MAX: u64 = 4 << 20;

/// Read and decompress `pieces` (in buffer order) into `buf`, whose index 0 is buffer index
/// `base` of the request, on this thread. Returns the last cluster it decompressed into a
/// buffer of its own (a part of a cluster was asked for), to be kept in the cache.
fn decompress_serial(
    ctx: &CompCtx<'_>,
    buf: &mut [u8],
    base: usize,
    pieces: &[CompPiece],
) -> Result<Option<(HostOffset, Vec<u8>)>> {
    let mut kept = None;
    let mut i = 0;
    while i < pieces.len() {
        // Compressed clusters written one after another lie one after another in the file
        // (their sector-rounded lengths may overlap): read such a run in one call.
        let start = pieces[i].host.get();
        let mut end = start + pieces[i].comp_len as u64;
        let mut j = i + 1;
        while j < pieces.len() {
            let h = pieces[j].host.get();
            let e = h + pieces[j].comp_len as u64;
            if h < start || h > end + 4096 || e.max(end) - start > COMP_SPAN_MAX {
                break;
            }
            end = end.max(e);
            j += 1;
        }
        let mut span = vec![0u8; (end - start) as usize];
        ctx.storage.read_at(&mut span, start).map_err(|e| {
            Error::io(
                ctx.name,
                format!("read compressed cluster at {:#x}", pieces[i].host),
                e,
            )
        })?;
        for p in &pieces[i..j] {
            let at = (p.host.get() - start) as usize;
            let input = &span[at..at + p.comp_len];
            let out = &mut buf[p.start - base..p.start - base + p.len];
            let whole = p.in_cluster == 0 && p.len == ctx.cluster_size;
            let fail = |w: String| {
                Error::corrupt(
                    ctx.name,
                    format!("compressed cluster for guest offset {:#x}: {w}", p.guest),
                    p.host.get(),
                )
            };
            if whole {
                compress::decompress(input, out, ctx.kind).map_err(fail)?;
            } else {
                // Inflating stops once `decode` bytes are out: the rest of the stream is not
                // looked at (a later read of the rest checks it).
                let mut cluster = vec![0u8; p.decode];
                compress::decompress(input, &mut cluster, ctx.kind).map_err(fail)?;
                out.copy_from_slice(&cluster[p.in_cluster..p.in_cluster + p.len]);
                kept = Some((p.host, cluster));
            }
        }
        i = j;
    }
    Ok(kept)
}

/// [`decompress_serial`] for a whole request, spread over the cores when it is large (as the
/// cipher spreads large requests: `crypto::parallelism`).
fn decompress_pieces(
    ctx: &CompCtx<'_>,
    buf: &mut [u8],
    pieces: &[CompPiece],
) -> Result<Option<(HostOffset, Vec<u8>)>> {
    let total: usize = pieces.iter().map(|p| p.len).sum();
    let threads = crate::crypto::parallelism().min(pieces.len());
    if total < PARALLEL_DECOMPRESS_MIN || threads < 2 {
        return decompress_serial(ctx, buf, 0, pieces);
    }
    let per = pieces.len().div_ceil(threads);
    let groups: Vec<&[CompPiece]> = pieces.chunks(per).collect();
    let kept = run_split(
        buf,
        &groups,
        |g| g[0].start,
        |part, at, g| decompress_serial(ctx, part, at, g),
    )?;
    Ok(kept.into_iter().flatten().last())
}

/// One piece of a guest request that the lock-free path moves: `len` bytes at `start` in the
/// caller's buffer, at host offset `host`.
struct Piece {
    start: usize,
    len: usize,
    host: HostOffset,
}

/// Add a piece, merging it with the previous one when both buffer and host ranges are
/// contiguous.
fn push_piece(plan: &mut Vec<Piece>, start: usize, len: usize, host: HostOffset) {
    match plan.last_mut() {
        Some(last) if last.start + last.len == start && last.host + last.len as u64 == host => {
            last.len += len
        }
        _ => plan.push(Piece { start, len, host }),
    }
}

/// Read guest data (the bytes at `guest`) from the host file at `host`, outside the state
/// lock, and decrypt them.
fn host_read(
    storage: &dyn crate::storage::Storage,
    crypto: Option<&Crypto>,
    name: &str,
    buf: &mut [u8],
    host: HostOffset,
    guest: GuestOffset,
) -> Result<()> {
    storage
        .read_at(buf, host.get())
        .map_err(|e| Error::io(name, format!("read data at {host:#x}"), e))?;
    match crypto {
        Some(c) => c.decrypt(name, buf, host, guest),
        None => Ok(()),
    }
}

/// What the unlocked read of allocated clusters needs from the state.
struct DataCtx<'a> {
    storage: &'a dyn crate::storage::Storage,
    crypto: Option<&'a Crypto>,
    name: &'a str,
    /// Guest offset of the request (buffer index 0).
    offset: GuestOffset,
}

/// Allocated data below which a request is read (and decrypted) on the calling thread only.
const PARALLEL_READ_MIN: usize = 256 << 10;

/// Read (and decrypt) the allocated `pieces` of a request (in buffer order) into `buf`. A
/// large request of an encrypted image is cut into one part per core, each read and
/// decrypted on its own thread: copying out of the page cache and decrypting cost about the
/// same, and a single thread doing both left the other cores idle. Plain images are read on
/// the calling thread: a copy out of the page cache gains less from a second thread than
/// starting one costs on a busy machine (`qcow2rs bench -s 1M -d 1` of a plain image took
/// twice as long split in two, with a load of 5 to 10 on 2 cores).
/// Every part but the last holds the same number of bytes, a multiple of 4 KiB; the pieces of
/// an encrypted image are whole sectors, so every cut falls on a sector boundary.
fn read_pieces(ctx: &DataCtx<'_>, buf: &mut [u8], pieces: &[Piece]) -> Result<()> {
    let total: usize = pieces.iter().map(|p| p.len).sum();
    let threads = crate::crypto::parallelism();
    if total < PARALLEL_READ_MIN || threads < 2 || ctx.crypto.is_none() {
        for p in pieces {
            let guest = ctx.offset + p.start as u64;
            let part = &mut buf[p.start..p.start + p.len];
            host_read(ctx.storage, ctx.crypto, ctx.name, part, p.host, guest)?;
        }
        return Ok(());
    }
    // Cut the pieces into `threads` groups of about the same size.
    let per = total.div_ceil(threads).next_multiple_of(4096);
    let mut groups: Vec<Vec<Piece>> = vec![Vec::new()];
    let mut room = per;
    for p in pieces {
        let mut done = 0;
        while done < p.len {
            if room == 0 {
                groups.push(Vec::new());
                room = per;
            }
            let n = (p.len - done).min(room);
            groups.last_mut().expect("one group at least").push(Piece {
                start: p.start + done,
                len: n,
                host: p.host + done as u64,
            });
            done += n;
            room -= n;
        }
    }
    let run = |part: &mut [u8], base: usize, group: &Vec<Piece>| -> Result<()> {
        for p in group {
            let guest = ctx.offset + p.start as u64;
            let out = &mut part[p.start - base..p.start - base + p.len];
            ctx.storage
                .read_at(out, p.host.get())
                .map_err(|e| Error::io(ctx.name, format!("read data at {:#x}", p.host), e))?;
            if let Some(c) = ctx.crypto {
                c.decrypt_here(ctx.name, out, p.host, guest)?;
            }
        }
        Ok(())
    };
    run_split(buf, &groups, |g| g[0].start, run)?;
    Ok(())
}

/// Run `run` on every group of pieces at once, each on its own part of `buf` (from where the
/// group's first piece starts, `start`, up to where the next group's does; the first part starts
/// at 0): the last group on this thread, the others on threads of their own. `run` gets the
/// part, its offset in `buf` and the group. The results, in the groups' order; the first error.
fn run_split<G: Sync, T: Send>(
    buf: &mut [u8],
    groups: &[G],
    start: impl Fn(&G) -> usize,
    run: impl Fn(&mut [u8], usize, &G) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let run = &run;
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        let mut rest = buf;
        let mut base = 0usize;
        let mut last = None;
        for (k, group) in groups.iter().enumerate() {
            let end = groups.get(k + 1).map_or(base + rest.len(), &start);
            let (part, tail) = std::mem::take(&mut rest).split_at_mut(end - base);
            rest = tail;
            let at = base;
            base = end;
            if k + 1 == groups.len() {
                last = Some(run(part, at, group));
            } else {
                handles.push(scope.spawn(move || run(part, at, group)));
            }
        }
        let mut out = Vec::with_capacity(groups.len());
        for h in handles {
            match h.join() {
                Ok(r) => out.push(r?),
                Err(p) => std::panic::resume_unwind(p),
            }
        }
        out.extend(last.transpose()?);
        Ok(out)
    })
}

/// Whether a request covers whole sectors (an empty one does: it touches nothing).
fn sector_aligned(offset: GuestOffset, len: usize) -> bool {
    len == 0 || (offset.get().is_multiple_of(SECTOR as u64) && len.is_multiple_of(SECTOR))
}

/// The whole sectors around `[offset, offset+len)`: (start, length).
fn sector_span(offset: GuestOffset, len: usize) -> (GuestOffset, usize) {
    let start = offset.get() / SECTOR as u64 * SECTOR as u64;
    let end = (offset.get() + len as u64).div_ceil(SECTOR as u64) * SECTOR as u64;
    (GuestOffset::new(start), (end - start) as usize)
}

/// A read of an encrypted image that does not cover whole sectors: read the sectors, copy
/// out the part asked for.
fn read_unaligned(s: MutexGuard<'_, State>, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
    let (start, len) = sector_span(offset, buf.len());
    let mut span = vec![0u8; len];
    read(s, &mut span, start)?;
    let at = (offset - start) as usize;
    buf.copy_from_slice(&span[at..at + buf.len()]);
    Ok(())
}

/// Read `buf.len()` bytes at guest `offset` (already checked against the virtual size).
/// Lookups run under the lock; allocated data is read after the lock is released, so readers
/// on several threads scale. The I/O gate, taken before the lock is released, keeps a flush
/// from freeing and reusing a cluster while it is read.
pub(crate) fn read(
    mut s: MutexGuard<'_, State>,
    buf: &mut [u8],
    offset: GuestOffset,
) -> Result<()> {
    if s.crypto.is_some() && !sector_aligned(offset, buf.len()) {
        return read_unaligned(s, buf, offset);
    }
    if s.geo.extended_l2() {
        return s.read_inner(buf, offset);
    }
    let geo = s.geo;
    let mut plan: Vec<Piece> = Vec::new();
    let mut comps: Vec<CompPiece> = Vec::new();
    let mut done = 0usize;
    let mut off = offset;
    while done < buf.len() {
        let (c, in_cluster) = geo.split(off);
        let n = ((geo.cluster_size() - in_cluster) as usize).min(buf.len() - done);
        let e = s.lookup(c)?;
        match e.desc(&geo) {
            Desc::Normal { host } => {
                s.check_data_in_file(host, c)?;
                push_piece(&mut plan, done, n, host + in_cluster);
            }
            Desc::Compressed { offset: host, len } => {
                s.check_compressed(c, host, len)?;
                let at = in_cluster as usize;
                let cs = geo.cluster_size() as usize;
                let kept = s.decompressed.get(host);
                match kept {
                    Some(data) if data.len() >= at + n => {
                        buf[done..done + n].copy_from_slice(&data[at..at + n])
                    }
                    _ => comps.push(CompPiece {
                        start: done,
                        len: n,
                        in_cluster: at,
                        guest: geo.guest_offset(c).get(),
                        host,
                        comp_len: len as usize,
                        decode: if at == 0 || kept.is_some() {
                            cs
                        } else {
                            at + n
                        },
                    }),
                }
            }
            d => s.read_desc(c, in_cluster, &mut buf[done..done + n], d)?,
        }
        done += n;
        off += n as u64;
    }
    let gate = s.file.io_gate();
    let storage = s.file.storage().clone();
    let name = s.file.shared_name();
    let crypto = s.crypto.clone();
    let kind = s.compression;
    let cache = Decompressed(s.decompressed.0.clone());
    let epoch = cache.epoch();
    // Held until every byte is read: a flush cannot free and reuse a cluster read here, nor
    // punch it out (`flush.rs`, `apply_deferred_frees`), so the bytes read are the ones the
    // mapping named when it was looked up under the lock.
    let shared = gate.read().unwrap_or_else(|e| e.into_inner());
    drop(s);
    #[cfg(feature = "testing")]
    testing::in_unlocked_read();
    let data = DataCtx {
        storage: &*storage,
        crypto: crypto.as_deref(),
        name: &name,
        offset,
    };
    read_pieces(&data, buf, &plan)?;
    if !comps.is_empty() {
        let ctx = CompCtx {
            storage: &*storage,
            name: &name,
            kind,
            cluster_size: geo.cluster_size() as usize,
        };
        let kept = decompress_pieces(&ctx, buf, &comps)?;
        drop(shared);
        if let Some((host, data)) = kept {
            cache.store(epoch, host, data);
        }
    }
    Ok(())
}

/// Write `buf` at guest `offset` (already checked). Overwrites of clusters we own exclusively
/// run after the lock is released (under the I/O gate); everything else runs under it.
pub(crate) fn write<'a>(
    state: &'a Mutex<State>,
    mut s: MutexGuard<'a, State>,
    buf: &[u8],
    offset: GuestOffset,
) -> Result<()> {
    if s.crypto.is_some() && !sector_aligned(offset, buf.len()) {
        return s.write_unaligned(buf, offset);
    }
    if s.geo.extended_l2() {
        return s.write_inner(buf, offset);
    }
    let geo = s.geo;
    let mut plan: Vec<Piece> = Vec::new();
    let mut done = 0usize;
    let mut off = offset;
    while done < buf.len() {
        let (c, in_cluster) = geo.split(off);
        let n = ((geo.cluster_size() - in_cluster) as usize).min(buf.len() - done);
        let e = s.lookup(c)?;
        match e.desc(&geo) {
            Desc::Normal { host } if e.copied() => {
                s.check_write_target(host, c)?;
                // Clusters next to each other in the file go in one write (one device request
                // with O_DIRECT, where a write per cluster ran at half qemu's speed).
                push_piece(&mut plan, done, n, host + in_cluster);
            }
            _ => return write_allocating(state, s, buf, offset),
        }
        done += n;
        off += n as u64;
    }
    let gate = s.file.io_gate();
    let storage = s.file.storage().clone();
    let name = s.file.shared_name();
    let flag = s.file.data_written_flag().clone();
    let crypto = s.crypto.clone();
    let end = plan
        .iter()
        .map(|p| p.host.get() + p.len as u64)
        .max()
        .unwrap_or(0);
    s.file.reserve_unlocked_write(end);
    let _shared = gate.read().unwrap_or_else(|e| e.into_inner());
    drop(s);
    // Encrypt outside the lock, into one buffer for the whole request.
    let put = |data: &[u8]| -> Result<()> {
        for p in &plan {
            storage
                .write_at(&data[p.start..p.start + p.len], p.host.get())
                .map_err(|e| Error::io(&name, format!("write data at {:#x}", p.host), e))?;
        }
        Ok(())
    };
    match &crypto {
        Some(c) => with_scratch(buf, |enc| {
            for p in &plan {
                let guest = offset + p.start as u64;
                c.encrypt(&name, &mut enc[p.start..p.start + p.len], p.host, guest)?;
            }
            put(enc)
        })?,
        None => put(buf)?,
    }
    flag.store(true, Ordering::SeqCst);
    Ok(())
}

/// Largest encryption buffer a thread keeps between requests.
const SCRATCH_KEEP: usize = 1 << 20;

thread_local! {
    static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Run `f` on a copy of `src` in this thread's encryption buffer, which is kept for the next
/// request: a fresh allocation per write costs page faults (memory the allocator gave back
/// comes back zeroed). The buffer holds ciphertext between requests (plaintext only while
/// `f` encrypts it), and never more than `SCRATCH_KEEP` bytes of it.
fn with_scratch<R>(src: &[u8], f: impl FnOnce(&mut [u8]) -> R) -> R {
    let mut v = SCRATCH.take();
    v.clear();
    v.extend_from_slice(src);
    let r = f(&mut v);
    if v.capacity() <= SCRATCH_KEEP {
        SCRATCH.set(v);
    }
    r
}

/// Allocating writes whose data I/O runs outside the lock (see [`write_allocating`]).
#[derive(Default)]
pub(crate) struct Reservations {
    /// Clusters allocated and not yet linked or given back, over all writers.
    outstanding: u64,
    /// Set while check or repair waits for `outstanding` to drain: no new reservations.
    hold: bool,
    /// Bumped by the operations that may change any entry without `set_entry` (snapshot
    /// create, apply and delete; resize; check and repair): a write that saw another
    /// generation in its first phase redoes all its clusters the ordinary way.
    generation: u64,
    /// Numbers the writes in flight.
    next_id: u64,
    /// The writes between their two phases: which guest clusters they reserved for, and
    /// which of those had their L2 entry changed (by anyone) since.
    inflight: Vec<Intent>,
}

struct Intent {
    id: u64,
    first: GuestCluster,
    changed: Vec<bool>,
}

impl Reservations {
    /// The L2 entry of `c` is being changed: a write in flight that reserved a cluster for
    /// it must not link that cluster (its copy-on-write data, or its idea of the old entry,
    /// may be stale) and redoes it under the lock instead.
    pub(crate) fn entry_changed(&mut self, c: GuestCluster) {
        for i in &mut self.inflight {
            if let Some(k) = c.get().checked_sub(i.first.get()) {
                if let Some(f) = i.changed.get_mut(k as usize) {
                    *f = true;
                }
            }
        }
    }

    /// Some operation may have changed any entry (see `generation`).
    pub(crate) fn everything_changed(&mut self) {
        self.generation += 1;
    }
}

/// Where the bytes of one unlocked data write come from.
enum Src {
    /// The caller's buffer, from this index.
    Buf(usize),
    /// A buffer built under the lock (copy-on-write) or encrypted.
    Own(Vec<u8>),
}

/// One data write of [`write_allocating`]: `len` bytes at `host`, for guest offset `guest`.
struct Out {
    host: HostOffset,
    guest: GuestOffset,
    len: usize,
    src: Src,
}

/// A guest cluster that [`write_allocating`] reserved a host cluster for.
struct Reserved {
    c: GuestCluster,
    /// The part of the request in this cluster: `len` bytes from `start` of the buffer, at
    /// `in_cluster`.
    start: usize,
    len: usize,
    in_cluster: u64,
    host: HostOffset,
    /// Whether the entry must wait for the data (`flush.rs`, rule 3).
    data_barrier: bool,
    /// Mutant `par-early-link`: linked in the first phase.
    linked: bool,
}

/// A write that needs at least one new cluster (plain or encrypted, any alignment that
/// reaches here): the data I/O runs outside the lock, so that several writers scale.
///
/// 1. Under the lock, per guest cluster: one we own (COPIED) gets its bytes written in place;
///    any other gets a host cluster from `alloc_run_cluster` (refcount raised, nothing points
///    at it: a crash leaks it at worst), counted in `State::reserved`. A partial cluster gets
///    its copy-on-write data read now (the old cluster, the backing file, or nothing when the
///    new cluster was never written and the guest cluster reads as zeros). The write registers
///    an intent naming its guest clusters; the I/O gate is taken shared (a flush cannot free
///    and reuse the in-place targets meanwhile).
/// 2. Without the lock: encrypt (for the reserved host offsets: LUKS IVs are host sectors)
///    and pwrite everything, then set the data-written flag, then let go of the gate.
/// 3. Under the lock again: link each reserved cluster (`link`: the entry waits for the
///    refcount, the file length and the data, which is complete now) and drop the old
///    cluster's reference, unless its entry changed in the window (another writer allocated
///    it, a discard or zero ran: `Reservations::entry_changed`; or a snapshot, resize or
///    check ran: `Reservations::everything_changed`). Such a cluster is redone the ordinary
///    way under the lock, and its reserved cluster given back (immediately: nothing ever
///    pointed at it; it was written, and the file's written extent covers it, so it is never
///    taken for zeros). A failed data write, a shrink below the request or a failed image
///    gives back every reserved cluster that is not linked. Nothing is ever linked before
///    its data write completed.
///
/// A flush that runs in the window writes none of the new entries (they do not exist yet);
/// one that begins after the write returned writes them, behind a barrier that follows the
/// data (group commit counts the write once step 3 is done).
fn write_allocating<'a>(
    state: &'a Mutex<State>,
    mut s: MutexGuard<'a, State>,
    buf: &[u8],
    offset: GuestOffset,
) -> Result<()> {
    if s.reserved.hold || buf.is_empty() {
        return s.write_inner(buf, offset);
    }
    let geo = s.geo;
    let cs = geo.cluster_size();
    // First pass: is every cluster one this path handles?
    let mut done = 0usize;
    let mut off = offset;
    let mut allocating = 0u64;
    while done < buf.len() {
        let (c, in_cluster) = geo.split(off);
        let n = ((cs - in_cluster) as usize).min(buf.len() - done);
        let e = s.lookup(c)?;
        match e.desc(&geo) {
            Desc::Normal { host } if e.copied() => s.check_write_target(host, c)?,
            // Written in place after zeroing: the ordinary path.
            Desc::ZeroAlloc { .. } if e.copied() => return s.write_inner(buf, offset),
            _ => allocating += 1,
        }
        done += n;
        off += n as u64;
    }
    let crypto = s.crypto.clone();
    let name = s.file.shared_name();
    let mut outs: Vec<Out> = Vec::new();
    let mut reserved: Vec<Reserved> = Vec::with_capacity(allocating as usize);
    let id = s.reserved.next_id;
    s.reserved.next_id += 1;
    let generation = s.reserved.generation;
    let first = geo.guest_cluster(offset);
    let mut done = 0usize;
    let mut off = offset;
    let planned = (|| -> Result<()> {
        while done < buf.len() {
            let (c, in_cluster) = geo.split(off);
            let n = ((cs - in_cluster) as usize).min(buf.len() - done);
            let e = s.lookup(c)?;
            let d = e.desc(&geo);
            let guest = geo.guest_offset(c) + in_cluster;
            if let Desc::Normal { host } = d {
                if e.copied() {
                    push_out(&mut outs, host + in_cluster, guest, n, Src::Buf(done));
                    done += n;
                    off += n as u64;
                    continue;
                }
            }
            // The L2 table first, as the locked path does: a new table is allocated before
            // the data cluster (the layout qemu-img makes), and a failure here reserves nothing.
            s.prepare_l2(c)?;
            let new = s.alloc_run_cluster()?;
            s.reserved.outstanding += 1;
            let old_zero = match d {
                Desc::Unallocated => s.backing.is_none(),
                Desc::ZeroPlain => true,
                _ => false,
            };
            // Never-written space reads as zeros, but not once decrypted.
            let virgin = (crypto.is_none() || mutant("crypt-virgin"))
                && (s.file.never_written(new) || mutant("virgin-check"));
            // Listed at once: from here on, an error gives it back.
            reserved.push(Reserved {
                c,
                start: done,
                len: n,
                in_cluster,
                host: new,
                data_barrier: !(virgin && old_zero),
                linked: false,
            });
            if (virgin && old_zero) || n as u64 == cs {
                push_out(&mut outs, new + in_cluster, guest, n, Src::Buf(done));
            } else {
                let mut full = vec![0u8; cs as usize];
                s.read_desc(c, 0, &mut full, d)?;
                full[in_cluster as usize..in_cluster as usize + n]
                    .copy_from_slice(&buf[done..done + n]);
                let g0 = geo.guest_offset(c);
                push_out(&mut outs, new, g0, cs as usize, Src::Own(full));
            }
            if mutant("par-early-link") {
                let data_barrier = reserved.last().expect("just pushed").data_barrier;
                s.prepare_l2(c)?;
                s.link(c, L2Entry::owned(new, 0), data_barrier)?;
                reserved.last_mut().expect("just pushed").linked = true;
                s.release(d, false)?;
            }
            done += n;
            off += n as u64;
        }
        Ok(())
    })();
    if let Err(e) = planned {
        s.give_back_reserved(&reserved);
        return Err(e);
    }
    let end = outs
        .iter()
        .map(|o| o.host.get() + o.len as u64)
        .max()
        .unwrap_or(0);
    s.file.reserve_unlocked_write(end);
    let n_clusters = geo.guest_cluster(offset + (buf.len() as u64 - 1)).get() - first.get() + 1;
    s.reserved.inflight.push(Intent {
        id,
        first,
        changed: vec![false; n_clusters as usize],
    });
    let gate = s.file.io_gate();
    let storage = s.file.storage().clone();
    let flag = s.file.data_written_flag().clone();
    let shared = gate.read().unwrap_or_else(|e| e.into_inner());
    drop(s);

    // Step 2: the data, without the lock.
    let written = (|| -> Result<()> {
        if let Some(c) = &crypto {
            for o in &mut outs {
                let mut v = match std::mem::replace(&mut o.src, Src::Buf(0)) {
                    Src::Buf(at) => buf[at..at + o.len].to_vec(),
                    Src::Own(v) => v,
                };
                let h = if mutant("reserve-iv") {
                    o.host + cs
                } else {
                    o.host
                };
                c.encrypt(&name, &mut v, h, o.guest)?;
                o.src = Src::Own(v);
            }
        }
        for o in &outs {
            let data = match &o.src {
                Src::Buf(at) => &buf[*at..*at + o.len],
                Src::Own(v) => &v[..],
            };
            storage
                .write_at(data, o.host.get())
                .map_err(|e| Error::io(&name, format!("write data at {:#x}", o.host), e))?;
        }
        Ok(())
    })();
    // Whatever reached the file (even a failed write may have) is covered by the next barrier.
    flag.store(true, Ordering::SeqCst);
    drop(shared);
    #[cfg(feature = "testing")]
    testing::between_phases();

    // Step 3: link, under the lock.
    let mut s = crate::state::lock(state);
    let intent = s
        .reserved
        .inflight
        .iter()
        .position(|i| i.id == id)
        .map(|k| s.reserved.inflight.swap_remove(k))
        .expect("the intent of a write in flight");
    let everything = s.reserved.generation != generation;
    // The checks the caller made before the lock was dropped, again: the image may have
    // shrunk or failed meanwhile.
    let checked = written
        .and_then(|()| s.check_writable())
        .and_then(|()| s.check_range(offset.get(), buf.len() as u64));
    if let Err(e) = checked {
        // Nothing is linked: every reserved cluster goes back (a linked one, under mutant
        // `par-early-link`, is the entry's now).
        s.give_back_reserved(&reserved);
        return Err(e);
    }
    let mut result = Ok(());
    for (k, r) in reserved.iter().enumerate() {
        if result.is_err() {
            s.give_back_reserved(&reserved[k..]);
            break;
        }
        if r.linked {
            s.reserved.outstanding -= 1;
            continue;
        }
        let changed = everything || intent.changed[(r.c.get() - first.get()) as usize];
        result = if changed && !mutant("par-stale-link") {
            // Redo this cluster the ordinary way (in place if another writer allocated it).
            s.give_back_reserved(std::slice::from_ref(r));
            s.write_cluster_now(r.c, r.in_cluster, &buf[r.start..r.start + r.len])
        } else {
            s.reserved.outstanding -= 1;
            s.link_reserved(r)
        };
    }
    result
}

/// Add an unlocked data write, merged with the previous one when both the host range and
/// the source are contiguous.
fn push_out(outs: &mut Vec<Out>, host: HostOffset, guest: GuestOffset, len: usize, src: Src) {
    if let (Some(last), Src::Buf(at)) = (outs.last_mut(), &src) {
        if let Src::Buf(last_at) = last.src {
            if last.host + last.len as u64 == host && last_at + last.len == *at {
                last.len += len;
                return;
            }
        }
    }
    outs.push(Out {
        host,
        guest,
        len,
        src,
    });
}

/// A test hook for the window between the two phases of [`write_allocating`].
#[cfg(feature = "testing")]
pub mod testing {
    use std::cell::RefCell;

    type Hook = Box<dyn FnOnce()>;

    thread_local! {
        static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    /// Run `f` once, on this thread, the next time one of its allocating writes has reserved
    /// clusters, dropped the lock and written its data (encrypted) there, before it takes the
    /// lock again to link them: what another thread could do in that window, made
    /// deterministic. The I/O gate is not held while `f` runs.
    pub fn between_reserve_and_write(f: impl FnOnce() + 'static) {
        HOOK.with(|h| *h.borrow_mut() = Some(Box::new(f)));
    }

    thread_local! {
        static READ_HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    /// Run `f` once, on this thread, the next time one of its reads (of an image without
    /// extended L2 entries) has looked its clusters up and released the lock, before it reads
    /// and decompresses the data: the window in which another thread could free and reuse a
    /// cluster the read is about to read. The I/O gate is held (shared) while `f` runs, so
    /// `f` must not wait for a flush it starts itself.
    pub fn in_unlocked_read_window(f: impl FnOnce() + 'static) {
        READ_HOOK.with(|h| *h.borrow_mut() = Some(Box::new(f)));
    }

    pub(super) fn in_unlocked_read() {
        if let Some(f) = READ_HOOK.with(|h| h.borrow_mut().take()) {
            f()
        }
    }

    thread_local! {
        static WINDOW_DELAY: std::cell::Cell<std::time::Duration> =
            const { std::cell::Cell::new(std::time::Duration::ZERO) };
    }

    /// Sleep `d` in the window of every allocating write this thread makes from now on (zero:
    /// no more): the crash simulator's concurrent workloads widen the window so that other
    /// threads' writes to the same clusters land inside it on every run, not by luck of
    /// scheduling (mutant `par-stale-link` is then caught every time).
    pub fn set_window_delay(d: std::time::Duration) {
        WINDOW_DELAY.with(|w| w.set(d));
    }

    pub(super) fn between_phases() {
        let d = WINDOW_DELAY.with(|w| w.get());
        if !d.is_zero() {
            std::thread::sleep(d);
        }
        if let Some(f) = HOOK.with(|h| h.borrow_mut().take()) {
            f()
        }
    }
}

impl State {
    /// Give back reserved clusters that nothing points to (the decrease is immediate, as for
    /// the allocator's run; they may have been written, but the file's written extent covers
    /// them, so a later allocation never takes them for zeros). One that cannot be given back
    /// is leaked, which `check -r leaks` repairs. Linked ones (mutant `par-early-link`) are
    /// only uncounted.
    fn give_back_reserved(&mut self, list: &[Reserved]) {
        for r in list {
            self.reserved.outstanding -= 1;
            if !r.linked {
                let c = self.geo.host_cluster(r.host);
                let _ = self.change_refcount(c, -1);
            }
        }
    }

    /// Step 3 of [`write_allocating`] for a cluster whose entry did not change in the window:
    /// point it at the reserved cluster, whose data is complete, and drop the old reference.
    /// When the entry cannot be set (an L2 table that cannot be read or made writable, a
    /// failed barrier), nothing names the reserved cluster: it is given back, not leaked.
    fn link_reserved(&mut self, r: &Reserved) -> Result<()> {
        let linked = (|| -> Result<Desc> {
            let e = self.lookup(r.c)?;
            let d = e.desc(&self.geo);
            self.prepare_l2(r.c)?;
            self.link(r.c, L2Entry::owned(r.host, 0), r.data_barrier)?;
            Ok(d)
        })();
        match linked {
            Ok(d) => self.release(d, false),
            Err(e) => {
                let c = self.geo.host_cluster(r.host);
                let _ = self.change_refcount(c, -1);
                Err(e)
            }
        }
    }

    /// Wait until no write holds reserved clusters, and keep new ones from reserving until
    /// [`State::release_reservations`]: check and repair must see every allocated cluster
    /// pointed to. The lock is dropped while waiting (the writers need it to finish).
    pub(crate) fn drain_reservations<'a>(
        state: &'a Mutex<State>,
        mut s: MutexGuard<'a, State>,
    ) -> MutexGuard<'a, State> {
        s.reserved.hold = true;
        while s.reserved.outstanding > 0 {
            drop(s);
            std::thread::sleep(std::time::Duration::from_micros(100));
            s = crate::state::lock(state);
        }
        s
    }

    /// Let writers reserve clusters again.
    pub(crate) fn release_reservations(&mut self) {
        self.reserved.hold = false;
    }
}

impl State {
    /// Read the guest bytes at `guest` from `host` under the lock, and decrypt them
    /// (`cluster` names the host cluster in an error).
    fn host_read(
        &self,
        buf: &mut [u8],
        host: HostOffset,
        guest: GuestOffset,
        cluster: HostOffset,
    ) -> Result<()> {
        self.file.read_data(buf, host, cluster)?;
        match &self.crypto {
            Some(c) => c.decrypt(self.file.name(), buf, host, guest),
            None => Ok(()),
        }
    }

    /// Encrypt the guest bytes at `guest` and write them at `host`.
    fn host_write(&mut self, buf: &[u8], host: HostOffset, guest: GuestOffset) -> Result<()> {
        match self.crypto.clone() {
            Some(c) => with_scratch(buf, |enc| {
                c.encrypt(self.file.name(), enc, host, guest)?;
                self.file.write_data(enc, host)
            }),
            None => self.file.write_data(buf, host),
        }
    }

    /// `host_write` of a buffer the caller no longer needs (encrypted in place).
    fn host_write_vec(&mut self, buf: Vec<u8>, host: HostOffset, guest: GuestOffset) -> Result<()> {
        match self.crypto.clone() {
            Some(c) => self.host_write_owned(buf, host, guest, &c),
            None => self.file.write_data(&buf, host),
        }
    }

    fn host_write_owned(
        &mut self,
        mut buf: Vec<u8>,
        host: HostOffset,
        guest: GuestOffset,
        c: &Arc<Crypto>,
    ) -> Result<()> {
        c.encrypt(self.file.name(), &mut buf, host, guest)?;
        self.file.write_data(&buf, host)
    }

    /// A write to an encrypted image that does not cover whole sectors: read the partial
    /// sectors at its ends, lay the data over them and write whole sectors, all under the
    /// lock. First wait for lock-free overwrites in flight (the I/O gate): one of them could be
    /// rewriting the same sectors, and the read-modify-write must not undo it.
    pub(crate) fn write_unaligned(&mut self, buf: &[u8], offset: GuestOffset) -> Result<()> {
        drop(
            self.file
                .io_gate()
                .write()
                .unwrap_or_else(|e| e.into_inner()),
        );
        let (start, len) = sector_span(offset, buf.len());
        let mut span = vec![0u8; len];
        let at = (offset - start) as usize;
        if at != 0 {
            self.read_inner(&mut span[..SECTOR], start)?;
        }
        let tail = len - SECTOR;
        if at + buf.len() != len && (tail != 0 || at == 0) {
            self.read_inner(&mut span[tail..], start + tail as u64)?;
        }
        span[at..at + buf.len()].copy_from_slice(buf);
        self.write_inner(&span, start)
    }

    /// Validate the host cluster an L2 entry names before guest data is written there: aligned,
    /// inside the file, and not holding metadata (a crafted or damaged image must not steer a
    /// guest write into its own header or tables).
    pub(crate) fn check_write_target(&mut self, host: HostOffset, c: GuestCluster) -> Result<()> {
        self.check_data_in_file(host, c)?;
        if self.is_metadata(self.geo.host_cluster(host)) {
            return Err(Error::corrupt(
                self.name(),
                format!(
                    "Preventing write of guest data at guest offset {:#x} into metadata at {host:#x} (the L2 entry points at the image's own tables; run check -r all)",
                    self.geo.guest_offset(c)
                ),
                host.get(),
            ));
        }
        Ok(())
    }

    /// Validate a host data cluster offset from an L2 entry: aligned and inside the file.
    pub(crate) fn check_data_in_file(&self, host: HostOffset, c: GuestCluster) -> Result<()> {
        if !self.geo.is_cluster_aligned(host) {
            return Err(Error::corrupt(
                self.name(),
                format!(
                    "cluster allocation offset {host:#x} unaligned (guest offset {:#x})",
                    self.geo.guest_offset(c)
                ),
                host.get(),
            ));
        }
        if host.get() >= self.file.len() {
            return Err(Error::corrupt(
                self.name(),
                format!(
                    "data cluster at {host:#x} (guest offset {:#x}) lies past the end of the file",
                    self.geo.guest_offset(c)
                ),
                host.get(),
            ));
        }
        Ok(())
    }

    // ---------------------------------------------------------------- reads

    /// Read guest bytes under the lock, without a bounds check against the virtual size.
    pub(crate) fn read_inner(&mut self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
        let geo = self.geo;
        let mut done = 0usize;
        let mut off = offset;
        while done < buf.len() {
            let (c, in_cluster) = geo.split(off);
            let n = ((geo.cluster_size() - in_cluster) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            let e = self.lookup(c)?;
            if geo.extended_l2() {
                self.read_ext(c, in_cluster, out, e)?;
            } else {
                self.read_desc(c, in_cluster, out, e.desc(&geo))?;
            }
            done += n;
            off += n as u64;
        }
        Ok(())
    }

    /// Read `out.len()` bytes at `in_cluster` of guest cluster `c`, described by `d`.
    fn read_desc(
        &mut self,
        c: GuestCluster,
        in_cluster: u64,
        out: &mut [u8],
        d: Desc,
    ) -> Result<()> {
        match d {
            Desc::Unallocated => self.read_backing(out, self.geo.guest_offset(c) + in_cluster),
            Desc::ZeroPlain | Desc::ZeroAlloc { .. } => {
                out.fill(0);
                Ok(())
            }
            Desc::Normal { host } => {
                self.check_data_in_file(host, c)?;
                let guest = self.geo.guest_offset(c) + in_cluster;
                self.host_read(out, host + in_cluster, guest, host)
            }
            Desc::Compressed { offset, len } => {
                let data = self.decompressed(c, offset, len)?;
                let at = in_cluster as usize;
                out.copy_from_slice(&data[at..at + out.len()]);
                Ok(())
            }
        }
    }

    /// `read_desc` for an extended L2 entry: subcluster by subcluster.
    fn read_ext(
        &mut self,
        c: GuestCluster,
        in_cluster: u64,
        out: &mut [u8],
        e: L2Entry,
    ) -> Result<()> {
        let d = e.desc(&self.geo);
        if let Desc::Compressed { .. } = d {
            return self.read_desc(c, in_cluster, out, d);
        }
        let bm = e.bitmap;
        if l2::sub::invalid(bm) {
            return Err(Error::corrupt(
                self.name(),
                format!(
                    "invalid subcluster bitmap {bm:#x} for guest offset {:#x}",
                    self.geo.guest_offset(c)
                ),
                0,
            ));
        }
        let host = e.host();
        if host.get() == 0 && bm & 0xffff_ffff != 0 {
            return Err(Error::corrupt(
                self.name(),
                format!(
                    "subclusters allocated without a host cluster at guest offset {:#x}",
                    self.geo.guest_offset(c)
                ),
                0,
            ));
        }
        let sub_size = self.geo.subcluster_size();
        let mut pos = 0usize;
        while pos < out.len() {
            let o = in_cluster + pos as u64;
            let sc = (o / sub_size) as u32;
            // Extend over following subclusters of the same kind.
            let kind = |s: u32| {
                if l2::sub::allocated(bm, s) {
                    1
                } else if l2::sub::zero(bm, s) {
                    2
                } else {
                    0
                }
            };
            let k = kind(sc);
            let mut end_sc = sc + 1;
            while end_sc < l2::sub::COUNT && kind(end_sc) == k {
                end_sc += 1;
            }
            let n = ((end_sc as u64 * sub_size - o) as usize).min(out.len() - pos);
            let part = &mut out[pos..pos + n];
            match k {
                1 => {
                    self.check_data_in_file(host, c)?;
                    self.host_read(part, host + o, self.geo.guest_offset(c) + o, host)?
                }
                2 => part.fill(0),
                _ => self.read_backing(part, self.geo.guest_offset(c) + o)?,
            }
            pos += n;
        }
        Ok(())
    }

    /// Read from the backing file (zeros without one).
    fn read_backing(&mut self, out: &mut [u8], guest: GuestOffset) -> Result<()> {
        match &self.backing {
            Some(b) => b.read(out, guest.get(), self.file.name()),
            None => {
                out.fill(0);
                Ok(())
            }
        }
    }

    /// Validate a compressed cluster's place: it starts inside the file and is not longer than
    /// a compressed cluster can be.
    fn check_compressed(&self, c: GuestCluster, offset: HostOffset, len: u64) -> Result<()> {
        if offset.get() >= self.file.len() || len > 2 * self.geo.cluster_size() {
            return Err(Error::corrupt(
                self.name(),
                format!(
                    "compressed cluster for guest offset {:#x} lies past the end of the file",
                    self.geo.guest_offset(c)
                ),
                offset.get(),
            ));
        }
        Ok(())
    }

    /// The guest cluster `c` stored compressed at `offset` (`len` bytes), decompressed (under
    /// the lock: the paths that are not [`read`]).
    fn decompressed(
        &mut self,
        c: GuestCluster,
        offset: HostOffset,
        len: u64,
    ) -> Result<Arc<Vec<u8>>> {
        match self.decompressed.get(offset) {
            Some(d) if d.len() == self.geo.cluster_size() as usize => return Ok(d),
            _ => {}
        }
        self.check_compressed(c, offset, len)?;
        let mut input = vec![0u8; len as usize];
        self.file.read(&mut input, offset, "compressed cluster")?;
        let mut out = vec![0u8; self.geo.cluster_size() as usize];
        compress::decompress(&input, &mut out, self.compression).map_err(|w| {
            Error::corrupt(
                self.name(),
                format!(
                    "compressed cluster for guest offset {:#x}: {w}",
                    self.geo.guest_offset(c)
                ),
                offset.get(),
            )
        })?;
        let epoch = self.decompressed.epoch();
        self.decompressed.store(epoch, offset, out);
        Ok(self
            .decompressed
            .get(offset)
            .expect("stored under the lock, with the current epoch"))
    }

    // ---------------------------------------------------------------- writes

    /// Write guest bytes under the lock.
    pub(crate) fn write_inner(&mut self, buf: &[u8], offset: GuestOffset) -> Result<()> {
        let geo = self.geo;
        let mut done = 0usize;
        // Guest bytes whose write was left to us, merged while their host clusters are
        // contiguous: one pwrite for a long sequential write instead of one per cluster.
        let mut pend: Option<Piece> = None;
        let mut off = offset;
        while done < buf.len() {
            let (c, in_cluster) = geo.split(off);
            let n = ((geo.cluster_size() - in_cluster) as usize).min(buf.len() - done);
            if let Some(host) = self.write_cluster(c, in_cluster, &buf[done..done + n])? {
                match &mut pend {
                    Some(p) if p.start + p.len == done && p.host + p.len as u64 == host => {
                        p.len += n
                    }
                    _ => {
                        if let Some(p) = pend.take() {
                            let guest = offset + p.start as u64;
                            self.host_write(&buf[p.start..p.start + p.len], p.host, guest)?;
                        }
                        pend = Some(Piece {
                            start: done,
                            len: n,
                            host,
                        });
                    }
                }
            }
            done += n;
            off += n as u64;
        }
        if let Some(p) = pend {
            let guest = offset + p.start as u64;
            self.host_write(&buf[p.start..p.start + p.len], p.host, guest)?;
        }
        self.file.data_written_flag().store(true, Ordering::SeqCst);
        Ok(())
    }

    /// `write_cluster`, doing the data write itself.
    pub(crate) fn write_cluster_now(
        &mut self,
        c: GuestCluster,
        in_cluster: u64,
        data: &[u8],
    ) -> Result<()> {
        if let Some(host) = self.write_cluster(c, in_cluster, data)? {
            let guest = self.geo.guest_offset(c) + in_cluster;
            self.host_write(data, host, guest)?;
        }
        Ok(())
    }

    /// Explicit zeros over `n` bytes at `in_cluster` of cluster `c`. On an encrypted image a
    /// range that is not whole sectors is read-modified-written (the cipher works on sectors).
    pub(crate) fn write_zeros(&mut self, c: GuestCluster, in_cluster: u64, n: u64) -> Result<()> {
        let zeros = vec![0u8; n as usize];
        let at = self.geo.guest_offset(c) + in_cluster;
        if self.crypto.is_some() && !sector_aligned(at, zeros.len()) {
            return self.write_unaligned(&zeros, at);
        }
        self.write_cluster_now(c, in_cluster, &zeros)
    }

    /// Drop the reference an old descriptor held (after its L2 entry was replaced).
    ///
    /// A cluster that holds metadata (a crafted or damaged entry naming a refcount block, a
    /// table, the header) keeps its count: dropping the reference would let the allocator hand
    /// the live structure out again (an L2 entry naming the refcount block, discarded, freed
    /// the block and the next write put guest data over it). At worst that leaks a reference.
    fn release(&mut self, d: Desc, discard: bool) -> Result<()> {
        let (first, n) = match d {
            Desc::Normal { host } | Desc::ZeroAlloc { host } => (self.geo.host_cluster(host), 1),
            Desc::Compressed { offset, len } => {
                let first = self.geo.host_cluster(offset.sector_floor());
                let last = self.geo.host_cluster(offset + (len - 1));
                (first, last - first + 1)
            }
            _ => return Ok(()),
        };
        for i in 0..n {
            if !self.is_metadata(first + i) {
                self.free_clusters(self.geo.host_offset(first + i), 1, discard)?;
            }
        }
        Ok(())
    }

    /// Write `data` into guest cluster `c` at `in_cluster`. Returns `Some(host)` when the
    /// caller is to write `data` at `host` itself, which is only done where the data write has
    /// no ordering constraint (an in-place overwrite, or a never-written cluster of a zero guest
    /// cluster).
    fn write_cluster(
        &mut self,
        c: GuestCluster,
        in_cluster: u64,
        data: &[u8],
    ) -> Result<Option<HostOffset>> {
        let e = self.lookup(c)?;
        if self.geo.extended_l2() {
            self.write_cluster_ext(c, in_cluster, data, e)?;
            return Ok(None);
        }
        let cluster_size = self.geo.cluster_size();
        let d = e.desc(&self.geo);
        match d {
            Desc::Normal { host } if e.copied() => {
                self.check_write_target(host, c)?;
                return Ok(Some(host + in_cluster));
            }
            Desc::ZeroAlloc { host } if e.copied() => {
                self.check_write_target(host, c)?;
                let mut full = vec![0u8; cluster_size as usize];
                full[in_cluster as usize..in_cluster as usize + data.len()].copy_from_slice(data);
                self.prepare_l2(c)?;
                self.host_write_vec(full, host, self.geo.guest_offset(c))?;
                // The zeroed cluster must be stable before the entry stops saying "zero".
                if !mutant("zero-alloc-barrier") {
                    self.order_after_data();
                } else {
                    self.pending.changed();
                }
                self.set_entry(c, L2Entry::owned(host, 0))?;
                return Ok(None);
            }
            _ => {}
        }
        // Allocating write, with copy-on-write of the parts the guest did not write.
        let old_zero = match d {
            Desc::Unallocated => self.backing.is_none(),
            Desc::ZeroPlain => true,
            _ => false,
        };
        self.prepare_l2(c)?;
        let new = self.alloc_run_cluster()?;
        // Never-written space reads as zeros, but not once decrypted.
        let virgin = (self.crypto.is_none() || mutant("crypt-virgin"))
            && (self.file.never_written(new) || mutant("virgin-check"));
        let mut deferred = None;
        let guest = self.geo.guest_offset(c);
        if virgin && old_zero {
            // The cluster reads as zeros already (the file was extended over it and nothing
            // was ever written there): write only the guest's bytes, no zero copy-on-write.
            // The caller may merge the write with its neighbours: if the entry reached the
            // disk before the data, the guest would read zeros, its old contents.
            deferred = Some(new + in_cluster);
        } else if data.len() as u64 != cluster_size {
            let mut full = vec![0u8; cluster_size as usize];
            self.read_desc(c, 0, &mut full, d)?;
            full[in_cluster as usize..in_cluster as usize + data.len()].copy_from_slice(data);
            self.host_write_vec(full, new, guest)?;
        } else {
            self.host_write(data, new, guest)?;
        }
        self.link(c, L2Entry::owned(new, 0), !(virgin && old_zero))?;
        self.release(d, false)?;
        Ok(deferred)
    }

    /// Point `c` at newly written data. The entry waits for the new cluster's refcount and the
    /// file length, and with `data_barrier` for the data (see `flush.rs`, rules 1, 3 and 4). A
    /// crash can skip the data barrier only where it could reveal nothing but what the guest
    /// saw before: a cluster past every byte ever written reads as zeros, and if the guest
    /// cluster read as zeros before, zeros are its old version.
    fn link(&mut self, c: GuestCluster, e: L2Entry, data_barrier: bool) -> Result<()> {
        self.order_entry_update(data_barrier)?;
        self.set_entry(c, e)
    }

    /// `write_cluster` for extended L2 entries: subcluster granularity.
    fn write_cluster_ext(
        &mut self,
        c: GuestCluster,
        in_cluster: u64,
        data: &[u8],
        e: L2Entry,
    ) -> Result<()> {
        let d = e.desc(&self.geo);
        let bm = e.bitmap;
        let sub_size = self.geo.subcluster_size();
        let s0 = in_cluster / sub_size;
        let s1 = (in_cluster + data.len() as u64).div_ceil(sub_size);
        let mut touched = 0u64;
        for s in s0..s1 {
            touched |= 1u64 << s;
        }
        let new_bitmap = (bm | touched) & !(touched << 32);
        let guest = self.geo.guest_offset(c);
        match d {
            Desc::Normal { host } if e.copied() => {
                self.check_write_target(host, c)?;
                if bm & touched == touched {
                    return self.host_write(data, host + in_cluster, guest + in_cluster);
                }
                let span = self.span_buffer(c, s0 * sub_size, s1 * sub_size, in_cluster, data)?;
                self.prepare_l2(c)?;
                self.host_write_vec(span, host + s0 * sub_size, guest + s0 * sub_size)?;
                self.order_after_data();
                self.set_entry(c, e.with_bitmap(new_bitmap))
            }
            Desc::Unallocated => {
                let span = self.span_buffer(c, s0 * sub_size, s1 * sub_size, in_cluster, data)?;
                self.prepare_l2(c)?;
                let new = self.alloc_run_cluster()?;
                let virgin = (self.crypto.is_none() || mutant("crypt-virgin"))
                    && (self.file.never_written(new) || mutant("virgin-check"));
                self.host_write_vec(span, new + s0 * sub_size, guest + s0 * sub_size)?;
                let old_zero = self.backing.is_none();
                self.link(c, L2Entry::owned(new, new_bitmap), !(virgin && old_zero))
            }
            _ => {
                // Compressed or shared: copy the whole cluster.
                let full = self.span_buffer(c, 0, self.geo.cluster_size(), in_cluster, data)?;
                self.prepare_l2(c)?;
                let new = self.alloc_run_cluster()?;
                self.host_write_vec(full, new, guest)?;
                let bitmap = if matches!(d, Desc::Compressed { .. }) {
                    0xffff_ffff
                } else {
                    new_bitmap
                };
                self.link(c, L2Entry::owned(new, bitmap), true)?;
                self.release(d, false)
            }
        }
    }

    /// Current guest contents of `[start, end)` within cluster `c`, with `data` laid over at
    /// `in_cluster`.
    fn span_buffer(
        &mut self,
        c: GuestCluster,
        start: u64,
        end: u64,
        in_cluster: u64,
        data: &[u8],
    ) -> Result<Vec<u8>> {
        let base = self.geo.guest_offset(c);
        let mut span = vec![0u8; (end - start) as usize];
        let rel = (in_cluster - start) as usize;
        if rel > 0 {
            self.read_inner(&mut span[..rel], base + start)?;
        }
        let tail = rel + data.len();
        if tail < span.len() {
            self.read_inner(&mut span[tail..], base + start + tail as u64)?;
        }
        span[rel..tail].copy_from_slice(data);
        Ok(span)
    }

    /// Whether guest cluster `c` reads as zeros without looking at data.
    pub(crate) fn known_zero(&mut self, c: GuestCluster) -> Result<bool> {
        let e = self.lookup(c)?;
        if self.geo.extended_l2() {
            return Ok(e.word == 0 && (e.bitmap >> 32) == 0xffff_ffff
                || (e.is_empty() && self.backing.is_none()));
        }
        Ok(match e.desc(&self.geo) {
            Desc::ZeroPlain | Desc::ZeroAlloc { .. } => true,
            Desc::Unallocated => self.backing.is_none(),
            _ => false,
        })
    }

    /// Make `[offset, offset+len)` read as zeros. A partial cluster that ends at `disk_end`
    /// counts as whole.
    pub(crate) fn zero_inner(
        &mut self,
        offset: GuestOffset,
        len: u64,
        disk_end: GuestOffset,
    ) -> Result<()> {
        let geo = self.geo;
        let end = offset + len;
        let mut off = offset;
        while off < end {
            let (c, in_cluster) = geo.split(off);
            let n = (geo.cluster_size() - in_cluster).min(end - off);
            let whole = in_cluster == 0 && (n == geo.cluster_size() || off + n >= disk_end);
            if geo.extended_l2() {
                self.zero_ext(c, in_cluster, n, whole)?;
            } else if whole && self.header.version >= 3 {
                self.zero_cluster(c)?;
            } else if !self.known_zero(c)? {
                self.write_zeros(c, in_cluster, n)?;
            }
            off += n;
        }
        self.file.data_written_flag().store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Make a whole standard cluster a zero cluster (v3).
    fn zero_cluster(&mut self, c: GuestCluster) -> Result<()> {
        let e = self.lookup(c)?;
        let d = e.desc(&self.geo);
        let (entry, release) = match d {
            Desc::ZeroPlain => return Ok(()),
            Desc::ZeroAlloc { .. } if e.copied() => return Ok(()),
            Desc::Unallocated if self.backing.is_none() => return Ok(()),
            Desc::Normal { host } if e.copied() => (L2Entry::zero_at(host), false),
            _ => (L2Entry::ZERO, true),
        };
        self.prepare_l2(c)?;
        self.set_entry(c, entry)?;
        if release {
            self.release(d, false)?;
        }
        Ok(())
    }

    /// Zero `n` bytes at `in_cluster` of cluster `c` with extended L2 entries.
    fn zero_ext(&mut self, c: GuestCluster, in_cluster: u64, n: u64, whole: bool) -> Result<()> {
        let sub_size = self.geo.subcluster_size();
        let e = self.lookup(c)?;
        let d = e.desc(&self.geo);
        if whole {
            let (entry, release) = match d {
                Desc::Normal { .. } if e.copied() => (e.word, false),
                Desc::Unallocated => (0, false),
                _ => (0, true),
            };
            self.prepare_l2(c)?;
            self.set_entry(c, L2Entry::new(entry, 0xffff_ffffu64 << 32))?;
            if release {
                self.release(d, false)?;
            }
            return Ok(());
        }
        // Whole subclusters become zero; partial ones get explicit zeros.
        let first = in_cluster.div_ceil(sub_size);
        let last = (in_cluster + n) / sub_size;
        if matches!(d, Desc::Compressed { .. })
            || (matches!(d, Desc::Normal { .. }) && !e.copied())
            || first >= last
        {
            return self.write_zeros(c, in_cluster, n);
        }
        if in_cluster < first * sub_size {
            self.write_zeros(c, in_cluster, first * sub_size - in_cluster)?;
        }
        if in_cluster + n > last * sub_size {
            self.write_zeros(c, last * sub_size, in_cluster + n - last * sub_size)?;
        }
        let now = self.lookup(c)?;
        let mut mask = 0u64;
        for s in first..last {
            mask |= 1u64 << s;
        }
        self.prepare_l2(c)?;
        self.set_entry(c, now.with_bitmap((now.bitmap & !mask) | (mask << 32)))
    }

    /// Discard the whole clusters of `[offset, offset+len)` (a partial cluster that ends at
    /// `disk_end` counts as whole).
    pub(crate) fn discard_inner(
        &mut self,
        offset: GuestOffset,
        len: u64,
        disk_end: GuestOffset,
    ) -> Result<()> {
        let end = offset + len;
        let first = self.geo.guest_cluster_ceil(offset);
        let last = if end >= disk_end {
            self.geo.guest_cluster_ceil(disk_end)
        } else {
            self.geo.guest_cluster(end)
        };
        for i in 0..last.get().saturating_sub(first.get()) {
            self.discard_cluster(first + i, self.backing.is_some())?;
        }
        Ok(())
    }

    /// Free guest cluster `c`; with `keep_zero` (v3) it becomes a zero cluster instead of
    /// unallocated (the backing file must not show through).
    pub(crate) fn discard_cluster(&mut self, c: GuestCluster, keep_zero: bool) -> Result<()> {
        let e = self.lookup(c)?;
        let d = e.desc(&self.geo);
        let v3 = self.header.version >= 3;
        let entry = if keep_zero && v3 {
            if self.geo.extended_l2() {
                L2Entry::ALL_ZERO_SUBCLUSTERS
            } else {
                L2Entry::ZERO
            }
        } else {
            L2Entry::EMPTY
        };
        if e == entry {
            return Ok(());
        }
        if d == Desc::Unallocated && e.is_empty() && !(keep_zero && v3) {
            return Ok(());
        }
        self.prepare_l2(c)?;
        self.set_entry(c, entry)?;
        self.release(d, true)
    }

    /// Write one compressed cluster `comp` (the compressed form of `data`) to guest cluster
    /// `c`. Clusters that did not compress (`None`) and targets that are allocated are written
    /// normally.
    pub(crate) fn write_compressed_inner(
        &mut self,
        c: GuestCluster,
        data: &[u8],
        comp: Option<Vec<u8>>,
    ) -> Result<()> {
        let e = self.lookup(c)?;
        let d = e.desc(&self.geo);
        let comp = match comp {
            // Encrypted images are never compressed (QEMU refuses it too).
            Some(comp)
                if self.crypto.is_none() && matches!(d, Desc::Unallocated | Desc::ZeroPlain) =>
            {
                comp
            }
            _ => return self.write_inner(data, self.geo.guest_offset(c)),
        };
        self.prepare_l2(c)?;
        let len = comp.len() as u64;
        let off = self.alloc_compressed(len)?;
        self.file.write_data(&comp, off)?;
        self.compressed_written(off + len);
        let entry = L2Entry::compressed(&self.geo, off, len);
        // Compressed data must always be stable first: a torn stream does not decompress.
        self.link(c, entry, !mutant("compressed-barrier"))?;
        self.file.data_written_flag().store(true, Ordering::SeqCst);
        self.release(d, false)
    }
}
