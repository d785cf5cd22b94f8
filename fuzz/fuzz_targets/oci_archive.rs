//! An OCI image-layout archive (tar) as noded's registry and the image build read it.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = edge_oci::read_archive(data);
});
