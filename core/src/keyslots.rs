//! LUKS key slots: adding and removing passwords, as `qemu-img amend -o encrypt.*` does.
//!
//! Crash analysis. A slot is used only when its 4-byte state field says "active", and that
//! field never straddles a sector, so its write is atomic. Adding: the new slot's key
//! material and its header entry (salt, iterations, still marked inactive) are written and
//! made stable, then the state field is switched to active and made stable. A crash before
//! the switch leaves the old passwords (the new material is unreferenced); after it, the new
//! set. Removing: the state field is switched to inactive and made stable first (a crash
//! leaves the old set or the new one), and only then are the slot's material and entry wiped.
//! The last active slot is never removed unless forced: without it no password opens the
//! image. Overwriting an active slot (forced) derives the new key first, deactivates the slot,
//! then proceeds as adding; it is refused for the only active slot (a power cut between the two
//! would leave no password), and a power cut in it leaves the other passwords working.
//! Mutants: `keyslot-order` (the switch before the material is stable), `keyslot-wipe-order`
//! (material wiped while the slot is still active); the crash simulator's `key_slots` workload
//! kills both. After a failed change the header is read back from the file, so that a slot a
//! failed barrier left active on disk is not taken as free.

use std::sync::Arc;

use crate::crypto::luks::{self, SLOTS};
use crate::crypto::{Crypto, LuksArea, Password};
use crate::error::{Error, Result};
use crate::mutants::active as mutant;
use crate::state::State;

/// Whether `qemu-img amend` adds or removes passwords (`encrypt.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySlotState {
    /// Add `new_secret` to a slot.
    Active,
    /// Erase the slot `keyslot`, or every slot that `old_secret` opens.
    Inactive,
}

/// A key-slot change, with `qemu-img amend`'s `encrypt.*` options.
#[derive(Debug, Clone)]
pub struct KeySlotChange {
    /// `encrypt.state`.
    pub state: KeySlotState,
    /// `encrypt.keyslot`: the slot to fill (default: the first free one) or to erase.
    pub keyslot: Option<usize>,
    /// `encrypt.new-secret`: the password to add.
    pub new_secret: Option<Password>,
    /// `encrypt.old-secret`: erase every slot this password opens.
    pub old_secret: Option<Password>,
    /// `encrypt.iter-time` for the new slot, in milliseconds (default 2000).
    pub iter_time_ms: Option<u64>,
    /// Allow overwriting an active slot, and erasing the last one.
    pub force: bool,
}

impl KeySlotChange {
    /// Add `password` to the first free slot.
    pub fn add(password: impl Into<Password>) -> KeySlotChange {
        KeySlotChange {
            state: KeySlotState::Active,
            keyslot: None,
            new_secret: Some(password.into()),
            old_secret: None,
            iter_time_ms: None,
            force: false,
        }
    }
    /// Erase slot `slot`.
    pub fn remove_slot(slot: usize) -> KeySlotChange {
        KeySlotChange {
            state: KeySlotState::Inactive,
            keyslot: Some(slot),
            new_secret: None,
            old_secret: None,
            iter_time_ms: None,
            force: false,
        }
    }
    /// Erase every slot that `password` opens.
    pub fn remove_password(password: impl Into<Password>) -> KeySlotChange {
        KeySlotChange {
            state: KeySlotState::Inactive,
            keyslot: None,
            new_secret: None,
            old_secret: Some(password.into()),
            iter_time_ms: None,
            force: false,
        }
    }
}

/// Byte offset of slot `i`'s entry in the LUKS header, and of its state field.
fn slot_entry(i: usize) -> u64 {
    208 + i as u64 * 48
}

impl State {
    fn luks_area(&self) -> Result<(Arc<Crypto>, LuksArea)> {
        let c = self.crypto.clone().ok_or_else(|| {
            Error::invalid(format!("{}: the image is not encrypted", self.name()))
        })?;
        let area = c.luks.clone().ok_or_else(|| {
            Error::invalid(format!(
                "{}: key slots are a LUKS feature; legacy AES images have none",
                self.name()
            ))
        })?;
        Ok((c, area))
    }

    pub(crate) fn change_key_slots(&mut self, change: &KeySlotChange) -> Result<Vec<usize>> {
        let name = self.name().to_string();
        let (crypto, mut area) = self.luks_area()?;
        let mk = luks::Secret::new(
            crypto
                .master_key()
                .ok_or_else(|| Error::NeedKey { file: name.clone() })?
                .to_vec(),
        );
        if let Some(k) = change.keyslot {
            if k >= SLOTS {
                return Err(Error::invalid(format!(
                    "{name}: Invalid keyslot {k} specified, must be between 0 and {}",
                    SLOTS - 1
                )));
            }
        }
        let active: Vec<usize> = (0..SLOTS)
            .filter(|&i| area.header.slots[i].active)
            .collect();
        match change.state {
            KeySlotState::Active => {
                let new = change.new_secret.as_ref().ok_or_else(|| {
                    Error::invalid(format!(
                        "{name}: 'new-secret' is required to activate a keyslot"
                    ))
                })?;
                let slot = match change.keyslot {
                    Some(k) => {
                        if area.header.slots[k].active && !change.force {
                            return Err(Error::invalid(format!(
                                "{name}: Refusing to overwrite active keyslot {k} - please erase it first"
                            )));
                        }
                        k
                    }
                    None => (0..SLOTS)
                        .find(|&i| !area.header.slots[i].active)
                        .ok_or_else(|| {
                            Error::invalid(format!(
                                "{name}: Can't add a keyslot - all keyslots are in use"
                            ))
                        })?,
                };
                let overwrite = area.header.slots[slot].active;
                if overwrite && active.len() == 1 {
                    // Between erasing it and storing the new key no password would open the
                    // image: a power cut there would lose it for good.
                    return Err(Error::invalid(format!(
                        "{name}: Refusing to overwrite the only active keyslot {slot}: add the new password to a free keyslot, then erase keyslot {slot}"
                    )));
                }
                // Everything that can fail without touching the disk first (PBKDF2, the
                // splitter, random bytes).
                let material = area
                    .header
                    .set_slot(
                        slot,
                        new.as_bytes(),
                        &mk,
                        change.iter_time_ms.unwrap_or(2000),
                    )
                    .map_err(|e| Error::invalid(format!("{name}: {e}")))?;
                if overwrite {
                    // Forced overwrite: the slot goes out of use first (the other active slots
                    // keep working meanwhile).
                    area.header.slots[slot].active = false;
                    self.write_slot_state(&area, slot)?;
                }
                // Material and entry first, still inactive; then the switch.
                let (at, _) = area.header.material_range(slot);
                self.file
                    .write_meta(&material, area.offset + at, "LUKS key material")?;
                area.header.slots[slot].active = false;
                self.write_slot_entry(&area, slot)?;
                if !mutant("keyslot-order") {
                    self.file.sync_always("LUKS key material")?;
                }
                area.header.slots[slot].active = true;
                self.write_slot_state(&area, slot)?;
                self.set_luks_area(area, mk);
                Ok(vec![slot])
            }
            KeySlotState::Inactive => {
                let targets: Vec<usize> = match (change.keyslot, &change.old_secret) {
                    (Some(k), _) => {
                        if !area.header.slots[k].active {
                            return Err(Error::invalid(format!(
                                "{name}: Given keyslot {k} is already erased (inactive)"
                            )));
                        }
                        vec![k]
                    }
                    (None, Some(old)) => {
                        let mut t = Vec::new();
                        for &i in &active {
                            if self.slot_opens(&area, i, old.as_bytes())? {
                                t.push(i);
                            }
                        }
                        if t.is_empty() {
                            return Err(Error::invalid(format!(
                                "{name}: Didn't erase a keyslot, because no keyslots match the given password"
                            )));
                        }
                        t
                    }
                    (None, None) => {
                        return Err(Error::invalid(format!(
                            "{name}: 'keyslot' or 'old-secret' is required to erase keyslots"
                        )))
                    }
                };
                if targets.len() == active.len() && !change.force {
                    return Err(Error::invalid(if change.keyslot.is_some() {
                        format!("{name}: Attempt to erase the only active keyslot {} which will erase all the data in the image irreversibly - refusing operation", targets[0])
                    } else {
                        format!("{name}: All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation")
                    }));
                }
                if !mutant("keyslot-wipe-order") {
                    for &i in &targets {
                        area.header.slots[i].active = false;
                        self.write_slot_state(&area, i)?;
                    }
                }
                // Out of use everywhere: now wipe material and entries.
                for &i in &targets {
                    let (at, n) = area.header.material_range(i);
                    let mut junk = vec![0u8; n];
                    getrandom::getrandom(&mut junk).map_err(|e| {
                        Error::invalid(format!("{name}: cannot get random bytes: {e}"))
                    })?;
                    self.file
                        .write_meta(&junk, area.offset + at, "LUKS key material")?;
                    area.header.clear_slot(i);
                    self.write_slot_entry(&area, i)?;
                }
                self.file.sync_always("LUKS key slot")?;
                self.set_luks_area(area, mk);
                Ok(targets)
            }
        }
    }

    /// Read the LUKS header back from the file (after a failed change).
    pub(crate) fn reload_luks_header(&mut self) -> Result<()> {
        let (crypto, area) = self.luks_area()?;
        let mut b = vec![0u8; luks::HEADER_LEN];
        self.file.read(&mut b, area.offset, "LUKS header")?;
        let header = luks::Header::parse(&b, area.len).map_err(|e| match e {
            luks::HeaderError::Corrupt(w) | luks::HeaderError::Unsupported(w) => {
                Error::corrupt(self.name(), w, area.offset.get())
            }
        })?;
        if let Some(mk) = crypto.master_key() {
            let mk = luks::Secret::new(mk.to_vec());
            self.set_luks_area(LuksArea { header, ..area }, mk);
        }
        Ok(())
    }

    /// Whether `password` opens slot `i`.
    fn slot_opens(&self, area: &LuksArea, i: usize, password: &[u8]) -> Result<bool> {
        let (at, n) = area.header.material_range(i);
        let mut material = luks::Secret::new(vec![0u8; n]);
        self.file
            .read(&mut material, area.offset + at, "LUKS key material")?;
        Ok(area.header.try_slot(i, password, &material).is_some())
    }

    /// Write slot `i`'s whole 48-byte entry (its state as in `area`).
    fn write_slot_entry(&mut self, area: &LuksArea, i: usize) -> Result<()> {
        let b = area.header.serialize();
        let at = slot_entry(i) as usize;
        self.file
            .write_meta(&b[at..at + 48], area.offset + at as u64, "LUKS key slot")
    }

    /// Write slot `i`'s 4-byte state field and make it stable (the switch).
    fn write_slot_state(&mut self, area: &LuksArea, i: usize) -> Result<()> {
        let b = area.header.serialize();
        let at = slot_entry(i) as usize;
        self.file.write_meta(
            &b[at..at + 4],
            area.offset + at as u64,
            "LUKS key slot state",
        )?;
        self.file.sync_always("LUKS key slot state")
    }

    fn set_luks_area(&mut self, area: LuksArea, mk: luks::Secret) {
        self.crypto = Some(Arc::new(Crypto::luks(area, Some(mk))));
    }
}
