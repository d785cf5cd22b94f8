//! The box's half of attestation: its endorsement key (the TCG template's ECC P-256 EK,
//! the key the manufacturer's certificate names), an attestation key made under it, the
//! credential only this TPM can open (TPM2_ActivateCredential) and quotes of its PCRs.
//! The core's half, which needs no TPM, is `evidence`.

use serde::{Deserialize, Serialize};
use tss_esapi::abstraction::{ak, ek, AsymmetricAlgorithmSelection, KeyCustomization};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::constants::SessionType;
use tss_esapi::handles::AuthHandle;
use tss_esapi::handles::{KeyHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{EccSchemeAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Attest, AttestInfo, Data, Digest, EccPoint, EccScheme, EncryptedSecret, HashcheckTicket,
    IdObject, KeyDerivationFunctionScheme, PcrSelectionListBuilder, PcrSlot, Private, Public,
    PublicBuilder, PublicEccParametersBuilder, Signature, SignatureScheme, SymmetricDefinition,
    SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;

use crate::error::{tpm_op, Error};
use crate::evidence::{Certified, Credential, Endorsement, Quote};
use crate::policy::{base64_decode, base64_encode, hex};
use crate::Tpm;

/// Quotes taken at most while the quoted PCRs keep changing under them.
const QUOTE_TRIES: usize = 4;

/// Whether `attest` (a quote) is over exactly these PCR values, in their order: its
/// PCR digest is the SHA-256 of their concatenation.
pub fn quotes_values(attest: &Attest, values: &[(u32, [u8; 32])]) -> bool {
    use sha2::Digest as _;
    let AttestInfo::Quote { info } = attest.attested() else {
        return false;
    };
    let mut h = sha2::Sha256::new();
    for (_, v) in values {
        h.update(v);
    }
    info.pcr_digest().value() == h.finalize().as_slice()
}

fn selection(kind: Endorsement) -> AsymmetricAlgorithmSelection {
    match kind {
        Endorsement::Rsa2048 => AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
        Endorsement::EccP256 => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
    }
}

/// An attestation key as the box stores it: blobs only its TPM can load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestationKey {
    /// The endorsement key it was made under (and is loaded under).
    pub ek: Endorsement,
    /// TPM2B_PRIVATE contents (wrapped by the endorsement key), base64.
    pub private: String,
    /// TPMT_PUBLIC, base64: what the core checks quotes with.
    pub public: String,
}

impl AttestationKey {
    /// The TPMT_PUBLIC.
    pub fn public(&self) -> Result<Vec<u8>, Error> {
        base64_decode(&self.public).map_err(|why| Error::Input {
            what: "the attestation key's public part",
            why,
        })
    }
}

/// The site's TLS key as the box stores it: an ECDSA P-256 signing key made inside the
/// TPM under the storage root key, which cannot leave it (fixedTPM, fixedParent). The
/// core certifies it through the attestation key (`certify_site_key`) before it issues
/// the site's certificate for it; the box signs its TLS handshakes with it (`sign`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteKey {
    /// TPM2B_PRIVATE contents (wrapped by the storage root key), base64.
    pub private: String,
    /// TPMT_PUBLIC, base64.
    pub public: String,
}

/// Our keys have empty authorizations, which no one can guess wrong: the TPM's
/// dictionary-attack lockout (set off by something else on the box guessing a password)
/// must not stop the box from signing, quoting or unsealing.
struct NoDictionaryAttackLockout;

impl KeyCustomization for NoDictionaryAttackLockout {
    fn attributes(&self, attributes: ObjectAttributesBuilder) -> ObjectAttributesBuilder {
        attributes.with_no_da(true)
    }
}

fn input(what: &'static str) -> impl Fn(String) -> Error {
    move |why| Error::Input { what, why }
}

impl Tpm {
    /// The endorsement key, made again from the TCG template (the same key every time).
    fn ek(&mut self, kind: Endorsement) -> Result<KeyHandle, Error> {
        ek::create_ek_object_2(&mut self.ctx, selection(kind), None)
            .map_err(tpm_op("create the endorsement key"))
    }

    /// The manufacturer's certificate of the endorsement key (DER), from the TPM's NV
    /// index for `kind`.
    pub fn ek_certificate(&mut self, kind: Endorsement) -> Result<Vec<u8>, Error> {
        ek::retrieve_ek_pubcert(&mut self.ctx, selection(kind)).map_err(tpm_op(
            "read the endorsement key's certificate (none provisioned?)",
        ))
    }

    /// The endorsement key's TPMT_PUBLIC: what the core makes credentials for, and what
    /// the manufacturer's EK certificate certifies.
    pub fn endorsement_key(&mut self, kind: Endorsement) -> Result<Vec<u8>, Error> {
        let handle = self.ek(kind)?;
        let public = self.ctx.read_public(handle).map(|(p, _, _)| p);
        let _ = self.ctx.flush_context(handle.into());
        public
            .map_err(tpm_op("read the endorsement key"))?
            .marshall()
            .map_err(tpm_op("marshal the endorsement key"))
    }

    /// A new attestation key under the endorsement key: ECDSA P-256 with SHA-256,
    /// restricted (it signs only what the TPM produced), never leaving this TPM.
    pub fn create_attestation_key(&mut self, kind: Endorsement) -> Result<AttestationKey, Error> {
        let ek = self.ek(kind)?;
        let created = ak::create_ak_2(
            &mut self.ctx,
            ek,
            HashingAlgorithm::Sha256,
            AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
            SignatureSchemeAlgorithm::EcDsa,
            None,
            NoDictionaryAttackLockout,
        );
        let _ = self.ctx.flush_context(ek.into());
        let created = created.map_err(tpm_op("create the attestation key"))?;
        Ok(AttestationKey {
            ek: kind,
            private: base64_encode(created.out_private.value()),
            public: base64_encode(
                &created
                    .out_public
                    .marshall()
                    .map_err(tpm_op("marshal the attestation key"))?,
            ),
        })
    }

    /// Loads the attestation key under a fresh endorsement key; both handles, to flush.
    fn load_attestation_key(
        &mut self,
        key: &AttestationKey,
    ) -> Result<(KeyHandle, KeyHandle), Error> {
        let private =
            base64_decode(&key.private).map_err(input("the attestation key's private part"))?;
        let private = Private::try_from(private).map_err(|e| Error::Input {
            what: "the attestation key's private part",
            why: e.to_string(),
        })?;
        let public = Public::unmarshall(&key.public()?).map_err(|e| Error::Input {
            what: "the attestation key's public part",
            why: e.to_string(),
        })?;
        let ek = self.ek(key.ek)?;
        match ak::load_ak(&mut self.ctx, ek, None, private, public) {
            Ok(handle) => Ok((ek, handle)),
            Err(e) => {
                let _ = self.ctx.flush_context(ek.into());
                Err(tpm_op("load the attestation key (made by another TPM?)")(e))
            }
        }
    }

    /// Opens a credential the core made for this TPM's endorsement key and `key`'s name
    /// (`evidence::make_credential`). Another TPM, or another key, gets an error.
    pub fn activate_credential(
        &mut self,
        key: &AttestationKey,
        credential: &Credential,
    ) -> Result<Vec<u8>, Error> {
        let id_object = base64_decode(&credential.id_object).map_err(input("the credential"))?;
        let id_object = IdObject::try_from(id_object).map_err(|e| Error::Input {
            what: "the credential",
            why: e.to_string(),
        })?;
        let secret = base64_decode(&credential.secret).map_err(input("the credential's secret"))?;
        let secret = EncryptedSecret::try_from(secret).map_err(|e| Error::Input {
            what: "the credential's secret",
            why: e.to_string(),
        })?;
        let (ek, ak) = self.load_attestation_key(key)?;
        let result = self.with_endorsement_policy(|ctx, policy| {
            ctx.execute_with_sessions((Some(AuthSession::Password), Some(policy), None), |c| {
                c.activate_credential(ak, ek, id_object, secret)
            })
        });
        let _ = self.ctx.flush_context(ak.into());
        let _ = self.ctx.flush_context(ek.into());
        let digest = result.map_err(|e| {
            Error::Untrusted(format!(
                "this TPM cannot open the credential (made for another TPM's endorsement key or another attestation key): {e}"
            ))
        })?;
        Ok(digest.value().to_vec())
    }

    /// A new site key (see `SiteKey`).
    pub fn create_site_key(&mut self) -> Result<SiteKey, Error> {
        let attributes = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_sign_encrypt(true)
            .with_no_da(true)
            .build()
            .map_err(tpm_op("build the site key template"))?;
        let public = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attributes)
            .with_ecc_parameters(
                PublicEccParametersBuilder::new()
                    .with_symmetric(SymmetricDefinitionObject::Null)
                    .with_ecc_scheme(
                        EccScheme::create(
                            EccSchemeAlgorithm::EcDsa,
                            Some(HashingAlgorithm::Sha256),
                            None,
                        )
                        .map_err(tpm_op("build the site key scheme"))?,
                    )
                    .with_curve(EccCurve::NistP256)
                    .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                    .with_is_signing_key(true)
                    .build()
                    .map_err(tpm_op("build the site key parameters"))?,
            )
            .with_ecc_unique_identifier(EccPoint::default())
            .build()
            .map_err(tpm_op("build the site key template"))?;
        let srk = self.srk()?;
        let created = self
            .ctx
            .execute_with_nullauth_session(|c| c.create(srk, public, None, None, None, None))
            .map_err(tpm_op("create the site key"))?;
        Ok(SiteKey {
            private: base64_encode(created.out_private.value()),
            public: base64_encode(
                &created
                    .out_public
                    .marshall()
                    .map_err(tpm_op("marshal the site key"))?,
            ),
        })
    }

    fn load_site_key(&mut self, key: &SiteKey) -> Result<KeyHandle, Error> {
        let what = "the site key";
        let private = base64_decode(&key.private).map_err(input(what))?;
        let private = Private::try_from(private).map_err(|e| Error::Input {
            what,
            why: e.to_string(),
        })?;
        let public = base64_decode(&key.public).map_err(input(what))?;
        let public = Public::unmarshall(&public).map_err(|e| Error::Input {
            what,
            why: e.to_string(),
        })?;
        let srk = self.srk()?;
        self.ctx
            .execute_with_nullauth_session(|c| c.load(srk, private, public))
            .map_err(tpm_op("load the site key (made by another TPM?)"))
    }

    /// TPM2_Certify of the site key by the attestation key, for `nonce`: the TPM's word
    /// that the key is its own, with the attributes its public part shows.
    pub fn certify_site_key(
        &mut self,
        key: &SiteKey,
        ak: &AttestationKey,
        nonce: &[u8],
    ) -> Result<Certified, Error> {
        let data = Data::try_from(nonce.to_vec()).map_err(|e| Error::Input {
            what: "the certification's nonce",
            why: e.to_string(),
        })?;
        // A TPM without a resource manager holds three objects: the endorsement key goes
        // once the attestation key is loaded, before the storage key and the site key.
        let (ek, ak) = self.load_attestation_key(ak)?;
        let _ = self.ctx.flush_context(ek.into());
        let result = self.load_site_key(key).and_then(|site| {
            let r = self
                .ctx
                .execute_with_sessions(
                    (
                        Some(AuthSession::Password),
                        Some(AuthSession::Password),
                        None,
                    ),
                    |c| c.certify(site.into(), ak, data, SignatureScheme::Null),
                )
                .map_err(tpm_op("certify the site key"));
            let _ = self.ctx.flush_context(site.into());
            r
        });
        let _ = self.ctx.flush_context(ak.into());
        let (attest, signature) = result?;
        Ok(Certified {
            attest: base64_encode(
                &attest
                    .marshall()
                    .map_err(tpm_op("marshal the certification"))?,
            ),
            signature: base64_encode(
                &signature
                    .marshall()
                    .map_err(tpm_op("marshal the certification's signature"))?,
            ),
        })
    }

    /// Signs a SHA-256 digest with the site key: ECDSA, as DER (what TLS carries).
    pub fn sign(&mut self, key: &SiteKey, digest: &[u8; 32]) -> Result<Vec<u8>, Error> {
        let handle = self.load_site_key(key)?;
        let ticket = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
            tag: TPM2_ST_HASHCHECK,
            hierarchy: TPM2_RH_NULL,
            digest: Default::default(),
        })
        .map_err(tpm_op("build the null ticket"));
        let signed = ticket.and_then(|ticket| {
            let digest = Digest::try_from(digest.to_vec()).map_err(tpm_op("use the digest"))?;
            self.ctx
                .execute_with_nullauth_session(|c| {
                    c.sign(handle, digest, SignatureScheme::Null, ticket)
                })
                .map_err(tpm_op("sign with the site key"))
        });
        let _ = self.ctx.flush_context(handle.into());
        match signed? {
            Signature::EcDsa(sig) => Ok(crate::evidence::ecdsa_der(
                sig.signature_r().value(),
                sig.signature_s().value(),
            )),
            other => Err(Error::Input {
                what: "the site key's signature",
                why: format!("{:?}, not ECDSA", other.algorithm()),
            }),
        }
    }

    /// A policy session satisfying the endorsement key's policy (PolicySecret of the
    /// endorsement hierarchy, whose auth is empty), for `f`; flushed after.
    fn with_endorsement_policy<T>(
        &mut self,
        f: impl FnOnce(&mut tss_esapi::Context, AuthSession) -> tss_esapi::Result<T>,
    ) -> tss_esapi::Result<T> {
        let session = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )?
            .ok_or(tss_esapi::Error::WrapperError(
                tss_esapi::WrapperErrorKind::WrongValueFromTpm,
            ))?;
        let result = PolicySession::try_from(session)
            .and_then(|policy| {
                self.ctx.execute_with_nullauth_session(|c| {
                    c.policy_secret(
                        policy,
                        AuthHandle::Endorsement,
                        Default::default(),
                        Default::default(),
                        Default::default(),
                        None,
                    )
                })
            })
            .and_then(|_| f(&mut self.ctx, session));
        let _ = self.ctx.flush_context(SessionHandle::from(session).into());
        result
    }

    /// A quote by `key` over the SHA-256 bank's `pcrs` for `nonce` (at most 64 bytes),
    /// with the PCRs' values as the TPM quoted them.
    ///
    /// The values are read just before the quote. Another program may extend a PCR in
    /// between (init extends PCR 11 when a boot is ready, while fabricd enrolls), and
    /// the core would refuse values that are not the ones quoted: the quote is then
    /// taken again, up to `QUOTE_TRIES` times.
    pub fn quote(
        &mut self,
        key: &AttestationKey,
        nonce: &[u8],
        pcrs: &[u32],
    ) -> Result<Quote, Error> {
        let mut sorted = pcrs.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let slots = sorted
            .iter()
            .map(|&i| {
                PcrSlot::try_from(1u32.checked_shl(i).unwrap_or(0)).map_err(|_| Error::Input {
                    what: "the PCRs to quote",
                    why: format!("PCR {i} does not exist (0 to 23)"),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let selection = PcrSelectionListBuilder::new()
            .with_selection(HashingAlgorithm::Sha256, &slots)
            .build()
            .map_err(tpm_op("build the PCR selection"))?;
        let data = Data::try_from(nonce.to_vec()).map_err(|e| Error::Input {
            what: "the quote's nonce",
            why: e.to_string(),
        })?;
        let (ek, ak) = self.load_attestation_key(key)?;
        let mut quoted = Err(Error::Input {
            what: "the PCRs to quote",
            why: format!("they changed during each of {QUOTE_TRIES} quotes"),
        });
        for _ in 0..QUOTE_TRIES {
            let values = sorted
                .iter()
                .map(|&index| Ok((index, self.read_pcr(index)?)))
                .collect::<Result<Vec<_>, Error>>();
            let values = match values {
                Ok(v) => v,
                Err(e) => {
                    quoted = Err(e);
                    break;
                }
            };
            let once = self
                .ctx
                .execute_with_nullauth_session(|c| {
                    c.quote(ak, data.clone(), SignatureScheme::Null, selection.clone())
                })
                .map_err(tpm_op("quote the PCRs"));
            match once {
                Ok((attest, signature)) if quotes_values(&attest, &values) => {
                    quoted = Ok((attest, signature, values));
                    break;
                }
                // A PCR changed between the read and the quote: again.
                Ok(_) => {}
                Err(e) => {
                    quoted = Err(e);
                    break;
                }
            }
        }
        let _ = self.ctx.flush_context(ak.into());
        let _ = self.ctx.flush_context(ek.into());
        let (attest, signature, values) = quoted?;
        Ok(Quote {
            attest: base64_encode(&attest.marshall().map_err(tpm_op("marshal the quote"))?),
            signature: base64_encode(
                &signature
                    .marshall()
                    .map_err(tpm_op("marshal the quote's signature"))?,
            ),
            pcrs: values.iter().map(|(i, v)| (*i, hex(v))).collect(),
        })
    }
}
