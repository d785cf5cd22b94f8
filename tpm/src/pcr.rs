//! PCR 11 across the boot: the phase words systemd-pcrphase extends (so our values are
//! the ones the UAPI tools predict and `systemd-measure` signs), and reading it back.

use sha2::Digest as _;
use tss_esapi::handles::PcrHandle;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::structures::{Digest, DigestValues, PcrSelectionListBuilder, PcrSlot};

use crate::error::{tpm_op, Error};
use crate::Tpm;

pub use crate::policy::{PHASES, UNSEAL_PHASE};

impl Tpm {
    /// Extends PCR 11's SHA-256 bank with SHA-256(`word`), as systemd-pcrphase does;
    /// returns the digest extended.
    pub fn extend_phase(&mut self, word: &str) -> Result<[u8; 32], Error> {
        let digest: [u8; 32] = sha2::Sha256::digest(word.as_bytes()).into();
        self.extend(crate::policy::PCR_UKI, &digest)?;
        Ok(digest)
    }

    /// Extends `pcr`'s SHA-256 bank with `digest`.
    pub fn extend(&mut self, pcr: u32, digest: &[u8; 32]) -> Result<(), Error> {
        let handle = PcrHandle::try_from(pcr).map_err(|_| Error::Input {
            what: "the PCR to extend",
            why: format!("PCR {pcr} does not exist (0 to 23)"),
        })?;
        let mut values = DigestValues::new();
        values.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(digest.to_vec()).map_err(tpm_op("build the digest"))?,
        );
        self.ctx
            .execute_with_nullauth_session(|c| c.pcr_extend(handle, values))
            .map_err(tpm_op("extend a PCR"))
    }

    /// PCR 11 of the SHA-256 bank.
    pub fn read_pcr11(&mut self) -> Result<[u8; 32], Error> {
        self.read_pcr(crate::policy::PCR_UKI)
    }

    /// One PCR of the SHA-256 bank.
    pub fn read_pcr(&mut self, pcr: u32) -> Result<[u8; 32], Error> {
        let what = "a PCR";
        let slot =
            PcrSlot::try_from(1u32.checked_shl(pcr).unwrap_or(0)).map_err(|_| Error::Input {
                what,
                why: format!("PCR {pcr} does not exist (0 to 23)"),
            })?;
        let selection = PcrSelectionListBuilder::new()
            .with_selection(HashingAlgorithm::Sha256, &[slot])
            .build()
            .map_err(tpm_op("build the PCR selection"))?;
        let (_, _, values) = self.ctx.pcr_read(selection).map_err(tpm_op("read a PCR"))?;
        let value = values.value().first().ok_or_else(|| Error::Input {
            what,
            why: format!(
                "the TPM returned no SHA-256 value for PCR {pcr} (is the bank allocated?)"
            ),
        })?;
        value.value().try_into().map_err(|_| Error::Input {
            what,
            why: format!("a SHA-256 value of {} bytes", value.value().len()),
        })
    }
}
