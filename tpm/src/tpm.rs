//! The one owner of the TPM context: opening it, the storage root key every sealed object
//! lives under, and the salted, encrypted sessions the secrets travel in. Nobody else
//! holds a handle.

use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::SessionType;
use tss_esapi::handles::KeyHandle;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    EccPoint, PublicBuilder, PublicEccParametersBuilder, SymmetricDefinition,
    SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::Context;

use crate::error::{tpm_op, Error};

/// The default TPM of the appliance: the kernel's resource manager.
pub const DEVICE: &str = "device:/dev/tpmrm0";

pub struct Tpm {
    pub(crate) ctx: Context,
    srk: Option<KeyHandle>,
}

impl Tpm {
    /// Opens the TPM named by a TCTI string (`device:/dev/tpmrm0`,
    /// `swtpm:host=127.0.0.1,port=2321`).
    pub fn open(tcti: &str) -> Result<Tpm, Error> {
        let no_tpm = |why: String| Error::NoTpm {
            tcti: tcti.to_owned(),
            why,
        };
        if let Some(path) = tcti.strip_prefix("device:") {
            let path = path.split(',').next().unwrap_or(path);
            if !std::path::Path::new(path).exists() {
                return Err(no_tpm(format!(
                    "{path} does not exist (no TPM, or its driver is not loaded)"
                )));
            }
        }
        let conf: TctiNameConf = tcti
            .parse()
            .map_err(|e: tss_esapi::Error| no_tpm(e.to_string()))?;
        let ctx = Context::new(conf).map_err(|e| no_tpm(e.to_string()))?;
        Ok(Tpm { ctx, srk: None })
    }

    /// The storage root key: an ECC P-256 primary of the owner hierarchy, made from the
    /// same template every time, so it is the same key on every boot of this TPM and
    /// need not be stored. (ECC: generated in microseconds, where RSA takes seconds.)
    pub(crate) fn srk(&mut self) -> Result<KeyHandle, Error> {
        if let Some(h) = self.srk {
            return Ok(h);
        }
        let attributes = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_no_da(true)
            .with_restricted(true)
            .with_decrypt(true)
            .build()
            .map_err(tpm_op("build the storage key template"))?;
        let public = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attributes)
            .with_ecc_parameters(
                PublicEccParametersBuilder::new_restricted_decryption_key(
                    SymmetricDefinitionObject::AES_128_CFB,
                    EccCurve::NistP256,
                )
                .build()
                .map_err(tpm_op("build the storage key parameters"))?,
            )
            .with_ecc_unique_identifier(EccPoint::default())
            .build()
            .map_err(tpm_op("build the storage key template"))?;
        let handle = self
            .ctx
            .execute_with_nullauth_session(|c| {
                c.create_primary(Hierarchy::Owner, public, None, None, None, None)
            })
            .map_err(tpm_op("create the storage root key"))?
            .key_handle;
        self.srk = Some(handle);
        Ok(handle)
    }

    /// A session salted with the storage root key (its secret never crosses the bus in
    /// clear), with AES-128-CFB parameter encryption in the directions asked for.
    pub(crate) fn salted_session(
        &mut self,
        kind: SessionType,
        encrypt_command: bool,
        encrypt_response: bool,
    ) -> Result<AuthSession, Error> {
        let srk = self.srk()?;
        let session = self
            .ctx
            .start_auth_session(
                Some(srk),
                None,
                None,
                kind,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(tpm_op("start a salted session"))?
            .ok_or_else(|| Error::Input {
                what: "the TPM's session",
                why: "no session handle came back".into(),
            })?;
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_continue_session(true)
            .with_decrypt(encrypt_command)
            .with_encrypt(encrypt_response)
            .build();
        self.ctx
            .tr_sess_set_attributes(session, attrs, mask)
            .map_err(tpm_op("set the session's encryption"))?;
        Ok(session)
    }
}
