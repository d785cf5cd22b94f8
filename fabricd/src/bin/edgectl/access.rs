//! `edgectl nats-config`: the core's access configuration, which certificate may publish
//! and subscribe to what (nats-server's configuration syntax).

use fabricd::config::is_token;

use crate::error::{Error, Result};
use crate::Names;

/// Who a certificate subject of the access configuration is.
pub(crate) enum User<'a> {
    Operator,
    Site(&'a str),
    Enroll(&'a str),
}

/// The core's access configuration (see `Cmd::NatsConfig`): nats-server's configuration
/// syntax, with a comment on every site subject saying why the box needs it.
pub(crate) fn nats_config(
    n: &Names,
    sites: &[String],
    [site_subject, enroll_subject]: [&str; 2],
    operators: &[String],
    tls: [&std::path::Path; 3],
) -> Result<String> {
    use std::fmt::Write;
    for (flag, subject) in [
        ("--site-subject", site_subject),
        ("--enroll-subject", enroll_subject),
    ] {
        if !subject.contains("{site}") {
            return Err(Error::invalid(
                format!("{flag} {subject:?}"),
                "must contain {site}",
            ));
        }
    }
    let mut users: Vec<(String, User)> = operators
        .iter()
        .map(|o| (o.clone(), User::Operator))
        .collect();
    for site in sites {
        if !is_token(site) {
            return Err(Error::invalid(
                format!("site {site:?}"),
                "must be letters, digits, '-' or '_' (it is a subject token)",
            ));
        }
        users.push((site_subject.replace("{site}", site), User::Site(site)));
        users.push((enroll_subject.replace("{site}", site), User::Enroll(site)));
    }
    let mut seen = std::collections::HashSet::new();
    for (subject, _) in &users {
        // Users are matched by the certificate's distinguished name; a value that needs
        // quoting or escaping is more likely a mistake than a subject the CA issues.
        if !subject.contains('=')
            || subject
                .chars()
                .any(|c| c == '"' || c == '\\' || c.is_control())
        {
            return Err(Error::invalid(
                format!("certificate subject {subject:?}"),
                "must be a distinguished name like CN=site-s1,O=example, without quotes or backslashes",
            ));
        }
        if !seen.insert(subject.to_ascii_lowercase()) {
            return Err(Error::invalid(
                format!("certificate subject {subject:?}"),
                "is given to two users",
            ));
        }
    }
    for (flag, path) in ["--tls-cert", "--tls-key", "--tls-ca"].iter().zip(tls) {
        let text = path.to_str().unwrap_or_default();
        if !path.is_absolute() || text.contains(['"', '\\']) || text.is_empty() {
            return Err(Error::invalid(
                format!("{flag} {}", path.display()),
                "must be an absolute path (as nats-server sees it), without quotes or backslashes",
            ));
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Written by `edgectl nats-config`: who may connect to the core and what each may do.\n\
         # Sites: {}. Include this file from nats-server.conf, which then has no tls or\n\
         # authorization block of its own, and reload nats-server (docs/fabric.md).\n\
         tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  \
         # A client certificate signed by ca_file is required; its subject names the user.\n  \
         verify_and_map: true\n  timeout: 5\n}}\n\
         authorization {{\n  users = [",
        sites.join(", "),
        tls[0].display(),
        tls[1].display(),
        tls[2].display()
    );
    for (subject, user) in &users {
        let site = match user {
            User::Operator => {
                let _ = writeln!(
                    out,
                    "    # An operator: everything.\n    {{ user: \"{subject}\" }}"
                );
                continue;
            }
            User::Enroll(site) => {
                let _ = writeln!(
                    out,
                    "    # Site {site}'s enrollment certificate: it may only ask to be enrolled\n    \
                     # (edgectl enroll checks the TPM) and read the answers.\n    \
                     {{\n      user: \"{subject}\"\n      permissions: {{\n        \
                     publish: {{ allow: [\"{}\"] }}\n        \
                     subscribe: {{ allow: [\"{}.>\"] }}\n      }}\n    }}",
                    edge_tpm::enrollment::subject(site),
                    edge_tpm::enrollment::inbox_prefix(site)
                );
                continue;
            }
            User::Site(site) => site,
        };
        let _ = writeln!(
            out,
            "    # Site {site}: every box of the site presents a certificate with this subject.\n    \
             {{\n      user: \"{subject}\"\n      permissions: {{\n        publish: {{\n          allow: ["
        );
        for (subject, why) in site_publish(n, site) {
            let _ = writeln!(out, "            # {why}\n            \"{subject}\"");
        }
        let _ = writeln!(
            out,
            "          ]\n        }}\n        subscribe: {{\n          allow: [\n            \
             # replies and consumer deliveries, on the box's own inbox prefix\n            \
             \"{}.>\"\n          ]\n        }}\n      }}\n    }}",
            fabricd::uplink::inbox_prefix(site)
        );
    }
    out.push_str("  ]\n}\n");
    Ok(out)
}

/// What a box of `site` may publish at the core, each with why fabricd needs it. Read off
/// fabricd's client calls (src/uplink.rs, src/downlink/) and the subjects async-nats
/// sends them on; a subject missing here shows as a permissions violation that ends the
/// box's session, which the site_authorization test would catch.
pub(crate) fn site_publish(n: &Names, site: &str) -> Vec<(String, &'static str)> {
    let Names {
        prefix,
        stream,
        bucket,
        objects,
        status_bucket,
    } = n;
    vec![
        (
            format!("{prefix}.{site}.>"),
            "records of every machine of the site, and the downlink reports (<machine>._downlink)",
        ),
        (
            format!("$JS.API.DIRECT.GET.{stream}.{prefix}.{site}.>"),
            "the last record the core holds on a subject of the site, asked before resending (a resend after the duplicate window would be stored twice)",
        ),
        (
            format!("$KV.{status_bucket}.{site}.*"),
            "each machine's status report, under its key <site>.<machine>",
        ),
        (
            format!("$JS.API.STREAM.INFO.KV_{bucket}"),
            "opening the config bucket",
        ),
        (
            format!("$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.{site}.>"),
            "asking for the site's and the machine's manifests (every poll_secs), and reading the site's kv items (keys under <site>.)",
        ),
        (
            format!("$JS.API.STREAM.INFO.OBJ_{objects}"),
            "opening the object store and its stream",
        ),
        (
            format!("$JS.API.DIRECT.GET.OBJ_{objects}.$O.{objects}.M.*"),
            "an object's info (size, chunk id) by name: any object",
        ),
        (
            format!("$JS.API.CONSUMER.CREATE.OBJ_{objects}"),
            "reading an object's chunks (the filter is only in the request: any object)",
        ),
        (
            format!("$JS.FC.OBJ_{objects}.>"),
            "flow control replies of those reads",
        ),
    ]
}
