//! Unsealing, as the policy it satisfies: PolicyPCR (PCR 11 as the TPM holds it now) →
//! the signature over that policy checked by the TPM (VerifySignature) →
//! PolicyAuthorize (the signed policy stands in for the sealed object's) → PolicyPCR of
//! each PCR bound by value, if any (the PCR 7 option) → Unseal, the
//! key travelling back encrypted. Ahead of the TPM, the same check is made in the open so
//! that a refusal can say why: which PCR 11 value this boot has, and that no policy was
//! signed for it.

use tss_esapi::constants::SessionType;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::session_handles::PolicySession;
use tss_esapi::structures::{
    Digest, Nonce, PcrSelectionListBuilder, PcrSlot, PublicKeyRsa, RsaSignature, Signature,
};

use crate::error::{tpm_op, Error};
use crate::policy::{self, hex, PolicyKey, SignedPolicy};
use crate::{Sealed, Tpm};
use tss_esapi::handles::SessionHandle;

impl Tpm {
    /// The sealed secret, if this boot's PCR 11 matches a policy `key` signed.
    pub fn unseal(
        &mut self,
        sealed: &Sealed,
        key: &PolicyKey,
        signed: &[SignedPolicy],
    ) -> Result<Vec<u8>, Error> {
        if sealed.key_fingerprint != key.fingerprint {
            return Err(Error::Refused(format!(
                "this boot's PCR-policy key ({}) is not the key the data key was sealed to ({})",
                short(&key.fingerprint),
                short(&sealed.key_fingerprint)
            )));
        }
        let pcr11 = self.read_pcr11()?;
        let expected = policy::policy_pcr(policy::PCR_UKI, &pcr11);
        let Some(entry) = signed.iter().find(|s| {
            s.pcrs == [policy::PCR_UKI]
                && s.key_fingerprint == key.fingerprint
                && s.policy == expected
        }) else {
            return Err(Error::Refused(format!(
                "PCR 11 is {}, and the UKI carries no policy signed for it: the boot is not the signed one",
                hex(&pcr11)
            )));
        };

        // The PCRs bound by value (the PCR 7 option), checked in the open first too.
        let mut literal = Vec::new();
        for (pcr, sealed_value) in &sealed.literal {
            let now = self.read_pcr(*pcr)?;
            if hex(&now) != *sealed_value {
                return Err(Error::Refused(format!(
                    "PCR {pcr} is {}, and the data key is bound to its value at sealing, {sealed_value}{}",
                    hex(&now),
                    if *pcr == 7 {
                        ": the firmware's Secure Boot state or keys changed"
                    } else {
                        ""
                    }
                )));
            }
            let slot = PcrSlot::try_from(1u32.checked_shl(*pcr).unwrap_or(0)).map_err(|_| {
                Error::Input {
                    what: "the sealed data key",
                    why: format!("edge-literal-pcrs: PCR {pcr} does not exist"),
                }
            })?;
            literal.push(slot);
        }

        let (key_handle, key_name) = self.load_policy_key(key)?;
        let approved = Digest::try_from(entry.policy.clone()).map_err(tpm_op("use the policy"))?;
        let signature = Signature::RsaSsa(
            RsaSignature::create(
                HashingAlgorithm::Sha256,
                PublicKeyRsa::try_from(entry.signature.clone())
                    .map_err(tpm_op("use the policy signature"))?,
            )
            .map_err(tpm_op("use the policy signature"))?,
        );
        let digest = Digest::try_from(policy::authorization_digest(&entry.policy).to_vec())
            .map_err(tpm_op("use the policy"))?;
        let ticket = self.ctx.verify_signature(key_handle, digest, signature);
        let _ = self.ctx.flush_context(key_handle.into());
        let ticket = ticket.map_err(|e| {
            Error::Refused(format!(
                "the policy signature does not verify with the PCR-policy key ({e})"
            ))
        })?;

        // Loaded only now: a TPM without a resource manager has three object slots.
        let (private, public) = sealed.blobs()?;
        let srk = self.srk()?;
        let object = self
            .ctx
            .execute_with_nullauth_session(|c| c.load(srk, private, public))
            .map_err(tpm_op("load the sealed data key"))?;
        let session = self.salted_session(SessionType::Policy, false, true)?;
        let result = (|| {
            let policy_session =
                PolicySession::try_from(session).map_err(tpm_op("use the policy session"))?;
            let pcrs = PcrSelectionListBuilder::new()
                .with_selection(HashingAlgorithm::Sha256, &[PcrSlot::Slot11])
                .build()
                .map_err(tpm_op("build the PCR selection"))?;
            self.ctx
                .policy_pcr(policy_session, Digest::default(), pcrs)
                .map_err(tpm_op("apply PolicyPCR"))?;
            self.ctx
                .policy_authorize(policy_session, approved, Nonce::default(), &key_name, ticket)
                .map_err(|e| {
                    Error::Refused(format!(
                        "PCR 11 changed under the policy check ({e}): the boot is not the signed one"
                    ))
                })?;
            for slot in &literal {
                let pcrs = PcrSelectionListBuilder::new()
                    .with_selection(HashingAlgorithm::Sha256, &[*slot])
                    .build()
                    .map_err(tpm_op("build the PCR selection"))?;
                self.ctx
                    .policy_pcr(policy_session, Digest::default(), pcrs)
                    .map_err(tpm_op("apply PolicyPCR to a PCR bound by value"))?;
            }
            self.ctx
                .execute_with_session(Some(session), |c| c.unseal(object.into()))
                .map_err(|e| Error::Refused(format!("the TPM would not unseal ({e})")))
        })();
        let _ = self.ctx.flush_context(SessionHandle::from(session).into());
        let _ = self.ctx.flush_context(object.into());
        Ok(result?.value().to_vec())
    }
}

fn short(fp: &str) -> &str {
    fp.get(..16).unwrap_or(fp)
}
