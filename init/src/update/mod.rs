//! Over-the-air updates on the box (docs/update.md): installing a bundle into the
//! inactive slot, trying it once, and blessing it or falling back. The slot logic lives
//! here and nowhere else; fabricd only downloads bundles (its downlink, kind `updates`)
//! into [`crate::config::Update::bundles`].
//!
//! The order keeps a bootable default at every moment: the inactive slot's boot entries
//! go first (so nothing boots a half-written slot), then its root and verity partitions
//! are written from a bundle that passed every check (and are hashed again as they are
//! copied), then its UKI lands under a temporary name and is renamed to
//! `edgeos-<version>-<slot>+<tries>.efi`. The running slot is never written. systemd-boot
//! sorts the new, newer entry first while it has tries; the trial boot is blessed once
//! every service is ready within the health limit, or it reboots, and with no tries left
//! the old slot's entry comes first again. What happened is kept in [`STATE`] on the data
//! partition, which fabricd reports to the core.

mod below_floor;
mod floor;
mod install;
mod slots;
mod state;
#[cfg(test)]
mod tests;
mod trial;
mod updater;

pub use slots::Running;
pub use trial::Health;
pub use updater::{unix_ms, Updater};

/// The security version the running release's signed command line carries.
pub fn security_version_of(extra: &std::collections::BTreeMap<String, String>) -> u64 {
    below_floor::of_cmdline(extra)
}

/// Whether this boot's release is below the box's security floor, and if so why and
/// whether to reboot into the other slot (its entry is marked bad first).
pub fn refuse_below_floor(running: &Running) -> Option<(String, bool)> {
    below_floor::refuse(running, &state::State::load(std::path::Path::new(STATE)))
}

/// The image's name: the UKIs are `<NAME>-<version>-<slot>...efi`.
pub const NAME: &str = "edgeos";
/// The update key's public half, from the image (64 hex digits, Ed25519).
pub const UPDATE_KEY: &str = "/etc/edge/update-ed25519.pub";
/// What the box knows about updates, on the data partition.
pub const STATE: &str = "/var/lib/edge/update/state.json";
