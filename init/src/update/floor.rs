//! Anti-rollback: the security floor (kept in the TPM's NV counter as well as the state)
//! and what a bundle must be to be admitted at all.

use super::slots::Running;
use super::state::State;
use super::NAME;
use crate::error::{Error, Result};

/// The floor kept by both the state (`state_floor`) and the TPM's counter (`counter`
/// less `base`): the higher of the two, and what to raise the counter to when it is
/// behind.
pub fn floor_with_counter(state_floor: u64, base: u64, counter: u64) -> (u64, Option<u64>) {
    let in_tpm = counter.saturating_sub(base);
    let floor = state_floor.max(in_tpm);
    (floor, (in_tpm < floor).then(|| base.saturating_add(floor)))
}

/// Brings the state's security floor and the TPM's security counter (tpm/src/counter.rs)
/// to the higher of the two, counting the TPM's up, defining it on first use. Returns the
/// counter's value. The state is the caller's to save. Runs edge-tpm: PID 1's thread
/// only (its loop reaps every child, so another thread's wait would find none).
pub(super) fn keep_floor_in_tpm(state: &mut State) -> Result<u64> {
    let counter = match crate::sealed_data::security_counter(None)? {
        Some(c) => c,
        None => {
            let first = crate::sealed_data::security_counter(Some(0))?.ok_or_else(|| {
                Error::edge_tpm("counted the security counter up and printed no value")
            })?;
            state.tpm_counter_base = Some(first.saturating_sub(1));
            first
        }
    };
    let base = state.tpm_counter_base.unwrap_or(0);
    let (floor, raise) = floor_with_counter(state.security_floor, base, counter);
    state.security_floor = floor;
    match raise {
        Some(to) => crate::sealed_data::security_counter(Some(to))?
            .ok_or_else(|| Error::edge_tpm("raised the security counter and printed no value")),
        None => Ok(counter),
    }
}

/// Compares versions part by part on `.`, `-` and `+`, numerically where both parts are
/// numbers (`0.10.0` is newer than `0.9.1`).
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (pa, pb): (Vec<&str>, Vec<&str>) = (
        a.split(['.', '-', '+']).collect(),
        b.split(['.', '-', '+']).collect(),
    );
    for (x, y) in pa.iter().zip(&pb) {
        let o = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => x.cmp(y),
        };
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    pa.len().cmp(&pb.len())
}

/// The checks made on the signed manifest alone, before the rest of the bundle is read:
/// the product, the version against the running one, the security version against the
/// floor. `Ok(false)`: the bundle is the running version (nothing to do).
pub fn admit(m: &edge_update::Manifest, running: &Running, floor: u64) -> Result<bool> {
    let refused = |detail: String| Err(Error::Bundle { detail });
    if m.name != NAME {
        return refused(format!("it updates {:?}, and this box runs {NAME}", m.name));
    }
    if m.security_version < floor {
        return refused(format!(
            "its security version {} is below the lowest this box accepts ({floor})",
            m.security_version
        ));
    }
    match version_cmp(&m.version, &running.version) {
        std::cmp::Ordering::Equal => Ok(false),
        std::cmp::Ordering::Less => refused(format!(
            "version {} is older than the running {}",
            m.version, running.version
        )),
        std::cmp::Ordering::Greater => Ok(true),
    }
}
