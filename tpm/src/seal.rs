//! Sealing: the data key becomes a TPM object under the storage root key whose only
//! policy is PolicyAuthorize(the PCR-policy key). Any PCR 11 policy that key signs (every
//! UKI the image builder signs with it, now and in later versions) unlocks it; nothing
//! else does, and no reseal is needed after a signed update.

use serde::{Deserialize, Serialize};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::KeyHandle;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::structures::{
    Digest, KeyedHashScheme, Public, PublicBuilder, PublicKeyRsa, PublicKeyedHashParameters,
    PublicRsaParametersBuilder, RsaExponent, RsaScheme, SensitiveData, SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};

use crate::error::{tpm_op, Error};
use crate::policy::{self, base64_decode, base64_encode, PolicyKey};
use crate::Tpm;
use tss_esapi::handles::SessionHandle;

/// A sealed key as it is stored (in the data partition's LUKS2 header, as a token): the
/// TPM's private and public blobs and which policy key it answers to. Useless without
/// the TPM that sealed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// TPM2B_PRIVATE contents, base64.
    #[serde(rename = "tpm2-private")]
    pub private: String,
    /// TPMT_PUBLIC, marshalled, base64.
    #[serde(rename = "tpm2-public")]
    pub public: String,
    /// The PCRs the signed policies cover.
    #[serde(rename = "tpm2-pcrs")]
    pub pcrs: Vec<u32>,
    /// SHA-256 of the PCR-policy key's RSAPublicKey DER, hex (`pkfp` of `.pcrsig`).
    #[serde(rename = "tpm2-policy-key")]
    pub key_fingerprint: String,
    /// PCRs bound by value besides the signed policy (the PCR 7 option), each with its
    /// value at sealing, hex: after PolicyAuthorize, the policy asks PolicyPCR of each.
    #[serde(
        rename = "edge-literal-pcrs",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub literal: Vec<(u32, String)>,
}

impl Sealed {
    pub(crate) fn blobs(&self) -> Result<(tss_esapi::structures::Private, Public), Error> {
        let bad = |why: String| Error::Input {
            what: "the sealed data key",
            why,
        };
        let private =
            base64_decode(&self.private).map_err(|w| bad(format!("tpm2-private: {w}")))?;
        let public = base64_decode(&self.public).map_err(|w| bad(format!("tpm2-public: {w}")))?;
        let private = tss_esapi::structures::Private::try_from(private)
            .map_err(|e| bad(format!("tpm2-private: {e}")))?;
        let public = Public::unmarshall(&public).map_err(|e| bad(format!("tpm2-public: {e}")))?;
        Ok((private, public))
    }
}

/// The public area under which the PCR-policy key is loaded, at sealing and unsealing
/// alike: its name (a hash of this area) is what the sealed object's policy names.
pub(crate) fn policy_key_public(key: &PolicyKey) -> Result<Public, Error> {
    let attributes = ObjectAttributesBuilder::new()
        .with_user_with_auth(true)
        .with_sign_encrypt(true)
        .with_decrypt(true)
        .build()
        .map_err(tpm_op("build the policy key template"))?;
    // 65537 is the TPM's default exponent, written as 0.
    let exponent = if key.exponent == 65537 {
        RsaExponent::ZERO_EXPONENT
    } else {
        RsaExponent::create(key.exponent).map_err(tpm_op("use the policy key's exponent"))?
    };
    let params = PublicRsaParametersBuilder::new()
        .with_scheme(RsaScheme::Null)
        .with_symmetric(SymmetricDefinitionObject::Null)
        .with_key_bits(RsaKeyBits::Rsa2048)
        .with_exponent(exponent)
        .with_is_signing_key(true)
        .with_is_decryption_key(true)
        .with_restricted(false)
        .build()
        .map_err(tpm_op("build the policy key parameters"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Rsa)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_rsa_parameters(params)
        .with_rsa_unique_identifier(
            PublicKeyRsa::try_from(key.modulus.clone()).map_err(tpm_op("use the policy key"))?,
        )
        .build()
        .map_err(tpm_op("build the policy key template"))
}

impl Tpm {
    /// Loads the PCR-policy key's public half (owner hierarchy: a ticket from the null
    /// hierarchy would not satisfy PolicyAuthorize) and returns its handle and name.
    pub(crate) fn load_policy_key(
        &mut self,
        key: &PolicyKey,
    ) -> Result<(KeyHandle, tss_esapi::structures::Name), Error> {
        let public = policy_key_public(key)?;
        let handle = self
            .ctx
            .load_external_public(public, Hierarchy::Owner)
            .map_err(tpm_op("load the PCR-policy key"))?;
        let name = self
            .ctx
            .tr_get_name(handle.into())
            .map_err(tpm_op("name the PCR-policy key"))?;
        Ok((handle, name))
    }

    /// Seals `secret` (at most 128 bytes) to whatever PCR 11 policy `key` signs, and, if
    /// `literal` names PCRs, to their values now as well (every later boot must have the
    /// same values: PCR 7 for the firmware's Secure Boot state and keys).
    pub fn seal(
        &mut self,
        secret: &[u8],
        key: &PolicyKey,
        literal: &[u32],
    ) -> Result<Sealed, Error> {
        let (handle, name) = self.load_policy_key(key)?;
        let _ = self.ctx.flush_context(handle.into());
        let mut auth_policy = policy::policy_authorize(name.value());
        let mut bound = Vec::new();
        for &pcr in literal {
            if pcr == policy::PCR_UKI {
                return Err(Error::Input {
                    what: "the PCRs to bind by value",
                    why: "PCR 11 is bound by the signed policy; binding its value would undo that"
                        .into(),
                });
            }
            let value = self.read_pcr(pcr)?;
            auth_policy = policy::policy_pcr_after(&auth_policy, pcr, &value);
            bound.push((pcr, policy::hex(&value)));
        }
        let attributes = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_no_da(true)
            .build()
            .map_err(tpm_op("build the sealed object template"))?;
        let public = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::KeyedHash)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attributes)
            .with_auth_policy(
                Digest::try_from(auth_policy.to_vec()).map_err(tpm_op("build the policy"))?,
            )
            .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
            .with_keyed_hash_unique_identifier(Digest::default())
            .build()
            .map_err(tpm_op("build the sealed object template"))?;
        let data = SensitiveData::try_from(secret.to_vec()).map_err(|e| Error::Input {
            what: "the secret to seal",
            why: e.to_string(),
        })?;
        let srk = self.srk()?;
        // The secret is the command's first parameter: the session encrypts it.
        let session = self.salted_session(SessionType::Hmac, true, false)?;
        let created = self
            .ctx
            .execute_with_session(Some(session), |c| {
                c.create(srk, public, None, Some(data), None, None)
            })
            .map_err(tpm_op("seal the data key"));
        let _ = self.ctx.flush_context(SessionHandle::from(session).into());
        let created = created?;
        Ok(Sealed {
            private: base64_encode(created.out_private.value()),
            public: base64_encode(
                &created
                    .out_public
                    .marshall()
                    .map_err(tpm_op("marshal the sealed object"))?,
            ),
            pcrs: vec![policy::PCR_UKI],
            key_fingerprint: key.fingerprint.clone(),
            literal: bound,
        })
    }
}
