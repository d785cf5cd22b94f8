//! The appliance's TPM, behind one owner (`Tpm`): the boot phases extended into PCR 11 the
//! way systemd-pcrphase does, and the data partition's key sealed to a signed PCR policy
//! (PolicyAuthorize), so that any UKI signed with the same key unlocks it and nothing
//! else does. `policy` computes the digests without a TPM; `seal` and `unseal` are the
//! two halves of the TPM dance, each readable as the policy it builds or satisfies.

mod error;
pub mod eventlog;
pub mod pcr;
pub mod policy;
pub mod seal;
mod tpm;
pub mod unseal;

pub use error::Error;
pub use seal::Sealed;
pub use tpm::{Tpm, DEVICE};
