//! The appliance's TPM, behind one owner (`Tpm`): the boot phases extended into PCR 11 the
//! way systemd-pcrphase does, and the data partition's key sealed to a signed PCR policy
//! (PolicyAuthorize), so that any UKI signed with the same key unlocks it and nothing
//! else does. `policy` computes the digests without a TPM; `seal` and `unseal` are the
//! two halves of the TPM dance, each readable as the policy it builds or satisfies.

#[cfg(feature = "tpm")]
pub mod counter;
pub mod ek_certificate;
pub mod enrollment;
mod error;
pub mod eventlog;
pub mod evidence;
#[cfg(feature = "tpm")]
pub mod identity;
#[cfg(feature = "tpm")]
pub mod pcr;
pub mod policy;
pub mod program;
pub mod replay;
#[cfg(feature = "tpm")]
pub mod seal;
#[cfg(feature = "tpm")]
mod tpm;
#[cfg(feature = "tpm")]
pub mod unseal;

pub use error::Error;
pub use evidence::Endorsement;
#[cfg(feature = "tpm")]
pub use identity::AttestationKey;
#[cfg(feature = "tpm")]
pub use seal::Sealed;
#[cfg(feature = "tpm")]
pub use tpm::{Tpm, DEVICE};
