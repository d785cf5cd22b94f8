//! `cargo xtask image`: builds the bootable disk image from `image/image.toml`.
//! This module owns the order of the steps, where outputs go, and the staleness stamp;
//! each step lives in its own submodule.

mod cmd;
pub mod debs;
pub mod definition;
mod disk;
mod elf;
pub mod keys;
mod modules;
mod no_way_in;
mod pcr;
mod rootfs;
mod uki;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use qemu_tests::cpio;
use sha2::{Digest, Sha256};

use definition::{Compression, Definition};

/// Host packages whose tools the build runs.
const HOST_TOOLS: [&str; 14] = [
    // edge-tpm links Debian's tpm2-tss; the PCR-policy key is made with openssl.
    "libtss2-dev",
    "pkg-config",
    "openssl",
    "erofs-utils",
    "cryptsetup-bin",
    "dosfstools",
    "mtools",
    "fdisk",
    "qemu-utils",
    "kmod",
    "zstd",
    "binutils",
    "dpkg",
    "apt",
];

const TARGET: &str = "x86_64-unknown-linux-gnu";
const OUR_BINARIES: [&str; 4] = ["init", "storaged", "fabricd", "noded"];
/// Ours, but linked against the root's libraries: edge-tpm needs tpm2-tss, which Debian
/// ships only as shared libraries. Stage 1 runs it from the verified root.
const DYNAMIC_BINARY: &str = "edge-tpm";
/// Programs that go into the image as OCI archives, not as files of the root:
/// (binary, package, image name and tag). `pause` is every pod sandbox's process.
pub const WORKLOAD_IMAGES: [(&str, &str, &str); 3] = [
    ("pause", "noded", "pause:1"),
    ("sensor", "workloads", "sensor:1"),
    ("inference", "workloads", "inference:1"),
];

// UAPI Discoverable Partitions Specification type GUIDs (docs/contracts.md).
const ESP_TYPE: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
const ROOT_TYPE: &str = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709";
const VERITY_TYPE: &str = "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5";
const DATA_TYPE: &str = "4d21b016-b534-45c2-a9fb-5c16e091fd2d";

#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Rebuild even when the stamp says the image is up to date.
    pub force: bool,
    /// Build the definition under this version instead of its own, into
    /// `image-<version>/` (the update tests' newer version of the same tree).
    pub version: Option<String>,
    /// A directory of files laid over the image's overlay.
    pub overlay: Option<PathBuf>,
    /// Build under this security version instead of the definition's.
    pub security_version: Option<u64>,
    /// Build the root with this erofs physical cluster (KiB) instead of the
    /// definition's, into `image-pcluster-<kib>/` (`bench boot --pcluster-kib`).
    pub erofs_pcluster_kib: Option<u32>,
}

/// The update key's public half the builds sign bundles for (`update.pub` in the keys
/// directory).
pub fn update_public_key() -> Result<PathBuf> {
    Ok(keys::key_dir()?.join("update.pub"))
}

/// Where a build put its outputs; `run`, `test` and `bench` read these.
#[derive(Debug, Clone)]
#[allow(dead_code)] // not every field has a reader in every xtask subcommand yet
pub struct ImageOutputs {
    pub dir: PathBuf,
    pub raw: PathBuf,
    pub qcow2: PathBuf,
    pub root_erofs: PathBuf,
    pub root_verity: PathBuf,
    pub roothash_file: PathBuf,
    pub roothash: String,
    pub uki_a: PathBuf,
    pub uki_b: PathBuf,
    /// The signed release: PCR 11 (SHA-256) each slot's UKI leads to at enter-initrd
    /// and the `.pcrsig` that signs it,
    /// `{"a":{"enter-initrd":"<hex>","pcrsig":{"sha256":[...]}},"b":{...}}`.
    pub pcr11: PathBuf,
    /// A copy of the PCR-policy public key (`.pcrpkey`): the release key.
    pub release_key: PathBuf,
    /// The update bundle, `<name>-<version>.bundle` (docs/update.md).
    pub bundle: PathBuf,
    pub initramfs: PathBuf,
    pub esp: PathBuf,
    pub manifest: PathBuf,
    pub version: String,
    pub kernel_release: String,
}

/// Paths of the build's inputs outside the definition.
pub struct Inputs {
    pub repo: PathBuf,
    pub definition: PathBuf,
    pub overlay: PathBuf,
    pub bin_dir: PathBuf,
    /// Where `DYNAMIC_BINARY` is built (the host triple, no --target).
    pub host_bin_dir: PathBuf,
    /// The operator's signing key (`keys.rs`): its public half goes into the image.
    pub key: keys::SigningKey,
    /// Signs each UKI's expected PCR 11 (`.pcrsig`); its public half is `.pcrpkey`.
    pub pcr_key: keys::PcrPolicyKey,
    /// Signs the update bundle; its public half is `/etc/edge/update-ed25519.pub`.
    pub update_key: keys::UpdateKey,
    /// Files laid over `overlay` (`cargo xtask image --overlay`): a site's or a test's
    /// own files, replacing the image's where both have one.
    pub extra_overlay: Option<PathBuf>,
}

/// The checkout xtask runs from.
pub fn repo() -> Result<PathBuf> {
    // `cargo run` sets CARGO_MANIFEST_DIR: preferred to the compile-time value, which
    // can name another clone or worktree sharing the target directory.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .filter(|d| d.join("Cargo.toml").is_file())
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    Ok(manifest
        .parent()
        .context("xtask has no parent directory")?
        .to_path_buf())
}

impl Inputs {
    fn locate() -> Result<Inputs> {
        let repo = repo()?;
        let target = target_dir(&repo);
        Ok(Inputs {
            definition: repo.join("image/image.toml"),
            overlay: repo.join("image/overlay"),
            bin_dir: target.join(TARGET).join("release"),
            host_bin_dir: target.join("release"),
            key: keys::operator_key(&keys::key_dir()?)?,
            pcr_key: keys::pcr_policy_key(&keys::key_dir()?)?,
            update_key: keys::update_key(&keys::key_dir()?)?,
            extra_overlay: None,
            repo,
        })
    }

    pub fn binary(&self, name: &str) -> PathBuf {
        if name == DYNAMIC_BINARY {
            // Built for the host triple without --target: its own directory, so the
            // static builds' flags never force it (or them) to rebuild.
            return self.host_bin_dir.join(name);
        }
        self.bin_dir.join(name)
    }
}

/// Cargo's target directory: CARGO_TARGET_DIR (relative to the workspace) or `target/`.
pub fn target_dir(repo: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => repo.join(d),
        _ => repo.join("target"),
    }
}

fn out_paths(dir: &Path, def: &Definition) -> ImageOutputs {
    ImageOutputs {
        dir: dir.to_path_buf(),
        raw: dir.join(format!("{}.raw", def.image.name)),
        qcow2: dir.join(format!("{}.qcow2", def.image.name)),
        root_erofs: dir.join("root.erofs"),
        root_verity: dir.join("root.verity"),
        roothash_file: dir.join("roothash"),
        roothash: String::new(),
        uki_a: dir.join("uki-a.efi"),
        uki_b: dir.join("uki-b.efi"),
        pcr11: dir.join("pcr11.json"),
        release_key: dir.join("pcr-policy.pub.pem"),
        bundle: dir.join(format!("{}-{}.bundle", def.image.name, def.image.version)),
        initramfs: dir.join("initramfs"),
        esp: dir.join("esp.img"),
        manifest: dir.join("manifest.json"),
        version: def.image.version.clone(),
        kernel_release: def.kernel.release.clone(),
    }
}

/// The update bundle of this build (docs/update.md): its parts are the outputs already
/// made, signed with the update key.
fn write_bundle(def: &Definition, inputs: &Inputs, outs: &ImageOutputs) -> Result<()> {
    let files: [(&str, &Path); 5] = [
        ("pcr11.json", &outs.pcr11),
        ("uki-a.efi", &outs.uki_a),
        ("uki-b.efi", &outs.uki_b),
        ("root.verity", &outs.root_verity),
        ("root.erofs", &outs.root_erofs),
    ];
    let manifest = edge_update::write(
        &outs.bundle,
        &edge_update::Identity {
            name: &def.image.name,
            version: &def.image.version,
            security_version: def.image.security_version,
            kernel_release: &def.kernel.release,
            roothash: &outs.roothash,
        },
        &edge_update::Sources { files: &files },
        |m| inputs.update_key.key.sign(m),
    )
    .with_context(|| format!("failed to write {}", outs.bundle.display()))?;
    // Read back as a box will, so the writer and the reader never drift apart.
    edge_update::open(&outs.bundle, &inputs.update_key.key.public())
        .with_context(|| format!("the bundle just written, {}", outs.bundle.display()))?;
    size_line(&outs.bundle)?;
    step(&format!(
        "update bundle {} {} (security version {}), root index of {} blocks",
        manifest.name,
        manifest.version,
        manifest.security_version,
        manifest.root_blocks()
    ));
    Ok(())
}

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// 32 bytes of hex derived from the version and a purpose, for salts.
pub fn derive_hex(version: &str, purpose: &str) -> String {
    sha256_hex(format!("edgeos:{purpose}:{version}").as_bytes())
}

/// A UUID (RFC 9562 version 8, "custom") derived from the version and a purpose, so the
/// same version always gets the same identifiers.
pub fn derive_uuid(version: &str, purpose: &str) -> String {
    let mut b: [u8; 16] = Sha256::digest(format!("edgeos:{purpose}:{version}").as_bytes())[..16]
        .try_into()
        .expect("16 bytes");
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn step(msg: &str) {
    println!("image: {msg}");
}

fn size_line(path: &Path) -> Result<u64> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("failed to stat {}", path.display()))?
        .len();
    println!(
        "image:   {} {} bytes ({:.1} MiB)",
        path.display(),
        len,
        len as f64 / 1048576.0
    );
    Ok(len)
}

/// Builds our four binaries statically for the image.
fn build_binaries(inputs: &Inputs) -> Result<()> {
    step("building init, storaged, fabricd, noded and the workloads (static, release)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(&inputs.repo)
        .args(["build", "--release", "--target", TARGET]);
    for b in OUR_BINARIES {
        c.args(["-p", b]);
    }
    c.args(["-p", "workloads"]);
    c.env(
        "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
        "-C target-feature=+crt-static",
    );
    cmd::status(&mut c)?;
    step("building edge-tpm (release, linked against the root's tpm2-tss)");
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(&inputs.repo)
        .args(["build", "--release", "-p", DYNAMIC_BINARY]);
    cmd::status(&mut c)?;
    for b in OUR_BINARIES
        .into_iter()
        .chain(WORKLOAD_IMAGES.map(|(b, _, _)| b))
    {
        let p = inputs.binary(b);
        let bytes = std::fs::read(&p).with_context(|| format!("failed to read {}", p.display()))?;
        let d = elf::parse(&bytes).with_context(|| format!("{}: bad ELF", p.display()))?;
        // The initramfs has no libc, and the daemons must not depend on the root's.
        if d.interp.is_some() || !d.needed.is_empty() {
            bail!(
                "{} is not static (interpreter {:?}, needs {:?})",
                p.display(),
                d.interp,
                d.needed
            );
        }
    }
    Ok(())
}

/// Everything whose change means the image must be rebuilt.
fn stamp(inputs: &Inputs, debs: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    let mut add = |label: &str, data: &[u8]| {
        h.update(label.as_bytes());
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    };
    let read =
        |p: &Path| std::fs::read(p).with_context(|| format!("failed to read {}", p.display()));
    add("definition", &read(&inputs.definition)?);
    add("key", inputs.key.public_hex.as_bytes());
    add("pcr-policy-key", &inputs.pcr_key.public_pem()?);
    add("update-key", inputs.update_key.key.public_hex.as_bytes());
    let overlays = [
        Some(("overlay", &inputs.overlay)),
        inputs.extra_overlay.as_ref().map(|d| ("extra", d)),
    ];
    for (label, dir) in overlays.into_iter().flatten() {
        for rel in rootfs::list_tree(dir)? {
            let p = dir.join(&rel);
            let data = if p.is_symlink() {
                std::fs::read_link(&p)?
                    .to_string_lossy()
                    .into_owned()
                    .into_bytes()
            } else {
                read(&p)?
            };
            add(&format!("{label}/{rel}"), &data);
        }
    }
    for b in OUR_BINARIES
        .into_iter()
        .chain([DYNAMIC_BINARY])
        .chain(WORKLOAD_IMAGES.map(|(b, _, _)| b))
    {
        add(b, &read(&inputs.binary(b))?);
    }
    for d in debs {
        add("deb", d.file_name().unwrap_or_default().as_encoded_bytes());
    }
    // The builder itself: a change in how the image is made must rebuild it too.
    add("xtask", &read(&std::env::current_exe()?)?);
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

struct Prepared {
    def: Definition,
    inputs: Inputs,
    debs: Vec<PathBuf>,
}

fn prepare() -> Result<Prepared> {
    crate::host::ensure_packages(&HOST_TOOLS)?;
    let inputs = Inputs::locate()?;
    let def = Definition::load(&inputs.definition)?;
    step(&format!(
        "definition {} ({} {})",
        inputs.definition.display(),
        def.image.name,
        def.image.version
    ));
    let debs = debs::fetch_all(&def.pins())?;
    build_binaries(&inputs)?;
    Ok(Prepared { def, inputs, debs })
}

/// What both the real build and the reproducibility check do: unpack, order modules,
/// assemble the root and make its erofs image and hash tree inside `work`.
struct RootBuild {
    extracted: BTreeMap<String, PathBuf>,
    initramfs_modules: Vec<String>,
    image: rootfs::RootImage,
}

fn build_root(p: &Prepared, work: &Path) -> Result<RootBuild> {
    let def = &p.def;
    step("unpacking packages");
    let mut extracted = BTreeMap::new();
    for (pin, deb) in def.pins().iter().zip(&p.debs) {
        let dir = work.join("debs").join(&pin.name);
        debs::extract(deb, &dir)?;
        extracted.insert(pin.name.clone(), dir);
    }
    step("resolving kernel modules (depmod)");
    let table = modules::depmod(&extracted[&def.kernel.package], &def.kernel.release)?;
    let initramfs_modules = table.load_order(&def.kernel.initramfs_modules, &BTreeSet::new())?;
    let already: BTreeSet<String> = initramfs_modules.iter().cloned().collect();
    let root_modules = table.load_order(&def.kernel.root_modules, &already)?;
    let booted: BTreeSet<String> = already.iter().chain(&root_modules).cloned().collect();
    let mut on_demand = BTreeMap::new();
    for name in &def.kernel.on_demand_modules {
        on_demand.insert(
            name.clone(),
            table.load_order(std::slice::from_ref(name), &booted)?,
        );
    }
    step(&format!(
        "{} initramfs modules, {} root modules, {} on demand",
        initramfs_modules.len(),
        root_modules.len(),
        on_demand.len()
    ));

    step("assembling the root tree");
    let root = work.join("root");
    let modules = rootfs::RootModules {
        boot: root_modules,
        on_demand,
    };
    rootfs::assemble(def, &p.inputs, &extracted, &modules, &root)?;
    let n = elf::check_closure(&root)?;
    step(&format!("checked the libraries of {n} ELF files"));
    let n = elf::check_links(&root)?;
    step(&format!("checked the targets of {n} links"));
    no_way_in::check(&root, "the root")?;
    step("making root.erofs and its dm-verity tree");
    let image = rootfs::make_images(def, &root, work)?;
    Ok(RootBuild {
        extracted,
        initramfs_modules,
        image,
    })
}

fn make_initramfs(
    def: &Definition,
    p: &Prepared,
    rb: &RootBuild,
    work: &Path,
    out: &Path,
) -> Result<()> {
    let kroot = &rb.extracted[&def.kernel.package];
    let config_path = kroot
        .join("boot")
        .join(format!("config-{}", def.kernel.release));
    let config = std::fs::read_to_string(&config_path)
        .with_context(|| format!("failed to read {}", config_path.display()))?;
    let needs = match def.kernel.initramfs_compression {
        Compression::Zstd => Some("CONFIG_RD_ZSTD=y"),
        Compression::Gzip => Some("CONFIG_RD_GZIP=y"),
        Compression::None => None,
    };
    if let Some(opt) = needs {
        if !config.lines().any(|l| l == opt) {
            bail!(
                "{}: kernel.initramfs_compression needs {opt}, which {} lacks",
                p.inputs.definition.display(),
                config_path.display()
            );
        }
    }
    let tree = work.join("initramfs-tree");
    if tree.exists() {
        std::fs::remove_dir_all(&tree)?;
    }
    for d in ["proc", "sys", "dev", "run", "sysroot"] {
        std::fs::create_dir_all(tree.join(d))?;
    }
    rootfs::copy_entry(&p.inputs.binary("init"), &tree.join("init"))?;
    rootfs::write(
        &tree.join("etc/initrd-release"),
        &rootfs::initrd_release(def),
    )?;
    rootfs::write(
        &tree.join("etc/edge/modules"),
        &rootfs::lines(&rb.initramfs_modules),
    )?;
    let kmods = Path::new("lib/modules").join(&def.kernel.release);
    for m in &rb.initramfs_modules {
        rootfs::copy_entry(&kroot.join(&kmods).join(m), &tree.join(&kmods).join(m))?;
    }
    no_way_in::check(&tree, "the initramfs")?;
    let mut w = cpio::Writer::new(Vec::new());
    cpio::archive_tree(&tree, &mut w)?;
    let archive = w.finish()?;
    let plain = work.join("initramfs.cpio");
    std::fs::write(&plain, &archive)?;
    if out.exists() {
        std::fs::remove_file(out)?;
    }
    match def.kernel.initramfs_compression {
        // Level 19 keeps the window at 8 MiB, which the kernel's decompressor handles.
        Compression::Zstd => cmd::output(
            Command::new("zstd")
                .args(["-q", "-19", "-o"])
                .arg(out)
                .arg(&plain),
        )
        .map(drop)?,
        Compression::Gzip => {
            let gz = cmd::output(Command::new("gzip").args(["-9", "-n", "-c"]).arg(&plain))?;
            std::fs::write(out, gz.stdout)?;
        }
        Compression::None => {
            std::fs::copy(&plain, out)?;
        }
    }
    Ok(())
}

/// Builds the definition as it is (the builder skips the work when nothing changed) and
/// returns the raw disk that `run`, the system tests and the benches boot.
pub fn build_default() -> Result<PathBuf> {
    let out = build(&BuildOptions::default()).context("failed to build the image")?;
    Ok(out.raw)
}

/// Builds the image unless it is up to date, and returns where everything is.
pub fn build(opts: &BuildOptions) -> Result<ImageOutputs> {
    let mut p = prepare()?;
    if let Some(dir) = &opts.overlay {
        if !dir.is_dir() {
            bail!("--overlay {}: not a directory", dir.display());
        }
        step(&format!(
            "with the files of {} over the overlay",
            dir.display()
        ));
        p.inputs.extra_overlay = Some(dir.clone());
    }
    let out_dir = match &opts.version {
        Some(v) => {
            p.def.image.version = v.clone();
            step(&format!("as version {v}"));
            target_dir(&p.inputs.repo).join(format!("image-{v}"))
        }
        None => target_dir(&p.inputs.repo).join("image"),
    };
    let out_dir = match opts.erofs_pcluster_kib {
        Some(kib) => {
            definition::check_pcluster_kib("--pcluster-kib", kib)?;
            p.def.image.erofs_pcluster_kib = kib;
            step(&format!("with an erofs physical cluster of {kib} KiB"));
            let name = out_dir.file_name().unwrap_or_default().to_string_lossy();
            out_dir.with_file_name(format!("{name}-pcluster-{kib}"))
        }
        None => out_dir,
    };
    if let Some(n) = opts.security_version {
        if n == 0 {
            bail!("--security-version: versions start at 1");
        }
        p.def.image.security_version = n;
        step(&format!("with security version {n}"));
    }
    let def = &p.def;
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("failed to create {}", out_dir.display()))?;
    let mut outs = out_paths(&out_dir, def);
    let stamp_path = out_dir.join("stamp");
    let stamp = format!(
        "{} {} {} {}",
        stamp(&p.inputs, &p.debs)?,
        def.image.version,
        def.image.security_version,
        def.image.erofs_pcluster_kib
    );
    if p.inputs.pcr_key.development {
        step(&p.inputs.pcr_key.development_warning());
    }
    if p.inputs.update_key.development {
        step(&p.inputs.update_key.development_warning());
    }
    let fresh = !opts.force
        && std::fs::read_to_string(&stamp_path).is_ok_and(|s| s.trim() == stamp)
        && [
            &outs.raw,
            &outs.qcow2,
            &outs.roothash_file,
            &outs.manifest,
            &outs.pcr11,
            &outs.release_key,
            &outs.bundle,
        ]
        .iter()
        .all(|f| f.exists());
    if fresh {
        outs.roothash = std::fs::read_to_string(&outs.roothash_file)?
            .trim()
            .to_string();
        step("up to date");
        return Ok(outs);
    }
    let _ = std::fs::remove_file(&stamp_path);

    let work = out_dir.join("work");
    if work.exists() {
        std::fs::remove_dir_all(&work)
            .with_context(|| format!("failed to remove {}", work.display()))?;
    }
    std::fs::create_dir_all(&work)?;
    let rb = build_root(&p, &work)?;
    std::fs::rename(&rb.image.erofs, &outs.root_erofs)?;
    std::fs::rename(&rb.image.verity, &outs.root_verity)?;
    outs.roothash = rb.image.roothash.clone();
    std::fs::write(&outs.roothash_file, format!("{}\n", outs.roothash))?;
    step(&format!("root hash {}", outs.roothash));
    let p_ = &p.def.partitions;
    for (f, mib, what) in [
        (&outs.root_erofs, p_.root_mib, "partitions.root_mib"),
        (&outs.root_verity, p_.verity_mib, "partitions.verity_mib"),
    ] {
        let len = size_line(f)?;
        if len > mib << 20 {
            bail!(
                "{} is {len} bytes, more than {what} = {mib} MiB",
                f.display()
            );
        }
    }

    step("making the initramfs");
    make_initramfs(def, &p, &rb, &work, &outs.initramfs)?;
    size_line(&outs.initramfs)?;

    step("making the UKIs");
    let kroot = &rb.extracted[&def.kernel.package];
    let boot = &rb.extracted[&def.boot.package];
    let osrel = work.join("osrel");
    rootfs::write(&osrel, &rootfs::os_release(def))?;
    let vmlinuz = kroot
        .join("boot")
        .join(format!("vmlinuz-{}", def.kernel.release));
    let mut esp_files = vec![
        (
            "/EFI/BOOT/BOOTX64.EFI".to_string(),
            boot.join(&def.boot.loader),
        ),
        (
            "/EFI/systemd/systemd-bootx64.efi".to_string(),
            boot.join(&def.boot.loader),
        ),
    ];
    let mut pcr11 = serde_json::Map::new();
    for (slot, uki_path) in [('a', &outs.uki_a), ('b', &outs.uki_b)] {
        let cmdline_file = work.join(format!("cmdline-{slot}"));
        let line = uki::cmdline(
            &def.kernel.cmdline,
            &def.tpm.cmdline(),
            slot,
            &def.image.version,
            def.image.security_version,
            &outs.roothash,
        );
        std::fs::write(&cmdline_file, &line)?;
        let predicted = uki::assemble(
            &uki::UkiParts {
                stub: &boot.join(&def.boot.stub),
                osrel: &osrel,
                cmdline: &cmdline_file,
                initrd: &outs.initramfs,
                linux: &vmlinuz,
                pcr_key: &p.inputs.pcr_key,
                pcrsig: &work.join(format!("pcrsig-{slot}.json")),
            },
            uki_path,
        )?;
        size_line(uki_path)?;
        let at = pcr::hex(&predicted.enter_initrd);
        step(&format!(
            "PCR 11 of slot {slot} at {}: {at}",
            pcr::SIGNED_PHASE
        ));
        // The slot's signed release entry: the value and the `.pcrsig` its UKI carries,
        // which the core checks against the release key (`edgectl enroll --release-key`).
        let pcrsig_path = work.join(format!("pcrsig-{slot}.json"));
        let pcrsig: serde_json::Value = serde_json::from_slice(&std::fs::read(&pcrsig_path)?)
            .with_context(|| format!("{} is not JSON", pcrsig_path.display()))?;
        pcr11.insert(
            slot.to_string(),
            serde_json::json!({ (pcr::SIGNED_PHASE): at, "pcrsig": pcrsig }),
        );
    }
    // Slot A gets the tries. Slot B, identical on a fresh disk, is the standby with none
    // (`+0`): systemd-boot sorts entries without tries last, so B boots only once A has
    // used up its tries, and init's blessing then makes B the good one. The ESP ships
    // B's entry as the bytes it differs from A's by, which stage 1 of the first boot
    // turns into the file (init/src/standby.rs): one UKI less in the image.
    let stem = format!("{}-{}", def.image.name, def.image.version);
    esp_files.push((
        format!("/EFI/Linux/{stem}-a+{}.efi", def.boot.tries),
        outs.uki_a.clone(),
    ));
    let standby_path = work.join("standby.json");
    write_standby(
        &outs.uki_a,
        &outs.uki_b,
        &format!("{stem}-a"),
        &format!("{stem}-b+0.efi"),
        &standby_path,
    )?;
    esp_files.push((format!("/{}", edge_update::standby::PATH), standby_path));
    std::fs::write(&outs.pcr11, serde_json::to_string_pretty(&pcr11)? + "\n")
        .with_context(|| format!("failed to write {}", outs.pcr11.display()))?;
    // The release key beside the release it checks, for tests and for an operator's
    // first look; the core should take it from the keys directory it trusts.
    std::fs::write(&outs.release_key, p.inputs.pcr_key.public_pem()?)
        .with_context(|| format!("failed to write {}", outs.release_key.display()))?;
    write_bundle(def, &p.inputs, &outs)?;
    let loader_conf = work.join("loader.conf");
    rootfs::write(
        &loader_conf,
        &format!(
            "timeout {}\ndefault {}\n",
            def.boot.timeout, def.boot.default_entry
        ),
    )?;
    esp_files.push(("/loader/loader.conf".to_string(), loader_conf));

    step("making the ESP");
    let volume_id = &derive_hex(&def.image.version, "esp-volume-id")[..8];
    disk::make_esp(&outs.esp, def.partitions.esp_mib, volume_id, &esp_files)?;
    size_line(&outs.esp)?;

    step("writing the GPT disk");
    let v = &def.image.version;
    let pt = &def.partitions;
    let part = |label: &'static str,
                type_guid: &'static str,
                size_mib: u64,
                contents: Option<PathBuf>| disk::Part {
        label,
        type_guid,
        uuid: derive_uuid(v, &format!("part-{label}")),
        size_mib,
        contents,
    };
    let parts = [
        part("esp", ESP_TYPE, pt.esp_mib, Some(outs.esp.clone())),
        part(
            "root-a",
            ROOT_TYPE,
            pt.root_mib,
            Some(outs.root_erofs.clone()),
        ),
        part(
            "root-a-verity",
            VERITY_TYPE,
            pt.verity_mib,
            Some(outs.root_verity.clone()),
        ),
        part(
            "root-b",
            ROOT_TYPE,
            pt.root_mib,
            Some(outs.root_erofs.clone()),
        ),
        part(
            "root-b-verity",
            VERITY_TYPE,
            pt.verity_mib,
            Some(outs.root_verity.clone()),
        ),
        part("data", DATA_TYPE, pt.data_mib, None),
    ];
    disk::make_disk(&outs.raw, &derive_uuid(v, "disk"), &parts)?;
    size_line(&outs.raw)?;
    step("converting to qcow2");
    disk::make_qcow2(&outs.raw, &outs.qcow2)?;
    size_line(&outs.qcow2)?;

    let mut esp_content = 0;
    for (_, path) in &esp_files {
        esp_content += std::fs::metadata(path)
            .with_context(|| format!("failed to stat {}", path.display()))?
            .len();
    }
    write_manifest(&outs, def, esp_content)?;
    std::fs::remove_dir_all(&work)
        .with_context(|| format!("failed to remove {}", work.display()))?;
    std::fs::write(&stamp_path, format!("{stamp}\n"))?;
    Ok(outs)
}

/// Describes slot B's UKI as slot A's with the bytes that differ, and checks that the
/// description gives B's back.
fn write_standby(a: &Path, b: &Path, from: &str, entry: &str, out: &Path) -> Result<()> {
    let read =
        |p: &Path| std::fs::read(p).with_context(|| format!("failed to read {}", p.display()));
    let (a, b) = (read(a)?, read(b)?);
    let standby = edge_update::standby::Standby::make(from, entry, &a, &b)?;
    if standby.apply(&a)? != b {
        bail!("the standby entry's description does not give {entry} back");
    }
    let text = serde_json::to_string(&standby)? + "\n";
    step(&format!(
        "standby entry {entry}: {} bytes in {} patches, {} bytes of description",
        standby.changed_bytes(),
        standby.patches.len(),
        text.len()
    ));
    std::fs::write(out, text).with_context(|| format!("failed to write {}", out.display()))
}

/// `esp_content`: the bytes of the files on the ESP (boot loader, its config, slot A's
/// UKI, slot B's standby description),
/// which is what the ESP ships, rather than the mostly empty FAT image around them.
fn write_manifest(outs: &ImageOutputs, def: &Definition, esp_content: u64) -> Result<()> {
    let mut sizes = serde_json::Map::new();
    sizes.insert("esp_content".into(), esp_content.into());
    for (name, path) in [
        ("edgeos.raw", &outs.raw),
        ("edgeos.qcow2", &outs.qcow2),
        ("root.erofs", &outs.root_erofs),
        ("root.verity", &outs.root_verity),
        ("initramfs", &outs.initramfs),
        ("uki-a.efi", &outs.uki_a),
        ("uki-b.efi", &outs.uki_b),
        ("esp.img", &outs.esp),
    ] {
        sizes.insert(name.to_string(), std::fs::metadata(path)?.len().into());
    }
    let manifest = serde_json::json!({
        "name": def.image.name,
        "version": def.image.version,
        "roothash": outs.roothash,
        "kernel": { "release": def.kernel.release, "package": def.kernel.package, "version": def.kernel.version },
        "sizes": sizes,
    });
    std::fs::write(
        &outs.manifest,
        serde_json::to_string_pretty(&manifest)? + "\n",
    )
    .with_context(|| format!("failed to write {}", outs.manifest.display()))
}

/// Builds the root twice from scratch in separate directories and fails unless the erofs
/// images are byte-identical and the root hashes equal.
pub fn check_reproducible() -> Result<()> {
    let p = prepare()?;
    let base = target_dir(&p.inputs.repo).join("image").join("repro");
    let mut results = Vec::new();
    for run in ["1", "2"] {
        let work = base.join(run);
        if work.exists() {
            std::fs::remove_dir_all(&work)
                .with_context(|| format!("failed to remove {}", work.display()))?;
        }
        std::fs::create_dir_all(&work)?;
        step(&format!(
            "reproducibility build {run} in {}",
            work.display()
        ));
        let rb = build_root(&p, &work)?;
        let digest = sha256_hex(&std::fs::read(&rb.image.erofs)?);
        results.push((rb.image.roothash, digest, rb.image.erofs));
    }
    let (a, b) = (&results[0], &results[1]);
    if a.1 != b.1 {
        bail!(
            "root.erofs differs between builds: {} ({}) vs {} ({})",
            a.2.display(),
            a.1,
            b.2.display(),
            b.1
        );
    }
    if a.0 != b.0 {
        bail!("root hashes differ between builds: {} vs {}", a.0, b.0);
    }
    std::fs::remove_dir_all(&base)
        .with_context(|| format!("failed to remove {}", base.display()))?;
    step(&format!(
        "reproducible: root.erofs sha256 {}, root hash {}",
        a.1, a.0
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_uuids_are_stable_and_distinct() {
        let a = derive_uuid("0.1.0", "disk");
        assert_eq!(a, derive_uuid("0.1.0", "disk"));
        assert_ne!(a, derive_uuid("0.1.1", "disk"));
        assert_ne!(a, derive_uuid("0.1.0", "part-esp"));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "8");
    }
}
