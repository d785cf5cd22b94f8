//! edge-tpm's exit status, which init's stage 1 decides on (init/src/sealed_data.rs): a
//! TPM that could not be opened measured nothing, and says so by exiting 3.

#[test]
fn a_missing_tpm_device_exits_3_naming_it() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-tpm"))
        .arg("pcr11")
        .env("EDGE_TPM_TCTI", "device:/nonexistent/tpm0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("edge-tpm: no TPM at device:/nonexistent/tpm0"),
        "{said}"
    );
}
