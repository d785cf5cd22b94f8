//! storaged's pool superblock and a catalog slot, as read from a disk at start.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = storaged::superblock::Superblock::decode(data);
    let uuid = data
        .get(8..24)
        .and_then(|u| <[u8; 16]>::try_from(u).ok())
        .unwrap_or([0; 16]);
    let _ = storaged::catalog::decode(&uuid, data);
    let _ = serde_json::from_slice::<storaged::catalog::Catalog>(data);
});
