//! The data partition sealed to the TPM. On the first boot it becomes LUKS2 (readable by
//! `cryptsetup` on any workstation) under a random key that the TPM seals to the image's
//! signed PCR 11 policy, kept in the LUKS2 header as a token, plus a recovery key printed
//! once. Later boots unseal the key and open it. A boot whose PCR 11 the policy key has
//! not signed gets no key: the partition stays closed and untouched, and stage 2 keeps
//! the services down and says why (docs/security.md).
//!
//! The TPM steps run in `edge-tpm` and the LUKS2 steps in Debian's `cryptsetup`, both from
//! the verified root (`rootexec`); this module owns the order and the decisions.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::disk::{self, BlockDev};
use crate::dm;
use crate::error::{Error, Result};
use crate::rootexec::{self, Binds};
use crate::say;

const CRYPTSETUP: &str = "/usr/sbin/cryptsetup";
const MKE2FS: &str = "/usr/sbin/mke2fs";
const EDGE_TPM: &str = "/usr/bin/edge-tpm";
/// The TPM as stage 1 opens it: the raw device, no resource manager (`tpm_command`).
const STAGE1_TCTI: &str = "device:/dev/tpm0";
/// edge-tpm's exit status when no TPM could be opened (tpm/src/bin/edge-tpm.rs): it
/// measured nothing.
const EDGE_TPM_NO_TPM: i32 = 3;
/// The device-mapper name of the opened partition.
pub const MAPPER_NAME: &str = "data";
/// Where systemd-stub puts the UKI's `.pcrsig` and `.pcrpkey` in the initramfs.
const STUB_PCRSIG: &str = "/.extra/tpm2-pcr-signature.json";
const STUB_PCRPKEY: &str = "/.extra/tpm2-pcr-public-key.pem";
/// Where stage 1 keeps them for edge-tpm (inside the new root's /run once bound).
const PCRSIG: &str = "/run/edge/tpm/pcrsig.json";
const PCRPKEY: &str = "/run/edge/tpm/pcrpkey.pem";
/// The volume key between its making and luksFormat: tmpfs, never a disk.
const VOLUME_FILE: &str = "/run/edge/tpm/volume.new";
/// What our token seals (its field `edgeos-sealed`): the volume key. A token without it
/// was made by an earlier image and seals keyslot 0's passphrase.
const SEALED_KIND: &str = "edgeos-sealed";
const SEALED_VOLUME_KEY: &str = "volume-key";
/// The LUKS2 token type holding the sealed key.
pub const TOKEN_TYPE: &str = "edgeos-tpm2";
/// Bytes looked at to tell a blank partition from a used one.
pub const HEAD_BYTES: usize = 64 << 10;

/// What the start of the partition holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// All zeros: never used (a fresh image, or a box's first boot).
    Blank,
    Luks2,
    /// A plain ext4 file system, as images before the sealed partition made.
    Ext4,
    /// Anything else, described.
    Other(String),
}

pub fn classify(head: &[u8]) -> Content {
    if head.starts_with(b"LUKS\xba\xbe") {
        return match head.get(6..8) {
            Some([0, 2]) => Content::Luks2,
            Some(v) => Content::Other(format!(
                "a LUKS version {} header, not LUKS2",
                u16::from_be_bytes([v[0], v[1]])
            )),
            None => Content::Other("a truncated LUKS header".into()),
        };
    }
    if head
        .get(crate::ext4::SUPERBLOCK_OFFSET as usize..)
        .and_then(crate::ext4::parse)
        .is_some()
    {
        return Content::Ext4;
    }
    if head.iter().all(|&b| b == 0) {
        return Content::Blank;
    }
    let shown: String = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Content::Other(format!("neither LUKS2 nor blank (it starts {shown})"))
}

/// The partition's outcome.
pub enum Unlock {
    /// Opened, holding ext4; `recovery`: made on this boot, with this recovery key.
    Opened {
        node: PathBuf,
        recovery: Option<String>,
    },
    /// Not opened, and nothing on it touched: why, in one line.
    Locked(String),
}

/// Opens (or on the first boot makes) the partition, measuring the initrd phases around
/// the unseal; returns the outcome and the time spent on the TPM and the unlock.
/// `bind_pcrs`: the PCRs a new key is bound to by value as well (`edge.tpm_bind_pcrs=`,
/// the PCR 7 option), passed to `edge-tpm seal --bind-pcrs`.
pub fn open(
    binds: &Binds,
    part: &BlockDev,
    dev_dir: &Path,
    bind_pcrs: Option<&str>,
) -> (Unlock, std::time::Duration) {
    let start = std::time::Instant::now();
    let outcome = match unlock_or_create(binds, part, dev_dir, bind_pcrs) {
        Ok((node, recovery)) => Unlock::Opened { node, recovery },
        Err(Refusal { why, measured }) => {
            if !measured {
                // Refused before the TPM was asked: the phases are measured all the same,
                // so PCR 11 tells a verifier that this boot left the initrd.
                for word in ["enter-initrd", "leave-initrd"] {
                    if let Err(e) = phase(Some(binds), word) {
                        say!("tpm: {word} not measured: {e}");
                        break;
                    }
                }
            }
            Unlock::Locked(why)
        }
    };
    (outcome, start.elapsed())
}

/// Why the partition stays closed, and whether edge-tpm ran (and so measured the
/// initrd phases).
struct Refusal {
    why: String,
    measured: bool,
}

/// Refused before edge-tpm ran.
impl From<Error> for Refusal {
    fn from(e: Error) -> Refusal {
        Refusal {
            why: e.to_string(),
            measured: false,
        }
    }
}

/// Refused after edge-tpm ran (and measured the initrd phases).
fn measured(e: Error) -> Refusal {
    Refusal {
        why: e.to_string(),
        measured: true,
    }
}

/// Extends PCR 11 with a boot phase and returns its new value (hex): from stage 1
/// through `binds`, from stage 2 (`sysinit`, `ready`) with `None`.
pub fn phase(binds: Option<&Binds>, word: &str) -> Result<String, rootexec::Failed> {
    let out = rootexec::run(tpm_command(binds, &["phase", word]), b"")?;
    Ok(String::from_utf8_lossy(&out).trim().to_owned())
}

/// Measures `data`, the box's provisioning, into our PCR for it (edge-tpm picks which:
/// tpm/src/policy.rs) and logs `event`; returns `PCR <n> <value>`.
pub fn measure_provisioning(event: &str, data: &[u8]) -> Result<String, rootexec::Failed> {
    let out = rootexec::run(tpm_command(None, &["measure", "provisioning", event]), data)?;
    Ok(String::from_utf8_lossy(&out).trim().to_owned())
}

/// The TPM's security counter (`edge-tpm counter`, tpm/src/counter.rs), raised first to
/// at least `raise` when given; `None` before its first count.
pub fn security_counter(raise: Option<u64>) -> Result<Option<u64>> {
    let to = raise.map(|n| n.to_string());
    let args: Vec<&str> = match &to {
        Some(n) => vec!["counter", "raise", n],
        None => vec!["counter"],
    };
    let out = rootexec::run(tpm_command(None, &args), b"")?;
    let text = String::from_utf8_lossy(&out);
    match text.trim() {
        "none" => Ok(None),
        n => n
            .parse()
            .map(Some)
            .map_err(|_| Error::edge_tpm(format!("counter printed {n:?}, not a number"))),
    }
}

/// Stage 1's one edge-tpm run (`seal` or `unseal` with `--initrd`): it measures
/// enter-initrd, does the work, and measures leave-initrd. Returns its JSON output, with
/// the PCR 11 line said.
fn tpm_initrd(binds: &Binds, args: &[&str], input: &[u8]) -> Result<Value, Refusal> {
    let out = rootexec::run(tpm_command(Some(binds), args), input).map_err(tpm_refusal)?;
    let v: Value = serde_json::from_slice(&out)
        .map_err(|e| measured(Error::edge_tpm(format!("printed no JSON: {e}"))))?;
    if let Some(pcr11) = v.get("pcr11").and_then(Value::as_str) {
        say!("tpm: PCR 11 (the UKI's sections, measured by systemd-stub, then enter-initrd): {pcr11}");
    }
    Ok(v)
}

/// A failed edge-tpm run as a refusal. A TPM that could not be opened measured nothing:
/// edge-tpm says so by its exit status. The reason is edge-tpm's own words ("edge-tpm:
/// the TPM refused the data key: ...") without its name, else how the run failed.
fn tpm_refusal(f: rootexec::Failed) -> Refusal {
    Refusal {
        measured: f.code != Some(EDGE_TPM_NO_TPM),
        why: match f.said.strip_prefix("edge-tpm: ") {
            Some(said) => said.to_owned(),
            None => f.message,
        },
    }
}

fn tpm_command(binds: Option<&Binds>, args: &[&str]) -> std::process::Command {
    let mut c = match binds {
        Some(b) => {
            let mut c = b.command(EDGE_TPM);
            // Stage 1 is the TPM's only user, so it talks to the TPM itself rather than
            // through the kernel's resource manager, which saves, flushes and reloads
            // every object and session around each command: under TCG each of those is
            // a round trip of tens of ms. edge-tpm flushes what it loaded when it ends.
            c.env("EDGE_TPM_TCTI", STAGE1_TCTI);
            c
        }
        None => std::process::Command::new(EDGE_TPM),
    };
    c.args(args);
    c
}

fn cryptsetup(binds: &Binds, args: &[&str], input: &[u8]) -> Result<Vec<u8>> {
    let mut c = binds.command(CRYPTSETUP);
    c.args(args);
    Ok(rootexec::run(c, input)?)
}

fn unlock_or_create(
    binds: &Binds,
    part: &BlockDev,
    dev_dir: &Path,
    bind_pcrs: Option<&str>,
) -> Result<(PathBuf, Option<String>), Refusal> {
    let dev = part.node(dev_dir);
    let dev_s = dev.to_string_lossy().into_owned();
    keep_policy_files()?;
    let head = read_head(&dev)?;
    // What the partition holds, left as it is.
    let holds = |what: String| -> Refusal {
        let (dev, detail) = (dev_s.clone(), format!("holds {what}"));
        Error::Data { dev, detail }.into()
    };
    let token = match classify(&head) {
        Content::Blank => None,
        Content::Luks2 => match luks2_metadata(&head)
            .map(|meta| luks2_token(&meta).map(|t| (t, meta)))
            .map_err(Error::step(format!(
                "the LUKS2 header of {dev_s} does not parse"
            )))?
        {
            Some(t) => Some(t),
            // A header without our token: the first boot was cut short before the
            // token was written, so no key to it was ever given out. Start again.
            None => {
                say!("data: {dev_s} holds a LUKS2 header without a sealed key (an interrupted first boot); making it again");
                None
            }
        },
        Content::Ext4 => return Err(holds("an unencrypted ext4 file system from an older image; it is left as it is (docs/security.md: copy its data off, then blank it)".into())),
        Content::Other(what) => return Err(holds(format!("{what}; it is left as it is"))),
    };
    match token {
        None => create(binds, &dev_s, dev_dir, bind_pcrs).map(|(node, r)| (node, Some(r))),
        Some((token, meta)) => unlock(binds, part, &token, &meta, dev_dir).map(|node| (node, None)),
    }
}

/// The JSON metadata of a LUKS2 header (`head` holds at least the primary header). The
/// binary header's `hdr_size` (at byte 8, big-endian) bounds the JSON area, which starts
/// at 4096 and is padded with NULs. Read here rather than with `cryptsetup luksDump`: one
/// program less to start on every boot.
pub fn luks2_metadata(head: &[u8]) -> Result<Value> {
    let size = head
        .get(8..16)
        .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
        .ok_or_else(|| Error::luks2("truncated binary header"))?;
    let json = usize::try_from(size)
        .ok()
        .filter(|&n| n > 4096)
        .and_then(|n| head.get(4096..n))
        .ok_or_else(|| Error::luks2(format!("header size {size} is out of range")))?;
    let end = json.iter().position(|&b| b == 0).unwrap_or(json.len());
    serde_json::from_slice(&json[..end]).map_err(|e| Error::luks2(format!("its JSON: {e}")))
}

/// Our token in a LUKS2 header's metadata: `None` when there is none.
pub fn luks2_token(meta: &Value) -> Option<Value> {
    meta.get("tokens")
        .and_then(Value::as_object)
        .and_then(|t| {
            t.values()
                .find(|v| v.get("type").and_then(Value::as_str) == Some(TOKEN_TYPE))
        })
        .cloned()
}

/// The dm-crypt table of a LUKS2 header's one data segment, for `volume_key` (hex):
/// (length in 512-byte sectors, target parameters), as `cryptsetup open` loads it. The
/// partition `dev` ("major:minor") has `partition_sectors`.
pub fn crypt_table(
    meta: &Value,
    volume_key_hex: &str,
    dev: &str,
    partition_sectors: u64,
) -> Result<(u64, String)> {
    let segments = meta
        .get("segments")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::luks2("no segments"))?;
    if segments.len() != 1 {
        return Err(Error::luks2(format!(
            "{} segments (a reencryption under way?); one is opened here",
            segments.len()
        )));
    }
    let seg = segments
        .values()
        .next()
        .ok_or_else(|| Error::luks2("no segments"))?;
    let field = |name: &str| {
        seg.get(name)
            .ok_or_else(|| Error::luks2(format!("the data segment has no {name}")))
    };
    let number = |name: &str| -> Result<u64> {
        let v = field(name)?;
        v.as_u64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .ok_or_else(|| Error::luks2(format!("the data segment's {name} {v} is not a number")))
    };
    if field("type")?.as_str() != Some("crypt") {
        return Err(Error::luks2(format!(
            "the data segment is of type {}",
            field("type")?
        )));
    }
    let cipher = field("encryption")?
        .as_str()
        .filter(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| Error::luks2("the data segment's encryption is not a cipher name"))?;
    let offset = number("offset")?;
    let sector_size = number("sector_size")?;
    let iv_tweak = number("iv_tweak")?;
    if offset % 512 != 0 || !matches!(sector_size, 512 | 1024 | 2048 | 4096) {
        return Err(Error::luks2(format!(
            "the data segment's offset {offset} or sector size {sector_size} is not one dm-crypt takes"
        )));
    }
    let offset_sectors = offset / 512;
    let length = match field("size")?.as_str() {
        Some("dynamic") => partition_sectors.checked_sub(offset_sectors),
        _ => Some(number("size")? / 512),
    }
    .filter(|&n| n > 0 && offset_sectors + n <= partition_sectors)
    .ok_or_else(|| {
        Error::luks2(format!(
            "the data segment does not fit the partition ({partition_sectors} sectors)"
        ))
    })?;
    // The IV counts 512-byte sectors whatever the encryption sector size (LUKS2 never
    // sets iv_large_sectors); sector_size is an optional parameter only when not 512.
    let mut params = format!("{cipher} {volume_key_hex} {iv_tweak} {dev} {offset_sectors}");
    if sector_size != 512 {
        params.push_str(&format!(" 1 sector_size:{sector_size}"));
    }
    Ok((length, params))
}

/// Copies the stub's `.pcrsig` and `.pcrpkey` where edge-tpm (chrooted) reads them.
fn keep_policy_files() -> Result<()> {
    std::fs::create_dir_all("/run/edge/tpm").map_err(Error::io("create", "/run/edge/tpm"))?;
    for (from, to) in [(STUB_PCRSIG, PCRSIG), (STUB_PCRPKEY, PCRPKEY)] {
        std::fs::copy(from, to).map_err(|source| Error::NoPcrPolicy { path: from, source })?;
    }
    Ok(())
}

fn read_head(dev: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut head = vec![0u8; HEAD_BYTES];
    std::fs::File::open(dev)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(Error::io("read the start of", dev))?;
    Ok(head)
}

/// The first boot: a fresh LUKS2 whose volume key the TPM seals (kept in our token) and
/// whose one keyslot holds the recovery key, opened with the recovery key (so a
/// partition it cannot open is never handed out) and given its ext4; only then the token
/// that lets later boots unseal, so that a first boot cut short anywhere is made again on
/// the next.
fn create(
    binds: &Binds,
    dev: &str,
    dev_dir: &Path,
    bind_pcrs: Option<&str>,
) -> Result<(PathBuf, String), Refusal> {
    say!("data: {dev} is blank; sealing a new key to the TPM and making it LUKS2");
    // The volume key itself is sealed, as hex (edge-tpm hands secrets out as text; 128
    // bytes, the most a TPM seals): later boots load dm-crypt with it, no cryptsetup.
    let volume = random::<64>()?;
    let volume_hex = crate::verity::hex(&volume);
    let recovery = recovery_key(&random::<16>()?);
    let mut args = vec!["seal", "--initrd", "--pcrpkey", PCRPKEY];
    if let Some(pcrs) = bind_pcrs {
        say!("data: the key is bound to PCR {pcrs} by value as well (edge.tpm_bind_pcrs)");
        args.extend(["--bind-pcrs", pcrs]);
    }
    let out = tpm_initrd(binds, &args, volume_hex.as_bytes())?;
    let mut token = out
        .get("sealed")
        .cloned()
        .ok_or_else(|| measured(Error::edge_tpm("seal printed no sealed key")))?;
    create_luks(binds, dev, dev_dir, &volume, &recovery, &mut token)
        .map(|node| (node, recovery))
        .map_err(measured)
}

/// The LUKS2 steps of the first boot, once the key is sealed.
fn create_luks(
    binds: &Binds,
    dev: &str,
    dev_dir: &Path,
    volume: &[u8],
    recovery: &str,
    token: &mut Value,
) -> Result<PathBuf> {
    // The volume key goes to cryptsetup through tmpfs, never a disk, and only for this.
    write_secret(VOLUME_FILE, volume)?;
    // The recovery key is random (128 bits): a slow key derivation would add nothing but
    // boot time.
    let formatted = cryptsetup(
        binds,
        &[
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--cipher",
            "aes-xts-plain64",
            "--key-size",
            "512",
            "--volume-key-file",
            VOLUME_FILE,
            "--sector-size",
            "4096",
            "--hash",
            "sha256",
            "--label",
            "data",
            "--key-slot",
            "0",
            "--key-file",
            "-",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            dev,
        ],
        recovery.as_bytes(),
    );
    let _ = std::fs::remove_file(VOLUME_FILE);
    formatted.map_err(Error::step(format!("failed to make {dev} LUKS2")))?;
    open_with(binds, dev, recovery.as_bytes())?;
    let node = mapped_node(dev_dir)?;
    mke2fs(binds, &node)?;
    if let Some(t) = token.as_object_mut() {
        t.insert("type".into(), TOKEN_TYPE.into());
        // The sealed secret is the volume key, for no keyslot.
        t.insert("keyslots".into(), serde_json::json!([]));
        t.insert(SEALED_KIND.into(), SEALED_VOLUME_KEY.into());
    }
    cryptsetup(
        binds,
        &[
            "token",
            "import",
            "--token-id",
            "0",
            "--json-file",
            "-",
            dev,
        ],
        token.to_string().as_bytes(),
    )
    .map_err(Error::step(format!(
        "failed to store the sealed key in {dev}'s header"
    )))?;
    say!("data: recovery key (shown this once; keep it off the box, it opens {dev} with cryptsetup): {recovery}");
    say!("data: sealed to the TPM under the signed PCR 11 policy");
    Ok(node)
}

/// A later boot: the token's sealed key, unsealed by the TPM for this boot's PCR 11. An
/// opened partition without ext4 is closed again, not formatted: it may hold data.
fn unlock(
    binds: &Binds,
    part: &BlockDev,
    token: &Value,
    meta: &Value,
    dev_dir: &Path,
) -> Result<PathBuf, Refusal> {
    let dev = part.node(dev_dir).to_string_lossy().into_owned();
    let t = std::time::Instant::now();
    let out = tpm_initrd(
        binds,
        &[
            "unseal",
            "--initrd",
            "--pcrpkey",
            PCRPKEY,
            "--pcrsig",
            PCRSIG,
        ],
        token.to_string().as_bytes(),
    )?;
    let key = out
        .get("secret")
        .and_then(Value::as_str)
        .ok_or_else(|| measured(Error::edge_tpm("unseal printed no key")))?;
    let unsealed = t.elapsed();
    let how = if token.get(SEALED_KIND).and_then(Value::as_str) == Some(SEALED_VOLUME_KEY) {
        open_volume(part, meta, key, dev_dir).map_err(measured)?;
        "dm-crypt"
    } else {
        // Made by an image before the volume key was sealed: keyslot 0's passphrase.
        open_with(binds, &dev, key.as_bytes()).map_err(measured)?;
        "cryptsetup open"
    };
    say!(
        "data: unlocked by the TPM (unseal {} ms, of which in edge-tpm {}; {how} {} ms)",
        unsealed.as_millis(),
        out.get("ms").map(Value::to_string).unwrap_or_default(),
        (t.elapsed() - unsealed).as_millis()
    );
    let node = mapped_node(dev_dir).map_err(measured)?;
    match crate::ext4::read(&node) {
        Ok(Some(_)) => Ok(node),
        other => {
            close(dev_dir);
            Err(measured(match other {
                Err(e) => e,
                _ => Error::Data {
                    dev,
                    detail: "opened, but holds no ext4 file system; it is left as it is".into(),
                },
            }))
        }
    }
}

/// Opens the partition as `data` with its volume key (hex), loading the dm-crypt table
/// its LUKS2 header describes, as `cryptsetup open` would.
fn open_volume(part: &BlockDev, meta: &Value, key_hex: &str, dev_dir: &Path) -> Result<()> {
    if key_hex.len() != 128 || !key_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::luks2(
            "the unsealed volume key is not 64 bytes of hex",
        ));
    }
    let size = format!("/sys/class/block/{}/size", part.devname);
    let sectors: u64 = std::fs::read_to_string(&size)
        .and_then(|s| s.trim().parse().map_err(std::io::Error::other))
        .map_err(Error::io("read", &size))?;
    let dev = part.node(dev_dir);
    let (length, params) = crypt_table(
        meta,
        key_hex,
        &format!("{}:{}", part.major, part.minor),
        sectors,
    )
    .map_err(Error::step(format!(
        "the LUKS2 header of {}",
        dev.display()
    )))?;
    let ctl = dm::Control::open(dev_dir)?;
    ctl.create(MAPPER_NAME, 0)?;
    let loaded = ctl
        .load_table(MAPPER_NAME, 0, length, "crypt", &params)
        .and_then(|()| ctl.resume(MAPPER_NAME));
    if let Err(source) = loaded {
        let _ = ctl.remove(MAPPER_NAME);
        return Err(Error::DmCrypt { dev, source });
    }
    Ok(())
}

/// Closes `data` again, however it was opened.
fn close(dev_dir: &Path) {
    if let Err(e) = dm::Control::open(dev_dir).and_then(|c| c.remove(MAPPER_NAME)) {
        say!("data: failed to close {MAPPER_NAME}: {e}");
    }
}

/// The file system inside the new LUKS2 (the root's mke2fs: the initramfs has none).
fn mke2fs(binds: &Binds, node: &Path) -> Result<()> {
    let node = node.to_string_lossy();
    let mut c = binds.command(MKE2FS);
    c.args(["-t", "ext4", "-q", "-L", "data", "-E"])
        .arg("lazy_itable_init=1,lazy_journal_init=1")
        .arg(&*node);
    rootexec::run(c, b"")
        .map(drop)
        .map_err(|f| Error::step(format!("failed to make ext4 on {node}"))(f.into()))
}

fn open_with(binds: &Binds, dev: &str, key: &[u8]) -> Result<()> {
    cryptsetup(
        binds,
        &[
            "open",
            "--type",
            "luks2",
            "--key-file",
            "-",
            dev,
            MAPPER_NAME,
        ],
        key,
    )
    .map(drop)
    .map_err(Error::step(format!("failed to open {dev}")))
}

/// The opened device's node: the device-mapper device named `data`.
fn mapped_node(dev_dir: &Path) -> Result<PathBuf> {
    let class = Path::new("/sys/class/block");
    let dev = disk::scan(class)
        .into_iter()
        .find(|d| {
            std::fs::read_to_string(class.join(&d.devname).join("dm/name"))
                .is_ok_and(|n| n.trim() == MAPPER_NAME)
        })
        .ok_or_else(|| Error::NoDevice {
            what: format!("device-mapper device named {MAPPER_NAME} was opened"),
        })?;
    disk::ensure_node(&dev, dev_dir)
}

fn random<const N: usize>() -> Result<[u8; N]> {
    let mut buf = [0u8; N];
    let mut filled = 0;
    while filled < N {
        // SAFETY: writes at most N - filled bytes into our buffer.
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), N - filled, 0) };
        if n < 0 {
            return Err(Error::Random(std::io::Error::last_os_error()));
        }
        filled += n as usize;
    }
    Ok(buf)
}

/// 128 bits as eight groups of four hex digits, for reading aloud and typing.
pub fn recovery_key(bytes: &[u8; 16]) -> String {
    bytes
        .chunks(2)
        .map(|c| format!("{:02x}{:02x}", c[0], c[1]))
        .collect::<Vec<_>>()
        .join("-")
}

/// Where the recovery key waits on the data partition (relative to /var) for enrollment
/// to escrow it to the core, which then removes it (fabricd's `core.enroll.recovery_key`,
/// docs/security.md). The partition it opens is the one it rests on.
pub const RECOVERY_FOR_ESCROW: &str = "lib/edge/identity/recovery-key";

/// Keeps the first boot's recovery key on the freshly made data partition, mounted at
/// `var`, for escrow.
pub fn keep_for_escrow(var: &Path, recovery: &str) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let path = var.join(RECOVERY_FOR_ESCROW);
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(Error::io("create", dir))?;
    }
    write_secret(&path.to_string_lossy(), recovery.as_bytes())
}

fn write_secret(path: &str, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(data))
        .map_err(Error::io("write", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_partition_holds_is_told_apart() {
        assert_eq!(classify(&vec![0; HEAD_BYTES]), Content::Blank);
        let mut luks = vec![0; HEAD_BYTES];
        luks[..8].copy_from_slice(b"LUKS\xba\xbe\x00\x02");
        assert_eq!(classify(&luks), Content::Luks2);
        luks[7] = 1;
        assert!(matches!(classify(&luks), Content::Other(w) if w.contains("version 1")));
        let mut ext4 = vec![0; HEAD_BYTES];
        ext4[1024 + 0x38..1024 + 0x3A].copy_from_slice(&0xEF53u16.to_le_bytes());
        assert_eq!(classify(&ext4), Content::Ext4);
        // One stray byte is not blank: never format what might be data.
        let mut used = vec![0; HEAD_BYTES];
        used[HEAD_BYTES - 1] = 1;
        assert!(matches!(classify(&used), Content::Other(w) if w.contains("neither")));
    }

    /// A LUKS2 header made by the host's cryptsetup (cryptsetup-bin), with `token` imported.
    fn luks2_head(token: Option<&str>) -> Vec<u8> {
        use std::process::{Command, Stdio};
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("data.img");
        std::fs::write(&img, vec![0u8; 20 << 20]).unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "0123").unwrap();
        let st = Command::new("cryptsetup")
            .args([
                "luksFormat",
                "--batch-mode",
                "--type",
                "luks2",
                "--pbkdf",
                "pbkdf2",
                "--sector-size",
                "4096",
            ])
            .args(["--pbkdf-force-iterations", "1000", "--key-file"])
            .arg(&key)
            .arg(&img)
            .status()
            .expect("cryptsetup (cryptsetup-bin) must be installed");
        assert!(st.success());
        if let Some(t) = token {
            let mut c = Command::new("cryptsetup")
                .args(["token", "import", "--json-file", "-"])
                .arg(&img)
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            c.stdin.take().unwrap().write_all(t.as_bytes()).unwrap();
            assert!(c.wait().unwrap().success());
        }
        std::fs::read(&img).unwrap()[..HEAD_BYTES].to_vec()
    }

    #[test]
    fn our_token_is_read_from_a_real_luks2_header() {
        let head = luks2_head(Some(
            r#"{"type":"edgeos-tpm2","keyslots":[],"tpm2-policy-key":"ab"}"#,
        ));
        assert_eq!(classify(&head), Content::Luks2);
        let t = luks2_token(&luks2_metadata(&head).unwrap()).expect("the token");
        assert_eq!(t["tpm2-policy-key"], "ab");
        // Another tool's token is not ours; no token at all is an interrupted first boot.
        let other = luks2_head(Some(r#"{"type":"another-tool","keyslots":["0"]}"#));
        assert_eq!(luks2_token(&luks2_metadata(&other).unwrap()), None);
        let mut damaged = luks2_head(None);
        assert_eq!(luks2_token(&luks2_metadata(&damaged).unwrap()), None);
        damaged[4096] = b'#';
        let e = luks2_metadata(&damaged).unwrap_err().to_string();
        assert!(e.contains("JSON"), "{e}");
        damaged[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        let e = luks2_metadata(&damaged).unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
    }

    /// The table loaded on later boots is the one cryptsetup describes for the header it
    /// made the first boot with (aes-xts-plain64, 4 KiB sectors, the data after the
    /// header); a header that does not fit the partition or is not one crypt segment is
    /// refused, naming what.
    #[test]
    fn the_dm_crypt_table_follows_the_luks2_header() {
        let meta = luks2_metadata(&luks2_head(None)).unwrap();
        let seg = &meta["segments"]["0"];
        let offset: u64 = seg["offset"].as_str().unwrap().parse().unwrap();
        let key = "ab".repeat(64);
        let (length, params) = crypt_table(&meta, &key, "259:6", 40960).unwrap();
        assert_eq!(length, 40960 - offset / 512);
        assert_eq!(
            params,
            format!(
                "{} {key} 0 259:6 {} 1 sector_size:{}",
                seg["encryption"].as_str().unwrap(),
                offset / 512,
                seg["sector_size"]
            )
        );
        let e = crypt_table(&meta, &key, "259:6", offset / 512)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not fit"), "{e}");
        let mut two = meta.clone();
        two["segments"]["1"] = seg.clone();
        let e = crypt_table(&two, &key, "259:6", 40960)
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 segments"), "{e}");
        let mut odd = meta.clone();
        odd["segments"]["0"]["encryption"] = "aes xts; 1".into();
        let e = crypt_table(&odd, &key, "259:6", 40960)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a cipher name"), "{e}");
    }

    #[test]
    fn the_recovery_key_kept_for_escrow_is_readable_by_root_only() {
        use std::os::unix::fs::PermissionsExt;
        let var = tempfile::tempdir().unwrap();
        keep_for_escrow(var.path(), "0123-4567").unwrap();
        let path = var.path().join(RECOVERY_FOR_ESCROW);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "0123-4567");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
    }

    /// Whether edge-tpm measured the initrd phases is told by its exit status alone.
    #[test]
    fn edge_tpm_without_a_tpm_measured_nothing_and_a_refusal_did() {
        let failed = |code, said: &str| rootexec::Failed {
            code,
            said: said.to_owned(),
            message: format!("/usr/bin/edge-tpm failed (exit status: {code:?}): {said}"),
        };
        let r = tpm_refusal(failed(
            Some(3),
            "edge-tpm: no TPM at device:/dev/tpm0: gone",
        ));
        assert!(!r.measured);
        assert_eq!(r.why, "no TPM at device:/dev/tpm0: gone");
        let r = tpm_refusal(failed(Some(2), "edge-tpm: the TPM refused the data key: x"));
        assert!(r.measured);
        assert_eq!(r.why, "the TPM refused the data key: x");
        // The words do not decide: a status other than 3 measured, whatever it says.
        let r = tpm_refusal(failed(Some(1), "edge-tpm: no TPM in the words only"));
        assert!(r.measured);
        let r = tpm_refusal(failed(None, ""));
        assert!(r.measured);
        assert!(r.why.starts_with("/usr/bin/edge-tpm failed"), "{}", r.why);
    }

    #[test]
    fn a_recovery_key_is_eight_groups_of_four_hex_digits() {
        let k = recovery_key(&[0xab; 16]);
        assert_eq!(k, "abab-abab-abab-abab-abab-abab-abab-abab");
    }
}
