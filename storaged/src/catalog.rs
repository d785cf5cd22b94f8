//! The catalog of volumes, kept with the pool in two alternating slots of the catalog
//! area so that a crash while writing one leaves the other intact.
//!
//! A record: magic "EDGECATL" (8), the pool uuid (16), generation u64, payload length
//! u32, crc32c u32 over everything before it and the payload, then the payload (JSON).
//! Generation n goes to slot n % 2; on open the valid record with the highest
//! generation wins. A record of another pool (stale uuid) is not valid.

use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 8] = b"EDGECATL";
const HEADER: usize = 40;

/// Where a volume is in its life: the steps of create and delete that span a
/// device-mapper message are recorded first, so a restart can finish or undo them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// The thin device may or may not exist in the pool: undone at open.
    Creating,
    Ready,
    /// The thin device may or may not be gone: the delete is finished at open.
    Deleting,
}

/// What a thin device is to its users: a volume to stage and publish, or a snapshot that
/// only serves as the source of new volumes (CSI keeps the two apart).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    #[default]
    Volume,
    Snapshot,
}

impl Kind {
    fn is_volume(&self) -> bool {
        *self == Kind::Volume
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub name: String,
    pub thin_id: u32,
    pub size_bytes: u64,
    /// The volume this one was snapshotted from, if any (informational: thin snapshots
    /// do not depend on their origin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    pub state: State,
    /// Absent in records written before snapshots were told apart: those were volumes.
    #[serde(default, skip_serializing_if = "Kind::is_volume")]
    pub kind: Kind,
    /// Seconds since the epoch when it was created (0: not recorded).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub created: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    /// Thin device ids are never reused, so a half-finished delete cannot hit a new
    /// volume.
    pub next_thin_id: u32,
    pub volumes: Vec<Volume>,
}

impl Catalog {
    pub fn get(&self, name: &str) -> Option<&Volume> {
        self.volumes.iter().find(|v| v.name == name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Volume> {
        self.volumes.iter_mut().find(|v| v.name == name)
    }

    /// Bytes promised to volumes (what the overcommit limit bounds).
    pub fn provisioned_bytes(&self) -> u64 {
        self.volumes.iter().map(|v| v.size_bytes).sum()
    }
}

/// Encodes generation `generation` of `catalog`; `None` if it does not fit a slot.
pub fn encode(
    uuid: &[u8; 16],
    generation: u64,
    catalog: &Catalog,
    slot_bytes: u64,
) -> Option<Vec<u8>> {
    let payload = serde_json::to_vec(catalog).ok()?;
    let len = HEADER + payload.len();
    if len as u64 > slot_bytes {
        return None;
    }
    // Whole 4 KiB blocks, so the write never shares a block with anything else.
    let mut b = vec![0u8; len.div_ceil(4096) * 4096];
    b[0..8].copy_from_slice(MAGIC);
    b[8..24].copy_from_slice(uuid);
    b[24..32].copy_from_slice(&generation.to_le_bytes());
    b[32..36].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    b[HEADER..len].copy_from_slice(&payload);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..36]), &payload);
    b[36..40].copy_from_slice(&crc.to_le_bytes());
    Some(b)
}

/// Decodes one slot: `None` unless it holds a whole, untorn record of this pool.
pub fn decode(uuid: &[u8; 16], slot: &[u8]) -> Option<(u64, Catalog)> {
    if slot.len() < HEADER || &slot[0..8] != MAGIC || &slot[8..24] != uuid {
        return None;
    }
    let generation = u64::from_le_bytes(slot[24..32].try_into().ok()?);
    let len = u32::from_le_bytes(slot[32..36].try_into().ok()?) as usize;
    let stored = u32::from_le_bytes(slot[36..40].try_into().ok()?);
    let payload = slot.get(HEADER..HEADER + len)?;
    if crc32c::crc32c_append(crc32c::crc32c(&slot[..36]), payload) != stored {
        return None;
    }
    Some((generation, serde_json::from_slice(payload).ok()?))
}

/// The newer of the two slots' valid records.
pub fn newest(uuid: &[u8; 16], slots: [&[u8]; 2]) -> Option<(u64, Catalog)> {
    slots
        .into_iter()
        .filter_map(|s| decode(uuid, s))
        .max_by_key(|(g, _)| *g)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Catalog {
        Catalog {
            next_thin_id: 3,
            volumes: vec![Volume {
                name: "db".into(),
                thin_id: 1,
                size_bytes: 1 << 30,
                origin: None,
                state: State::Ready,
                kind: Kind::Volume,
                created: 0,
            }],
        }
    }

    #[test]
    fn newer_valid_record_wins() {
        let uuid = [9; 16];
        let old = encode(&uuid, 4, &Catalog::default(), 1 << 20).unwrap();
        let new = encode(&uuid, 5, &sample(), 1 << 20).unwrap();
        assert_eq!(newest(&uuid, [&old, &new]).unwrap(), (5, sample()));
        assert_eq!(newest(&uuid, [&new, &old]).unwrap().0, 5);
    }

    #[test]
    fn torn_record_falls_back_to_the_other_slot() {
        let uuid = [9; 16];
        let old = encode(&uuid, 4, &Catalog::default(), 1 << 20).unwrap();
        let mut torn = encode(&uuid, 5, &sample(), 1 << 20).unwrap();
        torn[50] ^= 0xff;
        assert_eq!(
            newest(&uuid, [&old, &torn]).unwrap(),
            (4, Catalog::default())
        );
    }

    #[test]
    fn record_of_another_pool_is_ignored() {
        let rec = encode(&[1; 16], 7, &sample(), 1 << 20).unwrap();
        assert!(newest(&[2; 16], [&rec, &[0u8; 4096][..]]).is_none());
    }

    #[test]
    fn records_without_kind_are_volumes() {
        let old = r#"{"next_thin_id":3,"volumes":[{"name":"db","thin_id":1,"size_bytes":1073741824,"state":"ready"}]}"#;
        let c: Catalog = serde_json::from_str(old).unwrap();
        assert_eq!(c, sample());
        assert_eq!(serde_json::to_string(&sample()).unwrap(), old);
    }

    #[test]
    fn record_larger_than_a_slot_is_refused() {
        assert!(encode(&[0; 16], 1, &sample(), 64).is_none());
    }
}
