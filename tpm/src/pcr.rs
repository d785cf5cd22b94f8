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
        let mut values = DigestValues::new();
        values.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(digest.to_vec()).map_err(tpm_op("build the digest"))?,
        );
        self.ctx
            .execute_with_nullauth_session(|c| c.pcr_extend(PcrHandle::Pcr11, values))
            .map_err(tpm_op("extend PCR 11"))?;
        Ok(digest)
    }

    /// PCR 11 of the SHA-256 bank.
    pub fn read_pcr11(&mut self) -> Result<[u8; 32], Error> {
        let selection = PcrSelectionListBuilder::new()
            .with_selection(HashingAlgorithm::Sha256, &[PcrSlot::Slot11])
            .build()
            .map_err(tpm_op("build the PCR selection"))?;
        let (_, _, values) = self
            .ctx
            .pcr_read(selection)
            .map_err(tpm_op("read PCR 11"))?;
        let value = values.value().first().ok_or_else(|| Error::Input {
            what: "PCR 11",
            why: "the TPM returned no SHA-256 bank value (is the bank allocated?)".into(),
        })?;
        value.value().try_into().map_err(|_| Error::Input {
            what: "PCR 11",
            why: format!("a SHA-256 value of {} bytes", value.value().len()),
        })
    }
}
