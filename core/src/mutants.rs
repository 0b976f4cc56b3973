//! Ordering mutants, for proving that the crash simulator can fail (feature `testing` only).
//!
//! Each mutant breaks exactly one ordering rule or barrier of the engine. With the feature
//! `testing` enabled, `QCOW2RS_MUTANT=<name>` switches one on for the whole process; without the
//! feature (every release build) [`active`] is a constant `false` and the code is compiled out.
//! `scripts/mutants.sh` runs the crash simulator once per mutant and requires each to be caught.
//!
//! Not in the catalogue, because it is equivalent today: dropping the barrier after the dirty
//! bit is set (lazy refcounts). Every lazy-mode write that can make a table name a cluster whose
//! refcount is not stable is already preceded by another barrier issued after the dirty bit was
//! written: a new L2 table by the flush's first barrier, an allocation into an existing table by
//! the data or file-length barrier (a never-written cluster always comes from a run that extended
//! the file in this session), a grown L1 table by the barrier before the header switch. The
//! engine keeps the barrier (it costs one fdatasync per session) so that this stays true when a
//! path is added.
//!
//! Also equivalent today: dropping only the safety net that issues pending punches before a
//! free cluster's refcount rises (`store_refcount`): every loop that frees clusters issues its
//! punches when it ends, before anything can allocate. `punch-late` drops the net and delays
//! each batch to the next loop's end, which is what a forgotten issue would do.

/// The catalogue: (name, the rule it breaks).
#[cfg_attr(not(feature = "testing"), allow(dead_code))]
pub const ALL: &[(&str, &str)] = &[
    (
        "l2-refcount-dep",
        "an L2 entry naming a new cluster is written without waiting for its refcount increase",
    ),
    (
        "data-barrier",
        "an L2 entry naming newly written data is written without waiting for the data",
    ),
    (
        "len-pending",
        "an L2 entry naming a cluster past the stable file length ignores the pending set_len",
    ),
    (
        "virgin-check",
        "every new cluster is taken as never written (no zero copy-on-write, no data barrier)",
    ),
    (
        "deferred-frees",
        "a refcount is dropped at once instead of after the pointer removal is stable",
    ),
    (
        "dirty-bit",
        "lazy refcounts: the dirty bit is set only when a new L2 table is created",
    ),
    (
        "unlinked-flag",
        "a new L2 table stays flagged unlinked after its L1 entry was written",
    ),
    (
        "comp-pos",
        "compressed packing continues in a host cluster after it was freed",
    ),
    (
        "comp-cache",
        "the decompressed-cluster cache is not invalidated when its cluster is freed",
    ),
    (
        "pre-barrier",
        "a flush writes L1/L2 entries without the barrier after new tables and refcounts",
    ),
    (
        "refblock-barrier",
        "a new refcount block is named in the refcount table before it is stable",
    ),
    (
        "reftable-barrier",
        "the header is switched to a grown refcount table before the table is stable",
    ),
    (
        "l1-grow-barrier",
        "the header is switched to a grown L1 table before the table is stable",
    ),
    (
        "zero-alloc-barrier",
        "a write into an allocated zero cluster clears the zero flag before the data is stable",
    ),
    (
        "compressed-barrier",
        "a compressed cluster's L2 entry is written before the compressed data is stable",
    ),
    (
        "failed-flush",
        "after a failed fdatasync the image carries on as if a later flush covered the writes",
    ),
    (
        "resize-zero-order",
        "growing over a larger backing file makes the new size stable before the zeroing",
    ),
    (
        "crypt-virgin",
        "encrypted images take the never-written shortcut (partial clusters, no data barrier)",
    ),
    (
        "reserve-iv",
        "an allocating encrypted write encrypts, outside the lock, for the wrong host offset",
    ),
    (
        "par-early-link",
        "an allocating write links its new cluster before its unlocked data write has run",
    ),
    (
        "par-stale-link",
        "an allocating write links its new cluster although the entry changed while it wrote",
    ),
    (
        "keyslot-order",
        "a new LUKS key slot is switched active before its key material is stable",
    ),
    (
        "keyslot-wipe-order",
        "an erased LUKS key slot's material is wiped before the slot is out of use",
    ),
    (
        "snap-copied-first",
        "snapshot creation raises refcounts without waiting for the cleared COPIED flags",
    ),
    (
        "snap-table-barrier",
        "the header is switched to a new snapshot table before the table and its refcounts are stable",
    ),
    (
        "snap-apply-barrier",
        "applying a snapshot switches the active L1 before the new table and its refcounts are stable",
    ),
    (
        "snap-copied-last",
        "deleting a snapshot sets COPIED flags before the lowered refcounts are stable",
    ),
    (
        "repair-copied-order",
        "check -r sets a missing COPIED flag without waiting for the lowered refcount it relies on",
    ),
    (
        "punch-late",
        "freed clusters are punched out with the next batch of frees, after they may be reused",
    ),
];

/// Whether mutant `name` is switched on (`QCOW2RS_MUTANT=name`).
#[cfg(feature = "testing")]
pub fn active(name: &str) -> bool {
    use std::sync::OnceLock;
    static ON: OnceLock<Option<String>> = OnceLock::new();
    let on = ON.get_or_init(|| {
        let v = std::env::var("QCOW2RS_MUTANT")
            .ok()
            .filter(|v| !v.is_empty())?;
        assert!(
            ALL.iter().any(|(n, _)| *n == v),
            "QCOW2RS_MUTANT={v}: no such mutant (see qcow2rs::mutants::ALL)"
        );
        Some(v)
    });
    // Names are checked while a mutant is on (scripts/mutants.sh): a misspelt call site would
    // leave its mutant never active, and the catalogue reports it surviving. Not checked on every
    // call otherwise: this runs on every metadata write, also under the fuzzer.
    if on.is_some() {
        debug_assert!(ALL.iter().any(|(n, _)| *n == name), "unknown mutant {name}");
    }
    on.as_deref() == Some(name)
}

/// Whether mutant `name` is switched on: never, without the feature `testing`.
#[cfg(not(feature = "testing"))]
#[inline(always)]
pub fn active(_name: &str) -> bool {
    false
}
