//! The security counter: one NV counter index (TPM_NT_COUNTER) that only ever counts up.
//! init keeps the box's lowest accepted security version on it (init/src/update/floor.rs), so
//! that restoring an old copy of the disk, or wiping the data partition, cannot lower
//! it. No command of the TPM lowers a counter; deleting the index and defining it again
//! (which takes the owner's authorization) starts it at the highest value any counter
//! of this TPM ever had, not at zero.

use tss_esapi::attributes::NvIndexAttributesBuilder;
use tss_esapi::constants::{CapabilityType, NvIndexType, Tss2ResponseCodeKind};
use tss_esapi::handles::{NvIndexHandle, NvIndexTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::resource_handles::{NvAuth, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{CapabilityData, NvPublicBuilder};

use crate::error::{tpm_op, Error};
use crate::Tpm;

/// Our index, in the range the TCG's handle registry leaves to the owner
/// (0x01800000-0x01BFFFFF).
pub const INDEX: u32 = 0x0180_ed00;

impl Tpm {
    /// The counter's value; `None` while the index is not defined or was never counted.
    pub fn security_counter(&mut self) -> Result<Option<u64>, Error> {
        let Some(handle) = self.counter_handle()? else {
            return Ok(None);
        };
        let read = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.nv_read(NvAuth::Owner, handle, 8, 0)
            });
        match read {
            Ok(bytes) => {
                let b: [u8; 8] = bytes.value().try_into().map_err(|_| Error::Input {
                    what: "the security counter",
                    why: format!("{} bytes were read, not 8", bytes.value().len()),
                })?;
                Ok(Some(u64::from_be_bytes(b)))
            }
            Err(e) if uninitialized(&e) => Ok(None),
            Err(e) => Err(tpm_op("read the security counter")(e)),
        }
    }

    /// Counts up until the counter is at least `to`, defining the index first if it is
    /// not; its first count sets it to one past the highest any counter of this TPM
    /// ever had (1 on a TPM that never had one). Returns the value it ends at.
    pub fn raise_security_counter(&mut self, to: u64) -> Result<u64, Error> {
        let handle = match self.counter_handle()? {
            Some(h) => h,
            None => self.define_counter()?,
        };
        loop {
            if let Some(now) = self.security_counter()? {
                if now >= to {
                    return Ok(now);
                }
            }
            self.ctx
                .execute_with_session(Some(AuthSession::Password), |c| {
                    c.nv_increment(NvAuth::Owner, handle)
                })
                .map_err(tpm_op("count the security counter up"))?;
        }
    }

    fn counter_handle(&mut self) -> Result<Option<NvIndexHandle>, Error> {
        let (data, _) = self
            .ctx
            .execute_without_session(|c| c.get_capability(CapabilityType::Handles, INDEX, 1))
            .map_err(tpm_op("list the NV indexes"))?;
        let defined = matches!(&data, CapabilityData::Handles(h)
            if h.iter().any(|h| matches!(h, TpmHandle::NvIndex(i) if u32::from(*i) == INDEX)));
        if !defined {
            return Ok(None);
        }
        let tpm_handle = TpmHandle::NvIndex(index()?);
        let object = self
            .ctx
            .execute_without_session(|c| c.tr_from_tpm_public(tpm_handle))
            .map_err(tpm_op("open the security counter"))?;
        Ok(Some(object.into()))
    }

    fn define_counter(&mut self) -> Result<NvIndexHandle, Error> {
        let attributes = NvIndexAttributesBuilder::new()
            .with_nv_index_type(NvIndexType::Counter)
            .with_owner_write(true)
            .with_owner_read(true)
            .build()
            .map_err(tpm_op("build the security counter's attributes"))?;
        let public = NvPublicBuilder::new()
            .with_nv_index(index()?)
            .with_index_name_algorithm(HashingAlgorithm::Sha256)
            .with_index_attributes(attributes)
            .with_data_area_size(8)
            .build()
            .map_err(tpm_op("build the security counter's template"))?;
        self.ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.nv_define_space(Provision::Owner, None, public)
            })
            .map_err(tpm_op(
                "define the security counter (with the owner's empty authorization)",
            ))
    }
}

fn index() -> Result<NvIndexTpmHandle, Error> {
    NvIndexTpmHandle::new(INDEX).map_err(tpm_op("name the security counter's index"))
}

fn uninitialized(e: &tss_esapi::Error) -> bool {
    matches!(e, tss_esapi::Error::Tss2Error(rc)
        if rc.kind() == Some(Tss2ResponseCodeKind::NvUninitialized))
}
