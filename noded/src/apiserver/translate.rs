//! A Kubernetes Pod as one of our manifests: the fields the reconciler runs are
//! kept, the rest named as unsupported; and the names Kubernetes allows, checked
//! before any reaches a path.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The pod as a manifest noded's parser reads: what the server adds that makes no sense
/// at the edge is removed (and named in the second value when it was a user's setting
/// rather than a server default); anything else unsupported stays, so the parser
/// refuses the pod naming the field, as for every other source.
pub fn edge_manifest(pod: &Value) -> (Value, Vec<String>) {
    let mut dropped = Vec::new();
    let mut meta = Map::new();
    for k in ["name", "namespace", "labels"] {
        if let Some(v) = pod["metadata"].get(k).filter(|v| !v.is_null()) {
            meta.insert(k.into(), v.clone());
        }
    }
    let mut out = Map::new();
    out.insert("apiVersion".into(), "v1".into());
    out.insert("kind".into(), "Pod".into());
    out.insert("metadata".into(), Value::Object(meta));
    let mut spec = pod["spec"].as_object().cloned().unwrap_or_default();
    for k in [
        "nodeName",
        "schedulerName",
        "dnsPolicy",
        "serviceAccount",
        "serviceAccountName",
        "automountServiceAccountToken",
        "tolerations",
        "priority",
        "priorityClassName",
        "preemptionPolicy",
        "enableServiceLinks",
    ] {
        spec.remove(k);
    }
    if spec.get("securityContext").is_some_and(is_empty) {
        spec.remove("securityContext");
    }
    // The service-account token volume the server injects: there is no token
    // projection at the edge (and no in-cluster API access for pods).
    let token = |name: &str| name.starts_with("kube-api-access-");
    if let Some(Value::Array(vols)) = spec.get_mut("volumes") {
        vols.retain(|v| {
            let name = v["name"].as_str().unwrap_or("");
            let drop = token(name) && v.get("projected").is_some();
            if drop {
                dropped.push(format!("volume {name} (service-account token)"));
            }
            !drop
        });
        if vols.is_empty() {
            spec.remove("volumes");
        }
    }
    for list in ["initContainers", "containers"] {
        let Some(Value::Array(cs)) = spec.get_mut(list) else {
            continue;
        };
        for c in cs.iter_mut().filter_map(Value::as_object_mut) {
            for k in ["terminationMessagePath", "terminationMessagePolicy"] {
                c.remove(k);
            }
            if c.get("securityContext").is_some_and(is_empty) {
                c.remove("securityContext");
            }
            if c.get("resources").is_some_and(is_empty) {
                c.remove("resources");
            }
            if let Some(Value::Array(mounts)) = c.get_mut("volumeMounts") {
                mounts.retain(|m| !token(m["name"].as_str().unwrap_or("")));
                if mounts.is_empty() {
                    c.remove("volumeMounts");
                }
            }
        }
    }
    out.insert("spec".into(), Value::Object(spec));
    (Value::Object(out), dropped)
}

pub(super) fn is_empty(v: &Value) -> bool {
    v.is_null() || v.as_object().is_some_and(Map::is_empty)
}

/// A DNS subdomain (RFC 1123), as Kubernetes requires of node, pod and namespace names.
pub(super) fn check_subdomain(s: &str) -> Result<()> {
    if s.is_empty() || s.len() > 253 {
        return Err(Error::bad_value(s, "must be 1 to 253 characters"));
    }
    for label in s.split('.') {
        let ok = !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(Error::bad_value(
                s,
                "is not a DNS subdomain (lowercase letters, digits, '-' and '.')",
            ));
        }
    }
    Ok(())
}

/// A label value: at most 63 of letters, digits, `-`, `_`, `.`, starting and ending
/// alphanumeric (or empty).
pub(super) fn check_label_value(v: &str) -> Result<()> {
    let ok = v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && v.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        && v.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(Error::bad_value(v, "is not a valid label value"))
    }
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain, the name as a value but
/// not empty.
pub(super) fn check_label_key(k: &str) -> Result<()> {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        check_subdomain(p)?;
    }
    if name.is_empty() {
        return Err(Error::bad_value(k, "has an empty name"));
    }
    check_label_value(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_reach_a_path_are_refused() {
        for bad in ["", "..", "a/b", "a_b", "A", "-a", ".a"] {
            assert!(check_subdomain(bad).is_err(), "{bad}");
        }
        for good in ["a", "web-1", "a.b.c", "0"] {
            assert!(check_subdomain(good).is_ok(), "{good}");
        }
        assert!(check_label_key("example.com/role").is_ok());
        assert!(check_label_key("example.com/").is_err());
        assert!(check_label_value("site-7_a.b").is_ok());
        assert!(check_label_value("-x").is_err());
    }
}
